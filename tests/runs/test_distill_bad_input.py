"""Each bad input raises a QdistillError subclass naming the field, the value and what is allowed,
before any training starts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill import models
from qdistill.errors import DataError, ModelError, RecipeError

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


def test_relation_weight_needs_an_embedding_output(digits, digits_teacher):
    _, train, val = digits
    recipe = {**RECIPE, "distill": {"relation_weight": 10.0}}
    with pytest.raises(RecipeError, match="distill.relation_weight: similarity-relation KD goes with embedding") as raised:
        qd.distill(digits_teacher, train, val, recipe, show_progress=False)
    assert "\n" not in str(raised.value)
