"""Each bad input raises a QdistillError subclass naming the field, the value and what is allowed,
before any training starts; a NaN loss stops training and keeps the last good weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill import models
from qdistill.errors import DataError, ModelError, NonFiniteError, RecipeError

RECIPE = {"data": {"name": "digits"}, "train": {"epochs": 1}}


def _loader(x, y=None, batch_size=16):
    tensors = (x,) if y is None else (x, y)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


@pytest.mark.parametrize("section, values, message", [
    ("quant", {"weight_bits": 9}, "quant.weight_bits: 9"),
    ("quant", {"act_bits": 1}, "quant.act_bits: 1"),
    ("distill", {"temperature": 0}, "distill.temperature: 0"),
    ("distill", {"temperature": -2.0}, "distill.temperature: -2.0"),
    ("distill", {"alpha": 1.5}, "distill.alpha: 1.5"),
    ("train", {"epochs": 0}, "train.epochs: 0"),
])
def test_recipe_values_out_of_range(section, values, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")) as raised:
        qd.Recipe(**{section: values})
    assert "\n" not in str(raised.value)


def test_output_shapes_differ(digits, digits_teacher):
    _, train, val = digits
    student = models.create("mnist_cnn", in_channels=1, num_classes=7, image_size=8)
    with pytest.raises(ModelError, match=r"teacher outputs shape \(32, 10\) but student outputs \(32, 7\)"):
        qd.distill(digits_teacher, train, val, RECIPE, student=student, show_progress=False)


def test_labels_outside_classes(digits, digits_teacher):
    bundle, _, val = digits
    labels = bundle.train_y.clone()
    labels[5] = 12
    with pytest.raises(DataError, match="label 12 is outside the model's 10 classes; allowed: 0..9"):
        qd.distill(digits_teacher, _loader(bundle.train_x, labels), val, RECIPE, show_progress=False)


def test_empty_loader(digits, digits_teacher):
    _, _, val = digits
    empty = _loader(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="no batches"):
        qd.distill(digits_teacher, empty, val, RECIPE, show_progress=False)


def test_nan_inputs(digits, digits_teacher):
    bundle, _, val = digits
    x = bundle.train_x.clone()
    x[40, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="NaN or Inf"):
        qd.distill(digits_teacher, _loader(x, bundle.train_y), val, RECIPE, show_progress=False)


def test_wrong_input_shape(digits, digits_teacher):
    _, _, val = digits
    wrong = _loader(torch.rand(64, 3, 8, 8), torch.zeros(64, dtype=torch.long))
    with pytest.raises(DataError, match=r"inputs of shape \(16, 3, 8, 8\) do not fit the teacher"):
        qd.distill(digits_teacher, wrong, val, RECIPE, show_progress=False)


class _Exploding(nn.Module):
    """Outputs NaN from the third training call on: a loss that becomes NaN mid-training."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        out = self.inner(x)
        # count real training steps only (not torch.fx tracing, calibration or evaluation)
        if self.training and torch.is_grad_enabled() and isinstance(x, torch.Tensor):
            self.calls += 1
            if self.calls >= 3:
                return out * float("nan")
        return out


def test_nan_loss_stops_with_clear_error_and_keeps_weights(digits, digits_teacher):
    _, train, val = digits
    student = _Exploding(models.create("mnist_cnn", in_channels=1, num_classes=10, image_size=8))
    student.inner.load_state_dict(digits_teacher.state_dict())
    with pytest.raises(NonFiniteError, match=r"step 2 \(epoch 1\): loss part 'total' became nan") as raised:
        qd.distill(digits_teacher, train, val, RECIPE, student=student, show_progress=False)
    assert "last good step were kept" in str(raised.value)


def test_nan_keeps_last_good_checkpoint_newest(digits, digits_teacher, tmp_path):
    import json

    from qdistill.train import CheckpointPlan

    _, train, val = digits
    student = _Exploding(models.create("mnist_cnn", in_channels=1, num_classes=10, image_size=8))
    student.inner.load_state_dict(digits_teacher.state_dict())
    plan = CheckpointPlan(tmp_path / "checkpoint", "fingerprint", every_steps=1)
    with pytest.raises(NonFiniteError, match="step 2"):
        qd.distill(digits_teacher, train, val, RECIPE, student=student, checkpoint=plan, show_progress=False)
    meta = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())
    assert meta["global_step"] == 2  # the two good steps; the NaN step wrote nothing
    from qdistill.io import load_weights

    assert all(torch.isfinite(t).all() for t in load_weights(tmp_path / "checkpoint" / "model.safetensors").values()
               if t.is_floating_point())
