"""Small image folders written from scikit-learn's digits: real images, made in a temporary folder in a second.

Each 8x8 digit (0..16) becomes an RGB PNG, upscaled by ``scale`` (nearest neighbour), with the
digit in red and green and its negative in blue, so the three channels differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def digit_pixels(count_per_class: int = 20, scale: int = 2) -> list[tuple[int, np.ndarray]]:
    """``(label, (8*scale, 8*scale, 3) uint8 pixels)`` for the first ``count_per_class`` digits of each class."""
    digits = load_digits()
    samples = []
    for label in range(10):
        for image in digits.images[digits.target == label][:count_per_class]:
            gray = np.kron(image * 255 / 16, np.ones((scale, scale))).round().astype(np.uint8)
            samples.append((label, np.stack([gray, gray, 255 - gray], axis=-1)))
    return samples


def write_folder(root: Path, samples: list[tuple[int, np.ndarray]], classes: list[str] | None = None) -> Path:
    """``root/<class>/<n>.png`` for each sample; ``classes`` names the folders (default: the digit)."""
    for number, (label, pixels) in enumerate(samples):
        folder = root / (classes[label] if classes else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{number:04d}.png")
    return root


def write_digit_folder(root: Path, count_per_class: int = 20, scale: int = 2) -> Path:
    """A plain image folder of 10 classes x ``count_per_class`` digit PNGs."""
    return write_folder(root, digit_pixels(count_per_class, scale))
