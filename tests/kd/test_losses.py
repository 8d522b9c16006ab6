"""KD loss against hand-computed values and F.kl_div."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qdistill.errors import RecipeError
from qdistill.kd import KDLoss


def test_kd_loss_hand_computed():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0]])
    temperature, alpha = 2.0, 0.75
    p_t = [math.exp(0) / (math.exp(0) + math.exp(0.5)), math.exp(0.5) / (math.exp(0) + math.exp(0.5))]
    p_s = [math.exp(0.5) / (math.exp(0.5) + math.exp(0)), math.exp(0) / (math.exp(0.5) + math.exp(0))]
    kl = sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t, p_s, strict=True))
    ce = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))  # label 0
    parts = KDLoss(temperature, alpha)(student, teacher, torch.tensor([0]))
    assert parts.kd.item() == pytest.approx(kl * temperature**2, rel=1e-6)
    assert parts.task.item() == pytest.approx(ce, rel=1e-6)
    assert parts.total.item() == pytest.approx(alpha * kl * 4 + (1 - alpha) * ce, rel=1e-6)


def test_kd_loss_matches_kl_div_reference():
    torch.manual_seed(1)
    student, teacher = torch.randn(16, 10), torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    reference = F.kl_div(F.log_softmax(student / 4, dim=1), F.softmax(teacher / 4, dim=1), reduction="batchmean") * 16
    parts = KDLoss(4.0, 0.9)(student, teacher, labels)
    torch.testing.assert_close(parts.kd, reference)
    torch.testing.assert_close(parts.total, 0.9 * reference + 0.1 * F.cross_entropy(student, labels))


def test_label_free_uses_kd_only():
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    parts = KDLoss(4.0, 0.5)(student, teacher, None)
    torch.testing.assert_close(parts.total, parts.kd)
    assert parts.task.item() == 0.0


def test_zero_kd_loss_for_identical_logits():
    logits = torch.randn(8, 5)
    assert KDLoss()(logits, logits.clone(), None).kd.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature, alpha, message", [(0.0, 0.5, "temperature"), (-1.0, 0.5, "temperature"),
                                                         (4.0, 1.5, "alpha"), (4.0, -0.1, "alpha")])
def test_bad_kd_settings(temperature, alpha, message):
    with pytest.raises(RecipeError, match=message):
        KDLoss(temperature, alpha)
