"""``train.tensorboard`` / ``qdistill run --tensorboard``: event files under DIR/tb/ whose scalars are
report.json's history and step sizes; without the extra, a one-line error naming it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qdistill.cli import main
from qdistill.recipe import Recipe
from qdistill.runs.recipe_run import run_recipe
from qdistill.runs.student import distill

RECIPE = Path(__file__).parents[2] / "recipes" / "digits_w8a8.yaml"


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of ``folder``, read back with TensorBoard's own reader."""
    accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = accumulator_module.EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))  # event files store float32


def test_scalars_equal_the_report_history_and_step_sizes(tmp_path):
    pytest.importorskip("tensorboard")
    recipe = Recipe.from_yaml(RECIPE).with_overrides(["train.epochs=2", "teacher_train.epochs=1", "train.tensorboard=true",
                                                      "export.onnx=false", "export.packed=false"])
    run_recipe(recipe, tmp_path / "run", show_progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    scalars = _scalars(tmp_path / "run" / "tb")
    history = report["history"]
    for key, tag in (("loss", "loss/total"), ("kd_loss", "loss/kd"), ("task_loss", "loss/task"),
                     ("val_accuracy", "accuracy/validation"), ("lr", "learning_rate")):
        assert scalars[tag] == [(row["epoch"], _float32(row[key])) for row in history], tag
    for layer, row in report["student"]["per_layer"].items():  # the last epoch's step sizes are the trained student's
        assert scalars[f"step_size/{layer}/weight"][-1] == (len(history), _float32(row["weight_step"]["mean"]))
        assert scalars[f"step_size/{layer}/act"][-1] == (len(history), _float32(row["act_step"]["mean"]))
    assert len(report["student"]["per_layer"]) == 4


def test_no_tensorboard_folder_unless_asked(tmp_path, digits, digits_teacher):
    _, train, val = digits
    distill(digits_teacher, train, val, {"train": {"epochs": 1}}, show_progress=False, tensorboard_dir=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_missing_extra_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    out = tmp_path / "run"
    code = main(["run", str(RECIPE), "--out", str(out), "--no-progress", "--tensorboard"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert error.startswith("error: train.tensorboard") and "pip install 'qdistill[tensorboard]'" in error
    assert not out.exists()  # checked before any folder or training
