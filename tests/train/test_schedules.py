"""Learning-rate schedules: ``lr_factor`` values by hand, and the lr that history logs is the one each epoch used."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qdistill.data import make_loader
from qdistill.recipe import TrainSpec
from qdistill.train import Supervised, fit, lr_factor

STEPS = 10  # steps per epoch in these cases


@pytest.mark.parametrize("schedule, step, expected", [
    ("constant", 37, 1.0),
    ("cosine", 0, 1.0),
    ("cosine", 15, 0.5 * (1 + math.cos(math.pi * 15 / 30))),
    ("cosine", 30, 0.0),
    ("linear", 12, 1 - 12 / 30),
    ("exponential", 20, 0.5 ** 2.0),
    ("exponential", 5, 0.5 ** 0.5),
    ("step", 19, 1.0),  # step_size 2 epochs: epochs 0 and 1 at full rate
    ("step", 20, 0.5),
])
def test_lr_factor_values(schedule, step, expected):
    spec = TrainSpec(epochs=3, schedule=schedule, gamma=0.5, step_size=2 if schedule == "step" else 1)
    assert lr_factor(step, STEPS, spec) == pytest.approx(expected)


def test_warmup_rises_linearly_then_follows_the_schedule():
    spec = TrainSpec(epochs=3, schedule="linear", warmup_epochs=1)
    assert [lr_factor(step, STEPS, spec) for step in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(20, STEPS, spec) == pytest.approx(1 - 10 / 20)


def test_history_logs_the_lr_each_epoch_used():
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    spec = TrainSpec(epochs=3, lr=0.1, optimizer="sgd", schedule="step", gamma=0.5, step_size=1)
    history = fit(Supervised(nn.Linear(4, 2)), make_loader(x, y, 10, seed=0, shuffle=True), spec, show_progress=False)
    assert [record["lr"] for record in history] == pytest.approx([0.1, 0.05, 0.025])
