"""Metrics against independent references: macro averages over the classes present, parameter counts by type."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from qdistill.evaluate import classification_metrics, count_params
from qdistill.quant import prepare


def test_classes_absent_from_the_labels_are_left_out_of_macro_averages():
    labels = np.array([0, 0, 1, 1, 1, 3])
    predictions = np.array([0, 1, 1, 1, 2, 3])  # class 2 is predicted once but has no sample
    with pytest.warns(UserWarning, match=r"classes \[2\] have no sample"):
        metrics = classification_metrics(predictions, labels, num_classes=4)
    recall = {0: 1 / 2, 1: 2 / 3, 3: 1.0}  # by hand, present classes only
    precision = {0: 1.0, 1: 2 / 3, 3: 1.0}
    f1 = {c: 2 * precision[c] * recall[c] / (precision[c] + recall[c]) for c in recall}
    assert metrics["recall_macro"] == pytest.approx(np.mean(list(recall.values())))
    assert metrics["precision_macro"] == pytest.approx(np.mean(list(precision.values())))
    assert metrics["f1_macro"] == pytest.approx(np.mean(list(f1.values())))
    assert metrics["absent_classes"] == [2]
    assert metrics["per_class"][2]["support"] == 0


def test_no_warning_when_every_class_is_present():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(np.array([0, 1]), np.array([0, 1]), num_classes=2)
    assert metrics["absent_classes"] == [] and metrics["f1_macro"] == 1.0


class _LayerScale(nn.Module):
    """A per-channel multiplier whose parameter is called ``scale`` (as in ConvNeXt's layer scale); after a
    ReLU, so ``prepare`` cannot fold it into the linear layer and the student keeps it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return torch.relu(self.fc(x)) * self.scale


def test_parameter_count_tells_quantizer_steps_by_type_not_by_name():
    model = nn.Sequential(nn.Flatten(), _LayerScale(6), nn.Linear(6, 3))
    weights = (6 * 6 + 6) + 6 + (6 * 3 + 3)  # by hand: fc, the layer scale, the head
    assert count_params(model) == weights
    assert count_params(prepare(model, {"weight_bits": 8, "act_bits": 8})) == weights
