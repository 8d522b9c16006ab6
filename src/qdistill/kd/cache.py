"""The teacher-logit cache: the teacher runs once over the training set instead of in every step.

In-memory inputs (a tensor, or a tuple/dict of tensors such as token ids, ``data.loaders.InputsDataset``)
are cached with their inputs (``CachedTeacherLoader``); an image folder decoded
without augmentation keeps decoding in its loader and gets the logits attached by sample index
(``CachedImageLoader``). Augmented images (image files, or image tensors with ``data.augment``:
``data.images.AugmentedTensorDataset``) run the teacher live, on the batch the student gets.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset, default_collate

from qdistill.batch import call_model, input_rows, move_inputs, split_batch, take_rows
from qdistill.data.images import ImageDataset
from qdistill.data.loaders import EpochSampler, ImageLoader, InputsDataset

TEACHER_CHUNK = 512  # samples per teacher forward while caching


def is_cacheable(loader: object) -> bool:
    """True when the loader's batches are a fixed function of sample indices (see ``CachedTeacherLoader``).

    Example:
        >>> from qdistill.data import make_loader
        >>> is_cacheable(make_loader(torch.zeros(4, 2), None, 2, seed=0, shuffle=True))
        True
        >>> is_cacheable(DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2, collate_fn=lambda batch: batch))
        False
    """
    if not isinstance(loader, DataLoader):
        return False
    batch_sampler = loader.batch_sampler
    dataset = loader.dataset
    fixed = type(dataset) in (TensorDataset, InputsDataset) or (type(dataset) is ImageDataset and dataset.deterministic)
    return (fixed and isinstance(loader.sampler, EpochSampler)
            and loader.collate_fn is default_collate and type(batch_sampler) is BatchSampler
            and batch_sampler.sampler is loader.sampler and not loader.drop_last)


class CachedTeacherLoader:
    """Batches of an in-memory loader with the teacher's logits attached: ``(x, y, logits)``.

    The teacher runs once over the training set instead of once per step, which removes its
    forward pass (and its activation memory) from every training step. It must never change what
    the student sees, so ``wrap`` caches only a loader whose every batch is a fixed function of
    sample indices: a plain ``TensorDataset`` or ``InputsDataset`` (not a subclass, which may
    transform samples), the default collate, the default batch sampler over an ``EpochSampler``, no dropped last batch.
    Anything else (augmentation, custom collate or sampling) runs the teacher live.

    ``tensors`` is ``(inputs,)`` or ``(inputs, labels)``, the inputs in any form of ``qdistill.batch``.

    Example:
        >>> from qdistill.data import make_loader
        >>> loader = make_loader(torch.randn(10, 4), torch.zeros(10, dtype=torch.long), 4, seed=0, shuffle=True)
        >>> cached = CachedTeacherLoader.wrap(loader, nn.Linear(4, 3))   # None if not cacheable
        >>> [tuple(logits.shape) for _, _, logits in cached]
        [(4, 3), (4, 3), (2, 3)]
    """

    def __init__(self, tensors: tuple, logits: torch.Tensor, batch_size: int, sampler) -> None:
        self.tensors, self.logits, self.batch_size, self.sampler = tensors, logits, batch_size, sampler

    @classmethod
    def wrap(cls, loader, teacher: nn.Module) -> CachedTeacherLoader | CachedImageLoader | None:
        if not is_cacheable(loader):
            return None
        if type(loader.dataset) is ImageDataset:
            return CachedImageLoader(loader, teacher)
        dataset, sampler = loader.dataset, loader.sampler
        if type(dataset) is InputsDataset:
            tensors = (dataset.inputs,) if dataset.labels is None else (dataset.inputs, dataset.labels)
        else:
            tensors = dataset.tensors
        inputs = tensors[0]
        device = next(teacher.parameters()).device
        with torch.no_grad():
            logits = torch.cat([call_model(teacher, move_inputs(take_rows(inputs, slice(start, start + TEACHER_CHUNK)),
                                                                device)).cpu()
                                for start in range(0, input_rows(inputs), TEACHER_CHUNK)])  # (N, C)
        return cls(tensors, logits, loader.batch_size, sampler)

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            labels = self.tensors[1][index] if len(self.tensors) > 1 else None
            yield take_rows(self.tensors[0], index), labels, self.logits[index]


class CachedImageLoader:
    """An unaugmented image loader's batches with the teacher's logits attached: ``(x, y, logits)``.

    The teacher runs once over the images in index order; each step's batch is still decoded by
    the loader (nothing is held in memory but the logits), and its logits are picked by the
    sample indices, which the loader's ``EpochSampler`` fixes for the epoch.
    """

    def __init__(self, loader: DataLoader, teacher: nn.Module) -> None:
        self.loader, self.sampler, self.batch_size = loader, loader.sampler, loader.batch_size
        in_order = ImageLoader(loader.dataset, batch_size=loader.batch_size, num_workers=loader.num_workers)
        device = next(teacher.parameters()).device
        with torch.no_grad():
            self.logits = torch.cat([call_model(teacher, move_inputs(split_batch(batch)[0], device)).cpu()
                                     for batch in in_order])

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for start, batch in zip(range(0, len(order), self.batch_size), self.loader, strict=True):
            inputs, labels = split_batch(batch)
            yield inputs, labels, self.logits[order[start : start + self.batch_size]]
