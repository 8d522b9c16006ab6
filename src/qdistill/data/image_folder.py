"""Image folders: torchvision's ImageFolder layout (``root/<class>/<image>``), split by the usual rule or by folders.

``root/<class>/...`` holds every image of a class (any depth; files of other types are ignored);
classes are the sorted folder names. When ``root`` has ``train/`` (and ``val/``, ``test/``)
folders of that layout, they are the splits; a missing ``test/`` is set aside from ``train/``
(``data.test_fraction``), then a missing ``val/`` (``data.val_fraction``). Otherwise the split rule
of ``data/splits.py`` applies to all images. Nothing is decoded here: the splits are
``LazyImages`` that decode in the loaders' workers. ``data.unlabeled.image_folder`` is a folder of
images without classes (any layout), decoded like the training images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qdistill.data.bundle import DataBundle
from qdistill.data.images import LazyImages, Normalization
from qdistill.data.splits import DEFAULT_TEST_FRACTION, set_aside, split_indices
from qdistill.errors import DataError
from qdistill.recipe import DataSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
STATS_IMAGES = 1000  # normalize: standard measures mean and std on at most this many training images
FIELD = "data.image_folder"
Files = tuple[list[str], np.ndarray]  # image paths and their class indices


def class_folders(root: Path) -> list[Path]:
    """The class folders of ``root`` (sorted, hidden ones left out); none is a one-line ``DataError``."""
    folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not folders:
        raise DataError(f"{FIELD}: {str(root)!r} has no class folders; expected one folder of images per class "
                        "(root/<class>/<image>.png), or train/ val/ test/ folders of them")
    return folders


def list_images(root: Path, classes: list[str]) -> Files:
    """Every image under ``root/<class>`` with its class index; a class folder without images is an error."""
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a validation or test folder may lack a class
        found = sorted(str(path) for path in folder.rglob("*") if _is_image_file(path))
        if not found:
            raise DataError(f"{FIELD}: class folder {str(folder)!r} has no images; allowed: {' '.join(IMAGE_SUFFIXES)} "
                            "files (remove the folder or add images)")
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _is_image_file(path: Path) -> bool:
    # hidden files are left out: "._photo.jpg" is macOS metadata, not an image
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def read_layout(root: Path) -> tuple[list[str], dict[str, Files]]:
    """``(classes, {split: files})``: one entry ``"all"`` for a plain folder, else one per split folder present."""
    if not root.is_dir():
        raise DataError(f"{FIELD}: {str(root)!r} is not a folder; give a folder of class folders of images")
    folders = class_folders(root)
    names = [folder.name for folder in folders]
    if not set(names) & set(SPLITS):
        return names, {"all": list_images(root, names)}
    if "train" not in names or set(names) - set(SPLITS):
        raise DataError(f"{FIELD}: {str(root)!r} has folders {', '.join(names)}; give either class folders only or "
                        "train/ (and val/, test/) folders of class folders")
    classes = [folder.name for folder in class_folders(root / "train")]
    for split in set(names) - {"train"}:
        unknown = sorted({folder.name for folder in class_folders(root / split)} - set(classes))
        if unknown:
            raise DataError(f"{FIELD}: {split}/ has class folders {', '.join(unknown)} that train/ lacks; "
                            "every class must have training images")
    return classes, {split: list_images(root / split, classes) for split in SPLITS if split in names}


def split_files(found: dict[str, Files], spec: DataSpec) -> dict[str, Files]:
    """Train, val and test files: the split folders found, the missing ones set aside from train (test first)."""
    test_fraction = spec.test_fraction if spec.test_fraction is not None else DEFAULT_TEST_FRACTION
    if len(found) == 1:  # all images in one place (a plain folder, or train/ alone): the usual rule
        files = next(iter(found.values()))
        indices = split_indices(len(files[0]), spec.val_fraction, test_fraction, spec.seed)
        return {split: _pick(files, index) for split, index in zip(SPLITS, indices, strict=True)}
    splits = dict(found)
    for split, fraction in (("test", test_fraction), ("val", spec.val_fraction)):
        if split not in splits:
            rest, part = set_aside(len(splits["train"][0]), fraction, spec.seed, FIELD, split)
            splits["train"], splits[split] = _pick(splits["train"], rest), _pick(splits["train"], part)
    return splits


def _pick(files: Files, index: np.ndarray) -> Files:
    paths, labels = files
    return [paths[i] for i in index], labels[index]


def normalization(spec: DataSpec, train_files: list[str]) -> Normalization:
    """The recipe's ``normalize``; ``standard`` measures per-channel mean and std on the training images only.

    At most ``STATS_IMAGES`` training images, evenly spaced through the training split, are decoded for it.
    """
    if spec.normalize != "standard":
        return Normalization.named(spec.normalize)
    step = -(-len(train_files) // STATS_IMAGES)  # ceil: every class of a sorted folder is sampled
    unit = LazyImages(train_files[::step], spec.image_size, Normalization())
    count, total, squares = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for index in range(len(unit)):  # one image at a time: 1000 images of 224 x 224 would take 600 MB at once
        pixels = unit.decode(index).double().reshape(3, -1)
        count, total, squares = count + pixels.shape[1], total + pixels.sum(1), squares + pixels.square().sum(1)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-8)  # the population std, as for arrays
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))


def load_image_folder(spec: DataSpec) -> DataBundle:
    """The recipe's image folder as a DataBundle whose inputs are ``LazyImages`` (decoded by the loaders).

    Example:
        >>> load_image_folder(DataSpec(image_folder="photos/"))   # doctest: +SKIP
    """
    classes, found = read_layout(Path(spec.image_folder))
    splits = split_files(found, spec)
    norm = normalization(spec, splits["train"][0])

    def part(split: str) -> tuple[LazyImages, torch.Tensor]:
        files, labels = splits[split]
        augment = split == "train" and spec.augment == "standard"
        return LazyImages(files, spec.image_size, norm, augment, spec.workers), torch.from_numpy(labels)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (part(split) for split in SPLITS)
    unlabeled = spec.unlabeled.image_folder if spec.unlabeled is not None else None
    return DataBundle(train_x, train_y, val_x, val_y, len(classes), test_x, test_y, class_names=classes,
                      unlabeled_x=None if unlabeled is None else unlabeled_images(Path(unlabeled), train_x))


def unlabeled_images(root: Path, like: LazyImages) -> LazyImages:
    """``data.unlabeled.image_folder``: every image under ``root`` (any depth, sorted, no classes), decoded as ``like``.

    The images get the training split's size, normalisation and augmentation.
    """
    if not root.is_dir():
        raise DataError(f"data.unlabeled.image_folder: {str(root)!r} is not a folder; give a folder of images")
    files = sorted(str(path) for path in root.rglob("*") if _is_image_file(path))
    if not files:
        raise DataError(f"data.unlabeled.image_folder: {str(root)!r} has no images; allowed: {' '.join(IMAGE_SUFFIXES)} files")
    return LazyImages(files, like.size, like.normalization, like.augment, like.workers)
