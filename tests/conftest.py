"""Shared fixtures: seeded torch, small digits loaders, a quickly trained tiny teacher."""

from __future__ import annotations

import os

import pytest
import torch

from qdistill import models
from qdistill.data import load_data, make_loaders
from qdistill.recipe import DataSpec, TrainSpec
from qdistill.train import Supervised, fit

# Two threads per test process; one per worker when pytest-xdist runs several (`make test-vision-slow`
# runs two workers on CI's two cores: two threads each would oversubscribe them).
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits (train/val/test split), as (bundle, train_loader, val_loader)."""
    bundle = load_data(DataSpec(name="digits", batch_size=32))
    train, val, _ = make_loaders(bundle, 32, 0)
    return bundle, train, val


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """The MNIST CNN trained 4 epochs on digits (about 95% validation accuracy)."""
    bundle, train, _ = digits
    torch.manual_seed(0)
    teacher = models.create("mnist_cnn", **bundle.model_kwargs())
    fit(Supervised(teacher), train, TrainSpec(epochs=4, lr=2e-3, schedule="constant"), phase="teacher",
        show_progress=False)
    return teacher.eval()
