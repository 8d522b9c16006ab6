"""Per-layer sensitivity (one layer changed on a calibrated reference) agrees with preparing the whole
student again with only that layer's width overridden (the independent reference)."""

from __future__ import annotations

import torch

from qdistill import models
from qdistill.kd import KDLoss
from qdistill.quant import prepare
from qdistill.recipe import Recipe
from qdistill.runs.sensitivity import layer_sensitivity, widest_spec

WEIGHTS, ACTS = [2, 8], [4, 8]  # few widths: each is a forward pass per layer


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(count)]


def _kd(student, teacher, batches, recipe) -> float:
    loss = KDLoss(recipe.distill.temperature, recipe.distill.alpha)
    with torch.no_grad():
        return sum(loss(student(x), teacher(x), y).total.item() * len(x) for x, y in batches) / sum(len(x) for x, _ in batches)


def test_rise_matches_a_full_prepare_with_one_override():
    torch.manual_seed(0)
    teacher = models.create("tiny_resnet", width=8).eval()
    recipe = Recipe(quant={"calibration_batches": 2})
    data = _batches(3)  # 2 calibrate, 1 held out
    section = layer_sensitivity(teacher, teacher, recipe, data, WEIGHTS, ACTS, batches=1)
    held_out = data[2:]
    assert section["batches"] == 1 and section["samples"] == 16

    def full(overrides=None) -> float:
        student = prepare(teacher, widest_spec(recipe.quant, WEIGHTS, ACTS, overrides), calibration_data=data[:2])
        return _kd(student.eval(), teacher, held_out, recipe)

    reference = full()
    assert section["reference_kd_loss"] == reference
    for name, key, bits in (("layer2.0.conv1", "weight_bits", 2), ("fc", "weight_bits", 2), ("layer2.0.conv2", "act_bits", 4)):
        expected = full({name: {key: bits}}) - reference
        measured = section["layers"][name]["weight" if key == "weight_bits" else "act"][str(bits)]
        # the full prepare also recalibrates the layers after the changed one; the rise must agree closely
        assert abs(measured - expected) <= 0.1 * abs(expected) + 1e-6, (name, key, bits, measured, expected)
    assert section["layers"]["layer1.0.add"]["params"] is None and "weight" not in section["layers"]["layer1.0.add"]
    assert set(section["layers"]["layer1.0.add"]["act"]) == {"4", "8"}
