"""A recipe's ``teacher_train.bn_recalibration_batches`` re-estimates the trained teacher's BatchNorm statistics."""

from __future__ import annotations

import torch

import qdistill as qd
from qdistill.io import load_weights
from qdistill.runs import stages
from qdistill.runs.recipe_run import run_recipe

RECIPE = {"model": {"name": "tiny_resnet"}, "data": {"name": "digits", "batch_size": 32, "limit": 300},
          "quant": {"weight_bits": 8, "act_bits": 8}, "train": {"epochs": 1},
          "teacher_train": {"epochs": 1, "bn_recalibration_batches": 3}, "export": {"onnx": False, "packed": False}}


def test_the_saved_teacher_carries_statistics_of_its_final_weights(tmp_path, monkeypatch):
    calls = []
    original = stages.recalibrate_batchnorm

    def recording(model, batches, count):
        name, norm = next((name, module) for name, module in model.named_modules()
                          if isinstance(module, torch.nn.BatchNorm2d))
        before = norm.running_mean.clone()
        result = original(model, batches, count)
        calls.append((count, name, before, norm.running_mean.clone()))
        return result

    monkeypatch.setattr(stages, "recalibrate_batchnorm", recording)
    run_recipe(qd.Recipe(**RECIPE), tmp_path, show_progress=False)
    (count, name, before, after), = calls
    assert count == 3 and not torch.equal(before, after)
    saved = load_weights(tmp_path / "teacher.safetensors")
    assert torch.equal(saved[f"{name}.running_mean"], after)  # what was saved is the re-estimated statistics
