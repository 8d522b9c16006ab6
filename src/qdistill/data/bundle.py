"""``DataBundle``: the train, validation and test inputs of one run, and what models need to know about them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DataBundle:
    """Train, validation and test tensors plus the number of classes.

    Validation steers training (early stopping, search); test is what the report's accuracy is
    measured on, and nothing is tuned on it. Labels are None for unlabelled data. For an image
    folder the inputs are ``data.images.LazyImages`` (decoded when indexed or loaded; ``len``,
    ``shape`` and slicing work as on a tensor) and ``class_names`` are its class folders.

    Example:
        >>> bundle = DataBundle(torch.zeros(8, 1, 4, 4), torch.zeros(8, dtype=torch.long),
        ...                     torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), 10)
        >>> bundle.model_kwargs(), bundle.split_sizes()
        ({'in_channels': 1, 'num_classes': 10, 'image_size': 4}, {'train_samples': 8, 'val_samples': 2})
    """

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    num_classes: int
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    class_names: list[str] | None = None

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

    def split_sizes(self) -> dict[str, int]:
        """Samples per split, as report.json's ``data`` section records them."""
        sizes = {"train_samples": len(self.train_x), "val_samples": len(self.val_x)}
        if self.test_x is not None:
            sizes["test_samples"] = len(self.test_x)
        return sizes
