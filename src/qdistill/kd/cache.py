"""The teacher-logit cache: the teacher runs once over an in-memory training set instead of in every step."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from qdistill.data.loaders import EpochSampler


class CachedTeacherLoader:
    """Batches of an in-memory loader with the teacher's logits attached: ``(x, y, logits)``.

    The teacher runs once over the training set instead of once per step, which removes its
    forward pass (and its activation memory) from every training step. Used when the data is an
    in-memory ``TensorDataset`` without augmentation, so each sample's logits never change.

    Example:
        >>> cached = CachedTeacherLoader.wrap(train_loader, teacher)   # None if not cacheable
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], logits: torch.Tensor, batch_size: int, sampler) -> None:
        self.tensors, self.logits, self.batch_size, self.sampler = tensors, logits, batch_size, sampler

    @classmethod
    def wrap(cls, loader, teacher: nn.Module) -> CachedTeacherLoader | None:
        dataset, sampler = getattr(loader, "dataset", None), getattr(loader, "sampler", None)
        if not isinstance(dataset, TensorDataset) or not isinstance(sampler, EpochSampler) or loader.drop_last:
            return None
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
