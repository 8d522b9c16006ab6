"""``teacher_train.bn_recalibration_batches``: BatchNorm statistics re-estimated with the final weights."""

from __future__ import annotations

import torch
from torch import nn

from qdistill.train.batchnorm import recalibrate_batchnorm


def test_statistics_equal_the_population_statistics_of_the_batches_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=0.01), nn.ReLU(), nn.Conv2d(3, 2, 1),
                          nn.BatchNorm2d(2)).eval()
    batches = [(torch.randn(6, 2, 5, 5) * 3 + 1, torch.zeros(6)) for _ in range(5)]
    assert recalibrate_batchnorm(model, batches, 3) == 2
    seen = torch.cat([inputs for inputs, _ in batches[:3]])
    with torch.no_grad():  # independent reference: each norm's input over the three batches, statistics by hand
        first = model[0](seen)
        per_batch = first.reshape(3, 6, 3, 3, 3)
    expected_mean = first.mean(dim=(0, 2, 3))
    expected_var = torch.stack([part.transpose(0, 1).reshape(3, -1).var(dim=1) for part in per_batch]).mean(0)
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, expected_var, atol=1e-5)
    assert model[1].momentum == 0.01 and model[4].momentum == 0.1  # restored
    assert not model.training  # left in the mode it was in
    weights = [parameter.clone() for parameter in model.parameters()]
    recalibrate_batchnorm(model, batches, 3)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_no_batches_or_no_norms_change_nothing():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    before = model[1].running_mean.clone()
    assert recalibrate_batchnorm(model, [torch.randn(4, 2)], 0) == 0
    assert torch.equal(model[1].running_mean, before)
    assert recalibrate_batchnorm(nn.Linear(2, 2), [torch.randn(4, 2)], 5) == 0
