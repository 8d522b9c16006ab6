"""report.json's per-layer step sizes are the trained student's quantizer scales (and every older key stays)."""

from __future__ import annotations

import numpy as np
import pytest

import qdistill as qd


def test_per_layer_step_sizes_are_the_quantizer_scales(digits, digits_teacher):
    _, train, val = digits
    recipe = {"train": {"epochs": 1}, "quant": {"weight_bits": 4, "act_bits": 4, "first_last_bits": 8}}
    result = qd.distill(digits_teacher, train, val, recipe, show_progress=False)
    modules = dict(result.student.named_modules())
    per_layer = result.report["student"]["per_layer"]
    assert len(per_layer) == 4
    for name, row in per_layer.items():
        weight = modules[name].weight_quantizer.scale.detach().numpy()
        act = modules[name].input_quantizer.scale.detach().numpy()
        assert weight.size > 1  # per channel: min, mean and max differ
        assert row["weight_step"] == pytest.approx({"min": weight.min(), "mean": np.mean(weight, dtype=np.float64),
                                                    "max": weight.max()}, rel=1e-6)
        assert row["act_step"] == pytest.approx({"min": act.min(), "mean": act.mean(), "max": act.max()}, rel=1e-6)
        assert {"weight_bits", "act_bits"} <= set(row)
    assert per_layer["features.0"]["weight_bits"] == 8 and per_layer["features.3"]["weight_bits"] == 4
