"""Every shipped recipe runs end to end through the real command (shortened: one epoch each, exports on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qdistill.cli import main

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
SHORT = ["train.epochs=1", "teacher_train.epochs=1"]


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_shipped_recipe_runs_end_to_end(path, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), "--no-progress", *SHORT])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["evaluated_on"] == "test" and 0.0 <= report["student"]["accuracy"] <= 1.0
    for name in ("student.safetensors", "recipe.yaml", "report.html"):
        assert (out / name).is_file(), name
    if report["recipe"]["export"]["onnx"]:
        assert report["export"]["onnx"]["agreement_with_student"] >= 0.999
