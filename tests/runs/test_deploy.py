"""``qdistill export DIR``: exporting a saved run merges the export section into its report.json."""

from __future__ import annotations

import json

from qdistill.quant import prepare
from qdistill.recipe import Recipe
from qdistill.runs import Result
from qdistill.runs.deploy import export_directory


def test_export_directory_merges_into_report(digits, digits_teacher, tmp_path):
    bundle, train, _ = digits
    recipe = Recipe(data={"name": "digits", "batch_size": 32}, quant={"weight_bits": 4, "act_bits": 4, "init": "minmax"})
    student = prepare(digits_teacher, recipe.quant, calibration_data=train)
    Result(student, {"student": {"accuracy": 0.9}}, recipe, bundle.model_kwargs()).save(tmp_path)
    packed = export_directory(tmp_path, "packed")
    assert set(packed) == {"packed"}
    section = export_directory(tmp_path, "onnx", latency_budget_s=0.01)
    assert section["onnx"]["agreement_with_student"] >= 0.999
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["export"]) == {"onnx", "packed"} and report["student"] == {"accuracy": 0.9}
