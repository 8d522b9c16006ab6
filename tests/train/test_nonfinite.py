"""A loss that becomes NaN stops training with one line naming the step, and the last good weights are kept.

"Kept" is checked against an independent run: the same student trained on exactly the good steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill import models
from qdistill.errors import NonFiniteError
from qdistill.io import load_weights
from qdistill.train import CheckpointPlan

# constant lr and one calibration batch: a 2-batch and a 3-batch loader then train identically for 2 steps
RECIPE = {"data": {"name": "digits"}, "train": {"epochs": 1, "schedule": "constant"},
          "quant": {"calibration_batches": 1}}
BATCH = 32


class _Exploding(nn.Module):
    """Outputs NaN from training step ``nan_from`` on: a loss that becomes NaN mid-training."""

    def __init__(self, inner: nn.Module, nan_from: int) -> None:
        super().__init__()
        self.inner, self.calls, self.nan_from = inner, 0, nan_from

    def forward(self, x):
        out = self.inner(x)
        # count real training steps only (not torch.fx tracing, calibration or evaluation)
        if self.training and torch.is_grad_enabled() and isinstance(x, torch.Tensor):
            self.calls += 1
            if self.calls >= self.nan_from:
                return out * float("nan")
        return out


def _student(teacher: nn.Module, nan_from: int) -> nn.Module:
    student = _Exploding(models.create("mnist_cnn", in_channels=1, num_classes=10, image_size=8), nan_from)
    student.inner.load_state_dict(teacher.state_dict())
    return student


def _first_batches(bundle, count: int) -> DataLoader:
    samples = BATCH * count
    return DataLoader(TensorDataset(bundle.train_x[:samples], bundle.train_y[:samples]), batch_size=BATCH)


def test_nan_loss_error_names_step_and_part(digits, digits_teacher):
    bundle, _, val = digits
    with pytest.raises(NonFiniteError, match=r"step 2 \(epoch 1\): loss part 'total' became nan") as raised:
        qd.distill(digits_teacher, _first_batches(bundle, 3), val, RECIPE, student=_student(digits_teacher, 3),
                   show_progress=False)
    assert "last good step were kept" in str(raised.value) and "\n" not in str(raised.value)


def test_nan_step_keeps_the_weights_of_the_last_good_step(digits, digits_teacher, tmp_path):
    bundle, _, val = digits
    plan = CheckpointPlan(tmp_path / "checkpoint", "fingerprint", every_steps=1)
    with pytest.raises(NonFiniteError, match="step 2"):
        qd.distill(digits_teacher, _first_batches(bundle, 3), val, RECIPE, student=_student(digits_teacher, 3),
                   checkpoint=plan, show_progress=False)
    meta = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())
    assert meta["global_step"] == 2  # the two good steps; the NaN step wrote nothing
    kept = load_weights(tmp_path / "checkpoint" / "model.safetensors")
    # the reference: the same student trained on the two good batches only, never meeting a NaN
    reference = qd.distill(digits_teacher, _first_batches(bundle, 2), val, RECIPE,
                           student=_student(digits_teacher, 10**9), show_progress=False).student.state_dict()
    assert set(kept) == {f"student.{key}" for key in reference}
    for key, value in reference.items():
        assert torch.equal(kept[f"student.{key}"], value.cpu()), key
