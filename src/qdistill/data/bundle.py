"""``DataBundle``: the train, validation and test inputs of one run, and what models need to know about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qdistill.batch import input_rows


@dataclass
class DataBundle:
    """Train, validation and test tensors plus the number of classes.

    Validation steers training (early stopping, search); test is what the report's accuracy is
    measured on, and nothing is tuned on it. Labels are None for unlabelled data. For an image
    folder the inputs are ``data.images.LazyImages`` (decoded when indexed or loaded; ``len``,
    ``shape`` and slicing work as on a tensor) and ``class_names`` are its class folders.

    ``unlabeled_x`` holds inputs without labels that the student learns from the teacher alone: the
    first ``unlabeled_from_train`` of them are training samples whose labels ``data.label_fraction``
    set aside, the rest come from ``data.unlabeled``.

    Example:
        >>> bundle = DataBundle(torch.zeros(8, 1, 4, 4), torch.zeros(8, dtype=torch.long),
        ...                     torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), 10)
        >>> bundle.model_kwargs(), bundle.split_sizes()
        ({'in_channels': 1, 'num_classes': 10, 'image_size': 4}, {'train_samples': 8, 'val_samples': 2})
        >>> bundle.unlabeled_x, bundle.unlabeled_samples
        (None, 0)
    """

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    num_classes: int
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    class_names: list[str] | None = None
    unlabeled_x: torch.Tensor | None = None
    unlabeled_from_train: int = 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape; for dict inputs (tokens) the first tensor's, e.g. ``(max_length,)``."""
        first = next(iter(self.train_x.values())) if isinstance(self.train_x, dict) else self.train_x
        return tuple(first.shape[1:])

    @property
    def has_labels(self) -> bool:
        return self.train_y is not None

    @property
    def unlabeled_samples(self) -> int:
        """How many unlabeled inputs there are (label-stripped training samples plus ``data.unlabeled``)."""
        return 0 if self.unlabeled_x is None else _rows(self.unlabeled_x)

    def model_kwargs(self) -> dict[str, int]:
        """Arguments built-in models take to fit this data (channels, classes, image size; classes only for tokens)."""
        if isinstance(self.train_x, dict):
            return {"num_classes": self.num_classes}
        shape = self.input_shape
        channels = shape[0] if len(shape) == 3 else 1
        return {"in_channels": channels, "num_classes": self.num_classes, "image_size": shape[-1]}

    def split_sizes(self) -> dict[str, int]:
        """Samples per split, as report.json's ``data`` section records them.

        ``train_samples`` is the whole training split, including samples whose labels ``data.label_fraction`` set aside.
        """
        sizes = {"train_samples": _rows(self.train_x) + self.unlabeled_from_train,
                 "val_samples": _rows(self.val_x)}
        if self.test_x is not None:
            sizes["test_samples"] = _rows(self.test_x)
        return sizes


def _rows(inputs: Any) -> int:
    """Samples in a split: ``len`` of a tensor or image files, the rows of a dict of tensors (tokens)."""
    return input_rows(inputs) if isinstance(inputs, dict) else len(inputs)
