"""The teacher-logit cache: the teacher runs once over the training set instead of in every step.

In-memory tensors are cached with their inputs (``CachedTeacherLoader``); an image folder decoded
without augmentation keeps decoding in its loader and gets the logits attached by sample index
(``CachedImageLoader``). Augmented images run the teacher live.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset, default_collate

from qdistill.batch import split_batch
from qdistill.data.images import ImageDataset
from qdistill.data.loaders import EpochSampler, ImageLoader


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
    fixed = type(dataset) is TensorDataset or (type(dataset) is ImageDataset and dataset.deterministic)
    return (fixed and isinstance(loader.sampler, EpochSampler)
            and loader.collate_fn is default_collate and type(batch_sampler) is BatchSampler
            and batch_sampler.sampler is loader.sampler and not loader.drop_last)


class CachedTeacherLoader:
    """Batches of an in-memory loader with the teacher's logits attached: ``(x, y, logits)``.

    The teacher runs once over the training set instead of once per step, which removes its
    forward pass (and its activation memory) from every training step. It must never change what
    the student sees, so ``wrap`` caches only a loader whose every batch is a fixed function of
    sample indices: a plain ``TensorDataset`` (not a subclass, which may transform samples), the
    default collate, the default batch sampler over an ``EpochSampler``, no dropped last batch.
    Anything else (augmentation, custom collate or sampling) runs the teacher live.

    Example:
        >>> from qdistill.data import make_loader
        >>> loader = make_loader(torch.randn(10, 4), torch.zeros(10, dtype=torch.long), 4, seed=0, shuffle=True)
        >>> cached = CachedTeacherLoader.wrap(loader, nn.Linear(4, 3))   # None if not cacheable
        >>> [tuple(logits.shape) for _, _, logits in cached]
        [(4, 3), (4, 3), (2, 3)]
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], logits: torch.Tensor, batch_size: int, sampler) -> None:
        self.tensors, self.logits, self.batch_size, self.sampler = tensors, logits, batch_size, sampler

    @classmethod
    def wrap(cls, loader, teacher: nn.Module) -> CachedTeacherLoader | CachedImageLoader | None:
        if not is_cacheable(loader):
            return None
        if type(loader.dataset) is ImageDataset:
            return CachedImageLoader(loader, teacher)
        dataset, sampler = loader.dataset, loader.sampler
        inputs = dataset.tensors[0]
        device = next(teacher.parameters()).device
        with torch.no_grad():
            logits = torch.cat([teacher(inputs[start : start + 512].to(device)).cpu()
                                for start in range(0, len(inputs), 512)])  # (N, C)
        return cls(dataset.tensors, logits, loader.batch_size, sampler)

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            labels = self.tensors[1][index] if len(self.tensors) > 1 else None
            yield self.tensors[0][index], labels, self.logits[index]


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
            self.logits = torch.cat([teacher(split_batch(batch)[0].to(device)).cpu() for batch in in_order])

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for start, batch in zip(range(0, len(order), self.batch_size), self.loader, strict=True):
            inputs, labels = split_batch(batch)
            yield inputs, labels, self.logits[order[start : start + self.batch_size]]
