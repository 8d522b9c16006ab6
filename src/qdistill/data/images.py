"""Decoding image files: PIL, in DataLoader workers, resized to a square, normalised, augmented deterministically.

Every image becomes a ``(3, size, size)`` float tensor: decoded as RGB, its centre square resized
to ``size`` (the same as resizing the shorter side and cropping the centre), scaled to [0, 1] and
normalised per channel. Training images may be augmented (``augment: standard``: torchvision's
RandomResizedCrop, scale 0.08-1 and aspect ratio 3/4-4/3, then a horizontal flip half of the time);
the random numbers come from ``(seed, epoch, index)``, so a resumed run, any number of workers and
any batch order see the same pixels. Only Pillow is needed, not torchvision.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from qdistill.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class ImageDecodeError(DataError):
    """A file that is not a readable image; its message stays one line when a DataLoader worker re-raises it.

    (torch re-raises a worker's error as ``type(error)(traceback text)``; this keeps the last line's message.)

    Example:
        >>> str(ImageDecodeError("Caught ImageDecodeError in worker.\\nTraceback ...\\nImageDecodeError: bad.png"))
        'bad.png'
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(pixel / 255 - mean) / std``.

    Example:
        >>> Normalization.named("unit").apply(np.full((1, 1, 3), 255.0, dtype=np.float32)).tolist()
        [[[1.0]], [[1.0]], [[1.0]]]
    """

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def named(cls, mode: str) -> Normalization:
        """``none`` (pixels 0..255 as they are), ``unit`` ([0, 1]) or ``imagenet``; ``standard`` needs statistics."""
        if mode == "imagenet":
            return cls(IMAGENET_MEAN, IMAGENET_STD)
        return cls((0.0,) * 3, (1 / 255,) * 3) if mode == "none" else cls()

    def apply(self, pixels: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` pixels 0..255 -> ``(3, H, W)`` normalised float32."""
        unit = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32).transpose(2, 0, 1)) / 255.0
        return (unit - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)


def open_rgb(path: str | Path) -> Image.Image:
    """The decoded image as RGB; anything unreadable is a one-line ``ImageDecodeError`` naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageDecodeError(f"data.image_folder: cannot decode {str(path)!r} ({reason}); replace or remove the file") from None


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centre square of an image, ``(left, top, right, bottom)``.

    Example:
        >>> centre_box(10, 6)
        (2, 0, 8, 6)
    """
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def random_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: 8-100 % of the area, aspect ratio 3/4-4/3 (10 tries, then the centre).

    Example:
        >>> left, top, right, bottom = random_box(32, 32, np.random.default_rng(0))
        >>> 0 <= left < right <= 32 and 0 <= top < bottom <= 32
        True
    """
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        crop_width, crop_height = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left, top = int(rng.integers(0, width - crop_width + 1)), int(rng.integers(0, height - crop_height + 1))
            return left, top, left + crop_width, top + crop_height
    crop_width = min(width, round(height * CROP_RATIO[1]))
    crop_height = min(height, round(width / CROP_RATIO[0]))
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def decode_image(path: str | Path, size: int, normalization: Normalization,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
    """One image as a ``(3, size, size)`` tensor; with ``rng``, randomly cropped and flipped (augmentation)."""
    image = open_rgb(path)
    box = centre_box(*image.size) if rng is None else random_box(*image.size, rng)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if rng is not None and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return normalization.apply(np.asarray(image))


class LazyImages:
    """The images of one split, decoded when indexed: stands in for an input tensor ``(N, 3, size, size)``.

    ``len``, ``shape`` and indexing (``images[0]``, ``images[:2]``) work as on a tensor, so code that
    looks at ``bundle.train_x`` works for image folders too. ``augment`` and ``workers`` say how a
    loader over this split decodes (``data.loaders.make_loader``).

    Example:
        >>> images = LazyImages(["a.png", "b.png"], 32, Normalization())
        >>> len(images), images.shape, images[[]].shape
        (2, (2, 3, 32, 32), torch.Size([0, 3, 32, 32]))
    """

    def __init__(self, files: list[str], size: int, normalization: Normalization, augment: bool = False,
                 workers: int = 0) -> None:
        self.files, self.size, self.normalization = list(files), size, normalization
        self.augment, self.workers = augment, workers

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.files), 3, self.size, self.size

    def decode(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Image ``index`` as ``(3, size, size)`` (augmented when ``rng`` is given)."""
        return decode_image(self.files[index], self.size, self.normalization, rng)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """One image ``(3, size, size)`` for an integer; a batch ``(n, 3, size, size)`` for a slice or indices."""
        if isinstance(index, slice):
            index = range(len(self))[index]
        elif not isinstance(index, (Sequence, np.ndarray, torch.Tensor)) or getattr(index, "ndim", 1) == 0:
            return self.decode(operator.index(index))
        picked = [operator.index(i) for i in index]
        return torch.stack([self.decode(i) for i in picked]) if picked else torch.empty(0, 3, self.size, self.size)


class ImageDataset(Dataset):
    """``(image, label)`` samples of a ``LazyImages`` split (``(image,)`` without labels), decoded on access.

    A sample is a fixed function of ``(seed, epoch, index)``: ``data.loaders.AugmentSampler`` passes ``(epoch,
    index)`` keys, a plain index means epoch 0. Without augmentation it depends on the index alone
    (``deterministic``), which lets the teacher-logit cache apply.

    Example:
        >>> ImageDataset(LazyImages(["a.png"], 8, Normalization()), None, seed=0).deterministic
        True
    """

    def __init__(self, images: LazyImages, labels: torch.Tensor | None, seed: int) -> None:
        self.images, self.labels, self.seed = images, labels, seed

    @property
    def deterministic(self) -> bool:
        return not self.images.augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index]) if self.images.augment else None
        image = self.images.decode(index, rng)
        return (image,) if self.labels is None else (image, self.labels[index])


# ---- augmentation of in-memory image tensors (mnist5k, npz/factory images): ``data.augment`` ----

TENSOR_AUGMENTS = ("shift", "standard")
SHIFT_PIXELS = 2  # translation, both modes: up to 2 pixels each way (7 % of a 28-pixel digit)
ROTATE_DEGREES = 10.0  # ``standard`` only: rotation up to 10 degrees each way ...
SCALE_RANGE = (0.9, 1.1)  # ... and a zoom of 0.9-1.1; no flip (digits and letters are not mirror-symmetric)
_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64: a well-mixed hash, so counters become random bits."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices: Sequence[int], count: int) -> np.ndarray:
    """``count`` uniform numbers in [0, 1) per sample, a fixed function of ``(seed, epoch, index)``: ``(n, count)``.

    Counter-based (a hash of the key), so a sample's numbers do not depend on the batch it is in,
    the batch order, the worker or a resume.

    Example:
        >>> a = sample_uniforms(0, 1, [5, 9], 3)
        >>> b = sample_uniforms(0, 1, [9], 3)
        >>> a.shape, bool((a[1] == b[0]).all()), bool(((0 <= a) & (a < 1)).all())
        ((2, 3), True, True)
    """
    key = (int(seed) * 1_000_003 + int(epoch)) & _MASK64
    base = _splitmix64(np.full(len(indices), key, dtype=np.uint64))
    with np.errstate(over="ignore"):
        counters = (base ^ _splitmix64(np.asarray(indices, dtype=np.uint64)))[:, None] * np.uint64(count) \
            + np.arange(count, dtype=np.uint64)[None, :]
    return (_splitmix64(_splitmix64(counters)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def augment_images(x: torch.Tensor, uniforms: np.ndarray, mode: str) -> torch.Tensor:
    """Randomly translate (``shift``), or translate, rotate and zoom (``standard``), a batch ``(n, C, H, W)``.

    ``uniforms`` holds each sample's random numbers (``sample_uniforms(..., 4)``). Pixels that move
    in from outside repeat the edge (the background of a centred digit, whatever the normalisation).
    ``shift`` moves by whole pixels, so every pixel is an input pixel.

    Example:
        >>> x = torch.zeros(1, 1, 8, 8); x[0, 0, 4, 4] = 1.0
        >>> moved = augment_images(x, np.array([[1.0 - 1e-9, 0.5, 0.5, 0.5]]), "shift")   # 2 pixels right
        >>> torch.nonzero(moved[0, 0]).tolist(), float(moved.sum())
        ([[4, 6]], 1.0)
    """
    n, _, height, width = x.shape
    u = torch.from_numpy(uniforms).to(torch.float64)
    dx = torch.floor(u[:, 0] * (2 * SHIFT_PIXELS + 1)) - SHIFT_PIXELS  # whole pixels in -2..2
    dy = torch.floor(u[:, 1] * (2 * SHIFT_PIXELS + 1)) - SHIFT_PIXELS
    angle = torch.zeros(n, dtype=torch.float64)
    scale = torch.ones(n, dtype=torch.float64)
    if mode == "standard":
        angle = (2 * u[:, 2] - 1) * math.radians(ROTATE_DEGREES)
        scale = SCALE_RANGE[0] + u[:, 3] * (SCALE_RANGE[1] - SCALE_RANGE[0])
    # the output pixel at p samples the input at R(-angle) p / scale - shift (grid coordinates in [-1, 1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, -2 * dx / width], 1), torch.stack([sin, cos, -2 * dy / height], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    resample = "nearest" if mode == "shift" else "bilinear"
    return torch.nn.functional.grid_sample(x, grid, mode=resample, padding_mode="border", align_corners=False)


class AugmentedTensorDataset(Dataset):
    """In-memory image tensors ``(N, C, H, W)`` (with optional labels), augmented per ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs (``data.loaders.AugmentSampler``) or plain indices (epoch 0).
    Batches are fetched whole (``__getitems__``) and augmented in one ``grid_sample``. Never
    ``deterministic``: the teacher-logit cache does not apply, so the teacher sees the student's
    augmented batch.

    Example:
        >>> data = AugmentedTensorDataset(torch.rand(4, 1, 8, 8), torch.arange(4), seed=0, mode="shift")
        >>> x, y = data[(3, 1)]
        >>> tuple(x.shape), int(y), data.deterministic
        ((1, 8, 8), 1, False)
    """

    deterministic = False

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None, seed: int, mode: str) -> None:
        if mode not in TENSOR_AUGMENTS:
            raise DataError(f"data.augment: {mode!r} is not an augmentation of image tensors; allowed: none, "
                            f"{', '.join(TENSOR_AUGMENTS)}")
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"data.augment: {mode} needs float images (N, channels, height, width), but the inputs are "
                            f"{shape}; use augment: none for this data")
        self.x, self.labels, self.seed, self.mode = x, labels, seed, mode

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[tuple[torch.Tensor, ...]]:
        pairs = [key if isinstance(key, tuple) else (0, key) for key in keys]
        indices = [index for _, index in pairs]
        uniforms = np.concatenate([sample_uniforms(self.seed, epoch, [index], 4) for epoch, index in pairs]) \
            if len({epoch for epoch, _ in pairs}) > 1 else sample_uniforms(self.seed, pairs[0][0], indices, 4)
        images = augment_images(self.x[indices], uniforms, self.mode)
        if self.labels is None:
            return [(image,) for image in images]
        return list(zip(images, self.labels[indices], strict=True))
