"""A small demo (digits, one epoch per student) shared by the demo-page and browser tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdistill.recipe import Recipe
from qdistill.runs import demo

RUNS = ("w8a8_kd", "w8a8_qat", "w2a2_kd")


def _small_recipe(quick: bool) -> Recipe:
    return Recipe(model={"name": "mnist_cnn"}, data={"name": "digits", "batch_size": 32},
                  quant={"weight_bits": 8, "act_bits": 8, "first_last_bits": 8}, distill={"alpha": 0.9},
                  train={"epochs": 1}, teacher_train={"epochs": 2, "lr": 2.0e-3, "schedule": "constant"},
                  export={"onnx": False, "packed": True})


def _small_runs(base: Recipe) -> list[tuple[str, Recipe]]:
    return [("w8a8_kd", base.with_overrides(["export.onnx=true"])),  # one run with ONNX export and latency
            ("w8a8_qat", base.with_overrides(["distill.alpha=0.0"])),
            ("w2a2_kd", base.with_overrides(["quant.weight_bits=2", "quant.act_bits=2"]))]


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> tuple[Path, list[dict]]:
    """``run_demo`` with the digits data and three one-epoch students; returns (folder, demo.json rows)."""
    out = tmp_path_factory.mktemp("small_demo") / "demo"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "demo_recipe", _small_recipe)
        patch.setattr(demo, "demo_runs", _small_runs)
        rows = demo.run_demo(out, quick=True, show_progress=False, echo=lambda *args: None)
    return out, rows
