"""Deterministic loaders over in-memory tensors or image files: the batch order is fixed by ``(seed, epoch)``.

That makes a resumed run take the same batches as an uninterrupted one. Image files are decoded in
DataLoader workers (``data/images.py``), each sample a fixed function of ``(seed, epoch, index)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from qdistill.batch import check_inputs, input_rows, take_rows
from qdistill.data.bundle import DataBundle
from qdistill.data.images import AugmentedTensorDataset, ImageDataset, ImageDecodeError, LazyImages
from qdistill.errors import DataError

EVAL_BATCH_SIZE = 256  # validation and test batches: no gradients, so larger batches are free
UNLABELED_SEED_OFFSET = 7919  # the unlabeled stream's own shuffles, independent of the labelled batches' order


class EpochSampler(Sampler[int]):
    """A shuffled order fixed by ``(seed, epoch)``; ``set_epoch`` picks the epoch.

    Example:
        >>> sampler = EpochSampler(5, seed=0)
        >>> sorted(sampler) == list(range(5)), list(EpochSampler(3, 0, shuffle=False))
        (True, [0, 1, 2])
    """

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


class AugmentSampler(EpochSampler):
    """An ``EpochSampler`` that yields ``(epoch, index)`` keys, so augmentation in any worker follows the epoch.

    Example:
        >>> sampler = AugmentSampler(3, seed=0, shuffle=False)
        >>> sampler.set_epoch(2)
        >>> list(sampler)
        [(2, 0), (2, 1), (2, 2)]
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class InputsDataset(Dataset):
    """In-memory inputs of several tensors (a tuple, or a dict such as ``input_ids``/``attention_mask``), with optional labels.

    Sample ``i`` is ``(inputs[i],)`` or ``(inputs[i], labels[i])`` with ``inputs[i]`` in the inputs'
    form, so the default collate gives batches ``(inputs, labels)`` as ``qdistill.batch`` reads
    them (a tuple's inputs arrive as a list). Integer inputs (token ids) stay integer.

    Example:
        >>> data = InputsDataset({"input_ids": torch.arange(6).reshape(3, 2)}, torch.tensor([0, 1, 0]))
        >>> len(data), data[1][0]["input_ids"].tolist(), int(data[1][1])
        (3, [2, 3], 1)
    """

    def __init__(self, inputs: Any, labels: torch.Tensor | None = None) -> None:
        check_inputs(inputs, "data")
        if labels is not None and len(labels) != input_rows(inputs):
            raise DataError(f"data: {input_rows(inputs)} inputs but {len(labels)} labels; they must be as many")
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return input_rows(self.inputs)

    def __getitem__(self, index: int) -> tuple:
        row = take_rows(self.inputs, index)
        return (row,) if self.labels is None else (row, self.labels[index])


def make_loader(x: Any, y: torch.Tensor | None, batch_size: int, seed: int, shuffle: bool,
                augment: str = "none") -> DataLoader:
    """A DataLoader over in-memory inputs or a split of image files, with an ``EpochSampler`` (deterministic, resumable).

    ``x`` is a tensor, image files (``LazyImages``), or inputs of several tensors (a tuple, or a dict
    such as ``{"input_ids": ..., "attention_mask": ...}``; ``InputsDataset``).

    Example:
        >>> loader = make_loader(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long), 4, seed=0, shuffle=True)
        >>> [len(x) for x, _ in loader]
        [4, 4, 2]
        >>> tokens = make_loader({"input_ids": torch.zeros(5, 7, dtype=torch.long)}, None, 4, seed=0, shuffle=False)
        >>> [tuple(batch[0]["input_ids"].shape) for batch in tokens]
        [(4, 7), (1, 7)]

    ``augment`` (``shift`` or ``standard``, ``data.augment``) augments image tensors ``(N, C, H, W)``
    (``images.AugmentedTensorDataset``): each sample is a fixed function of ``(seed, epoch, index)``.
    Image files carry their own augmentation (``LazyImages.augment``).
    """
    if isinstance(x, LazyImages):
        return _image_loader(x, y, batch_size, seed, shuffle)
    if augment != "none":
        return DataLoader(AugmentedTensorDataset(x, y, seed, augment), batch_size=batch_size,
                          sampler=AugmentSampler(len(x), seed, shuffle), generator=torch.Generator().manual_seed(seed))
    if isinstance(x, torch.Tensor):
        dataset: Dataset = TensorDataset(*((x,) if y is None else (x, y)))
    else:
        dataset = InputsDataset(x, y)
    # its own generator: DataLoader draws a seed at every iteration, which must not move the global
    # RNG (dropout's), or a resumed run would see different dropout masks
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle),
                      generator=torch.Generator().manual_seed(seed))


class ImageLoader(DataLoader):
    """A DataLoader whose worker processes stop as soon as an image cannot be decoded.

    torch re-raises a worker's error from a frame that refers to itself, which keeps the workers
    alive until the garbage collector runs (and then they take seconds to stop); this drops it.
    """

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        return _stop_on_error(iterator) if self.num_workers else iterator


def _stop_on_error(iterator: Iterator) -> Iterator:
    try:
        yield from iterator
    except ImageDecodeError as error:
        error.__traceback__ = None
        del iterator  # the workers stop here
        raise ImageDecodeError(str(error)) from None


def _image_loader(images: LazyImages, labels: torch.Tensor | None, batch_size: int, seed: int,
                  shuffle: bool) -> DataLoader:
    """Decoding in ``images.workers`` worker processes; augmented (training) splits get ``(epoch, index)`` keys."""
    sampler_type = AugmentSampler if images.augment else EpochSampler
    return ImageLoader(ImageDataset(images, labels, seed), batch_size=batch_size,
                      sampler=sampler_type(len(images), seed, shuffle), num_workers=images.workers,
                      generator=torch.Generator().manual_seed(seed))


def make_loaders(bundle: DataBundle, batch_size: int, seed: int,
                 augment: str = "none") -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """Shuffled training loader (augmented by ``augment``), ordered validation loader, ordered test loader (None without a test split)."""
    train = make_loader(bundle.train_x, bundle.train_y, batch_size, seed, shuffle=True, augment=augment)
    val = make_loader(bundle.val_x, bundle.val_y, max(batch_size, EVAL_BATCH_SIZE), seed, shuffle=False)
    test = None
    if bundle.test_x is not None:
        test = make_loader(bundle.test_x, bundle.test_y, max(batch_size, EVAL_BATCH_SIZE), seed, shuffle=False)
    return train, val, test


def make_unlabeled_loader(bundle: DataBundle, batch_size: int, seed: int, augment: str = "none") -> DataLoader | None:
    """A shuffled loader of the bundle's unlabeled inputs (batches ``(x,)``, augmented as the training ones), or None.

    Its order comes from ``seed + UNLABELED_SEED_OFFSET``, so adding unlabeled data never changes the
    order of the labelled batches.

    Example:
        >>> bundle = DataBundle(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(1, 2), None, 2,
        ...                     unlabeled_x=torch.ones(5, 2))
        >>> [len(batch[0]) for batch in make_unlabeled_loader(bundle, 2, seed=0)]
        [2, 2, 1]
    """
    if bundle.unlabeled_x is None:
        return None
    return make_loader(bundle.unlabeled_x, None, batch_size, seed + UNLABELED_SEED_OFFSET, shuffle=True, augment=augment)
