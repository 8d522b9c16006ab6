"""Feature (hint) distillation: adapters for mismatched widths, its own loss part, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill import models
from qdistill.data import load_data, make_loaders
from qdistill.errors import ModelError
from qdistill.kd import Distiller, KDLoss
from qdistill.quant import prepare
from qdistill.recipe import DataSpec, FeatureHint, Recipe

W8 = {"weight_bits": 8, "act_bits": 8, "init": "minmax", "calibration_batches": 1}
IMAGES = torch.rand(8, 1, 8, 8)


@pytest.fixture(scope="module")
def small_digits():
    bundle = load_data(DataSpec(name="digits", limit=256))
    train, val, _ = make_loaders(bundle, 32, 0)
    return bundle, train, val


def _distiller(teacher: nn.Module, student: nn.Module, *hints: FeatureHint) -> Distiller:
    return Distiller(teacher.eval(), prepare(student, W8, calibration_data=[IMAGES]), KDLoss(4.0, 0.9), hints,
                     example_input=IMAGES)


def test_mismatched_conv_widths_get_a_1x1_adapter_and_their_own_loss_part():
    teacher, student = models.create("tiny_resnet", width=8), models.create("tiny_resnet", width=4)
    distiller = _distiller(teacher, student, FeatureHint(student="layer3", teacher="layer3", weight=2.0))
    adapter = distiller.adapters["layer3"]
    assert isinstance(adapter, nn.Conv2d) and adapter.kernel_size == (1, 1)
    assert (adapter.in_channels, adapter.out_channels) == (16, 32)
    parts = distiller(IMAGES, torch.randint(0, 10, (8,)))
    assert set(parts.items()) == {"total", "kd", "task", "feature:layer3"}
    expected = 0.9 * parts.kd + 0.1 * parts.task + 2.0 * parts.features["layer3"]
    assert torch.allclose(parts.total, expected)
    parts.total.backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0


def test_mismatched_sequence_widths_get_a_linear_adapter():
    teacher = models.create("tiny_transformer", dim=16, heads=2)
    student = models.create("tiny_transformer", dim=8, heads=2)
    distiller = _distiller(teacher, student, FeatureHint(student="encoder.1", teacher="encoder.1"))
    adapter = distiller.adapters["encoder_1"]
    assert isinstance(adapter, nn.Linear) and (adapter.in_features, adapter.out_features) == (8, 16)
    assert torch.isfinite(distiller(IMAGES).features["encoder.1"])


def test_same_widths_need_no_adapter():
    distiller = _distiller(models.create("tiny_mlp"), models.create("tiny_mlp"), FeatureHint(student="net.4", teacher="net.4"))
    assert isinstance(distiller.adapters["net_4"], nn.Identity)


def test_feature_distillation_with_mismatched_widths_lowers_the_feature_loss(small_digits):
    bundle, train, val = small_digits
    torch.manual_seed(0)
    teacher = models.create("tiny_resnet", width=8, **bundle.model_kwargs())
    recipe = Recipe(data={"name": "digits"}, quant=W8, train={"epochs": 2, "lr": 3e-3},
                    distill={"features": [{"student": "layer3", "teacher": "layer3", "weight": 1.0}]})
    result = qd.distill(teacher, train, val, recipe, show_progress=False,
                        student=models.create("tiny_resnet", width=4, **bundle.model_kwargs()))
    losses = [row["feature:layer3_loss"] for row in result.report["history"]]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]  # the student's layer3 (through the adapter) moves towards the teacher's
    assert result.report["student"]["params"] < result.report["teacher"]["params"]


@pytest.mark.parametrize("student_name, teacher_name, role", [("layer9", "layer3", "student"), ("layer3", "nope", "teacher")])
def test_unknown_layer_names_list_the_available_ones(student_name, teacher_name, role):
    with pytest.raises(ModelError, match=rf"distill.features: {role} layer '{student_name if role == 'student' else teacher_name}' "
                                         r"does not exist; available: stem, stem\.0.*layer3"):
        _distiller(models.create("tiny_resnet", width=8), models.create("tiny_resnet", width=4),
                   FeatureHint(student=student_name, teacher=teacher_name))


def test_layers_of_different_spatial_size_are_refused():
    with pytest.raises(ModelError, match="spatial sizes differ"):
        _distiller(models.create("tiny_resnet", width=8), models.create("tiny_resnet", width=4),
                   FeatureHint(student="layer3", teacher="layer1"))
