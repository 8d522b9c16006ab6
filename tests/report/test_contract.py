"""report.json fields say what they are."""

from __future__ import annotations

import qdistill as qd


def test_student_bits_are_the_per_layer_summary_not_the_recipe_value(digits, digits_teacher):
    _, train, val = digits
    recipe = {"train": {"epochs": 1}, "quant": {"weight_bits": 4, "act_bits": 4, "first_last_bits": 8}}
    student = qd.distill(digits_teacher, train, val, recipe, show_progress=False).report["student"]
    layers = student["per_layer"]
    weight_bits = [row["weight_bits"] for row in layers.values() if row["weight_bits"] is not None]
    assert student["weight_bits"]["min"] == min(weight_bits) == 4
    assert student["weight_bits"]["max"] == max(weight_bits) == 8
    assert sum(student["weight_bits"]["histogram"].values()) == len(weight_bits) == 4
    assert student["act_bits"]["histogram"] == {"4": 2, "8": 2}  # conv1 and fc2 at 8 (first/last), the rest at 4
