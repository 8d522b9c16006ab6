"""The test architectures end to end: built-in names, int8 export of each, a different student, report.json."""

from __future__ import annotations

import collections
import json

import onnx
import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill import models
from qdistill.data import load_data, make_loaders
from qdistill.evaluate import evaluate
from qdistill.export.latency import make_session
from qdistill.export.onnx import CODE_CONV_KERNEL, export_onnx
from qdistill.io import save_weights
from qdistill.models import TINY_MODELS
from qdistill.quant import layer_table, prepare
from qdistill.recipe import DataSpec, Recipe, TrainSpec
from qdistill.runs.recipe_run import run_recipe
from qdistill.runs.stages import build_student, prepare_data
from qdistill.train import Supervised, fit
from support import UntraceableNet

SMALL = {"tiny_resnet": {"width": 4}, "tiny_mobilenetv2": {"width": 8}, "tiny_transformer": {"dim": 16, "heads": 2},
         "tiny_mlp": {"hidden": [32, 16]}}
QUANTIZED_ADDS = {"tiny_resnet": 3, "tiny_mobilenetv2": 3, "tiny_transformer": 5, "tiny_mlp": 0}
FAST = {"init": "minmax", "calibration_batches": 2}


@pytest.fixture(scope="module")
def small_digits():
    bundle = load_data(DataSpec(name="digits", limit=320))
    train, val, _ = make_loaders(bundle, 32, 0)
    return bundle, train, val


@pytest.mark.parametrize("name", TINY_MODELS)
def test_built_in_names_take_the_data_arguments(name, small_digits):
    bundle, _, _ = small_digits
    assert name in models.names()
    model = models.create(name, **bundle.model_kwargs())
    smaller = models.create(name, **bundle.model_kwargs(), **SMALL[name])  # YAML lists are accepted
    with torch.no_grad():
        assert model(bundle.train_x[:3]).shape == smaller(bundle.train_x[:3]).shape == (3, 10)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())


def _optimized_ops(path) -> collections.Counter:
    optimized = path.with_suffix(".optimized.onnx")
    make_session(path, level="extended", optimized_path=optimized)
    return collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


@pytest.fixture(scope="module")
def trained_small(small_digits):
    """A briefly trained small float model per architecture (an untrained network's near-tied
    logits would make top-1 parity a coin toss)."""
    bundle, train, _ = small_digits
    trained = {}

    def get(name: str) -> nn.Module:
        if name not in trained:
            torch.manual_seed(0)
            trained[name] = models.create(name, **bundle.model_kwargs(), **SMALL[name])
            fit(Supervised(trained[name]), train, TrainSpec(epochs=2, lr=3e-3), phase="teacher", show_progress=False)
        return trained[name]

    return get


@pytest.mark.parametrize("name, bits", [("tiny_resnet", 8), ("tiny_resnet", 4), ("tiny_mobilenetv2", 4),
                                        ("tiny_transformer", 8), ("tiny_transformer", 4), ("tiny_mlp", 8)])
def test_each_architecture_exports_to_integer_kernels(name, bits, small_digits, trained_small, tmp_path):
    bundle, train, val = small_digits
    student = prepare(trained_small(name), {"weight_bits": bits, "act_bits": bits, **FAST}, calibration_data=train)
    info = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1], verify_on=val)  # parity gate inside
    assert info["agreement_with_student"] >= 0.999
    assert set(info["integer_ops"]) == {n for n, row in layer_table(student).items() if row["weight_bits"]}
    ops = _optimized_ops(tmp_path / "model.onnx")
    assert ops["QLinearAdd"] == QUANTIZED_ADDS[name]  # every residual addition runs on integers
    # no float convolution island; a first conv with K <= 16 (the 1-channel 3x3 stem) is the deliberate
    # float Conv on integer codes, bit-equal to QLinearConv (tests/export/test_integer_ops.py)
    narrow = sum(kernel == CODE_CONV_KERNEL for kernel in info["integer_ops"].values())
    assert ops["Conv"] == narrow <= 1 and not ops["FusedConv"]
    if name in ("tiny_resnet", "tiny_mobilenetv2"):
        assert ops["QLinearGlobalAveragePool"] == 1


def test_smaller_student_named_in_the_recipe_is_built_reported_and_reloaded(small_digits, tmp_path):
    recipe = Recipe(model={"name": "tiny_resnet", "kwargs": {"width": 8}},
                    student={"name": "tiny_resnet", "kwargs": {"width": 4}},
                    data={"name": "digits", "limit": 320, "batch_size": 32},
                    quant={"weight_bits": 8, "act_bits": 8, **FAST}, train={"epochs": 1, "lr": 2e-3},
                    teacher_train={"epochs": 1, "lr": 2e-3}, export={"onnx": False, "packed": False})
    result = run_recipe(recipe, tmp_path, show_progress=False)
    report = result.report
    assert report["student"]["params"] < report["teacher"]["params"] / 3  # half the width: about a quarter
    assert result.student.layer3[0].conv1.out_channels == 16  # width 4 -> layer3 has 4 * 4 channels
    assert "layer3.0.add" in report["student"]["per_layer"]
    loaded = qd.load(tmp_path)  # rebuilt from the recipe's student section
    x = small_digits[0].val_x[:16]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.student.eval()(x))


def test_student_from_a_factory_starts_from_its_checkpoint_weights(small_digits, tmp_path):
    scratch = models.create("tiny_mobilenetv2", width=8, **small_digits[0].model_kwargs())
    save_weights(tmp_path / "student.safetensors", scratch.state_dict())
    recipe = Recipe(data={"name": "digits", "limit": 320},
                    student={"factory": "qdistill.models.tiny:tiny_mobilenetv2", "kwargs": {"width": 8},
                             "checkpoint": str(tmp_path / "student.safetensors")})
    student = build_student(recipe, prepare_data(recipe))
    for key, tensor in scratch.state_dict().items():
        assert torch.equal(student.state_dict()[key], tensor), key




def test_untraceable_model_reports_its_fallback_in_report_json(small_digits, tmp_path):
    bundle, train, val = small_digits
    recipe = Recipe(data={"name": "digits"}, quant={"weight_bits": 8, "act_bits": 8, **FAST}, train={"epochs": 1})
    result = qd.distill(UntraceableNet(), train, val, recipe, show_progress=False)
    result.save(tmp_path)
    student = json.loads((tmp_path / "report.json").read_text())["student"]
    graph_entries = [entry for entry in student["unquantized_layers"] if entry.startswith("<graph>: ")]
    assert len(graph_entries) == 1 and "torch.fx could not trace the model (TraceError" in graph_entries[0]
    add = student["per_layer"]["block.add"]
    assert (add["weight_bits"], add["act_bits"]) == (None, 8)
    assert student["folded_batchnorms"] == ["stem.1", "block.bn1", "block.bn2"]


# teacher epochs, student epochs (the transformer learns slower from scratch)
ACCEPTANCE = {"tiny_resnet": (12, 5), "tiny_mobilenetv2": (12, 5), "tiny_transformer": (30, 6), "tiny_mlp": (20, 5)}


@pytest.fixture(scope="module")
def digits_teachers():
    bundle = load_data(DataSpec(name="digits"))
    train, val, _ = make_loaders(bundle, 32, 0)
    teachers = {}

    def get(name: str) -> tuple[nn.Module, float]:
        if name not in teachers:
            torch.manual_seed(0)
            teacher = models.create(name, **bundle.model_kwargs())
            fit(Supervised(teacher), train, TrainSpec(epochs=ACCEPTANCE[name][0], lr=3e-3), phase="teacher",
                show_progress=False)
            teachers[name] = (teacher.eval(), evaluate(teacher, val)["accuracy"])
        return teachers[name]

    return bundle, train, val, get


@pytest.mark.slow
@pytest.mark.parametrize("name, bits", [(name, bits) for name in TINY_MODELS for bits in (8, 4)])
def test_acceptance_teacher_then_qat_kd_student_then_int8_export(name, bits, digits_teachers, tmp_path):
    bundle, train, val, teacher_of = digits_teachers
    teacher, teacher_accuracy = teacher_of(name)
    recipe = Recipe(data={"name": "digits"}, quant={"weight_bits": bits, "act_bits": bits},
                    train={"epochs": ACCEPTANCE[name][1], "lr": 5e-4})
    result = qd.distill(teacher, train, val, recipe, show_progress=False)
    export = export_onnx(result.student, tmp_path / f"w{bits}.onnx", bundle.train_x[:1], verify_on=val)
    assert export["agreement_with_student"] >= 0.999
    if bits == 8:
        assert result.report["student"]["accuracy"] >= teacher_accuracy - 0.01
