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
