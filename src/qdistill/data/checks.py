"""Checking input arrays and labels before any training: one-line ``DataError`` naming the source and the problem."""

from __future__ import annotations

import numpy as np

from qdistill.errors import DataError


def check_arrays(x: np.ndarray, y: np.ndarray | None, source: str) -> None:
    """Reject empty, non-numeric, non-finite inputs and bad labels before any training."""
    if x.size == 0 or len(x) == 0:
        raise DataError(f"{source}: the inputs are empty; at least one sample is needed")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{source}: inputs have dtype {x.dtype}; allowed: real integer or float arrays")
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise DataError(f"{source}: inputs contain {bad} NaN or Inf values; all inputs must be finite")
    if y is None:
        return
    if len(y) != len(x):
        raise DataError(f"{source}: {len(x)} inputs but {len(y)} labels; they must match one to one")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels have dtype {y.dtype} and shape {y.shape}; allowed: 1-D integer class indices")
    if y.min() < 0:
        raise DataError(f"{source}: label {int(y.min())} is negative; labels must be class indices 0..C-1")
