"""Splitting one array into train, validation and test parts, and normalising with training statistics only.

The rules: the test part is set aside first (``data.test_fraction`` of all samples, or a built-in
data set's fixed test set); validation is ``data.val_fraction`` of what remains; the rest trains.
Every split must hold at least one sample.
"""

from __future__ import annotations

import numpy as np

from qdistill.errors import DataError

DEFAULT_TEST_FRACTION = 0.2


def fraction_size(total: int, fraction: float) -> int:
    """``round(total * fraction)``, at least 1.

    Example:
        >>> fraction_size(5000, 0.2), fraction_size(3, 0.1)
        (1000, 1)
    """
    return max(1, int(round(total * fraction)))


def set_aside(size: int, fraction: float, seed: int, source: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, part)``: ``fraction`` of ``size`` samples set aside, the last of a ``RandomState(seed)`` permutation.

    Example:
        >>> rest, part = set_aside(10, 0.2, seed=0, source="data", what="test")
        >>> len(rest), len(part), sorted([*rest, *part]) == list(range(10))
        (8, 2, True)
    """
    part_size = fraction_size(size, fraction)
    if part_size >= size:
        raise DataError(f"{source}: its {size} training samples are too few to set a {what} split aside; "
                        f"give a {what} split or more training samples")
    order = np.random.RandomState(seed).permutation(size)
    return order[: size - part_size], order[size - part_size:]


def split_indices(size: int, val_fraction: float, test_fraction: float | None, seed: int,
                  fixed_test: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, val, test)`` index arrays of a ``RandomState(seed)`` permutation.

    ``fixed_test`` (a built-in data set's own test indices) replaces the test fraction.

    Example:
        >>> train, val, test = split_indices(10, val_fraction=0.25, test_fraction=0.2, seed=0)
        >>> len(train), len(val), len(test), len(set(train) | set(val) | set(test))
        (6, 2, 2, 10)
    """
    if fixed_test is not None:
        test = np.asarray(fixed_test)
        rest = np.setdiff1d(np.arange(size), test)
        rest = rest[np.random.RandomState(seed).permutation(len(rest))]
    else:
        order = np.random.RandomState(seed).permutation(size)
        test_size = fraction_size(size, test_fraction or 0.0) if test_fraction else 0
        test, rest = order[size - test_size:], order[: size - test_size]
    val_size = fraction_size(len(rest), val_fraction)
    if len(test) == 0 or val_size >= len(rest):
        raise DataError(f"data: {size} samples are too few for a train, validation and test split "
                        f"(val_fraction {val_fraction}, test_fraction {test_fraction}); each split needs at least one "
                        "sample: give more data or other fractions")
    return rest[: len(rest) - val_size], rest[len(rest) - val_size:], test


def normalize(x: np.ndarray, mode: str, train_index: np.ndarray, known_range: tuple[float, float] | None) -> np.ndarray:
    """``none``: as stored; ``unit``: to [0, 1] (by the known pixel range, else the training split's
    min and max); ``standard``: zero mean, unit variance. Statistics come from the training split
    only, so validation and test stay unseen.

    Example:
        >>> normalize(np.array([0.0, 5.0, 10.0]), "unit", np.array([0, 2]), None).tolist()
        [0.0, 0.5, 1.0]
    """
    x = x.astype(np.float32)
    offset, divisor = normalization_params(x, mode, train_index, known_range)
    return x if offset is None else (x - offset) / divisor


def normalization_params(x: np.ndarray, mode: str, train_index: np.ndarray,
                         known_range: tuple[float, float] | None) -> tuple[float | None, float]:
    """``(offset, divisor)`` of ``normalize`` (``(None, 1.0)`` for ``none``), measured on the training split only.

    Unlabeled transfer data is normalised with the same two numbers as the training data.

    Example:
        >>> normalization_params(np.array([0.0, 5.0, 10.0], dtype=np.float32), "unit", np.array([0, 2]), None)
        (0.0, 10.0)
    """
    if mode == "standard":
        x = x.astype(np.float32)
        mean, std = x[train_index].mean(), x[train_index].std()
        return mean, max(float(std), 1e-8)
    if mode == "unit":
        low, high = known_range or (float(x[train_index].min()), float(x[train_index].max()))
        return low, max(high - low, 1e-8)
    return None, 1.0
