"""What a batch is: the one place that splits a loader's batch into inputs, labels and cached logits.

A batch is an input tensor alone, or a tuple/list ``(inputs,)``, ``(inputs, labels)`` or
``(inputs, labels, teacher_logits)`` (the last from ``qdistill.kd.CachedTeacherLoader``).

Example:
    >>> import torch
    >>> inputs, labels = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
    >>> tuple(inputs.shape), labels.tolist()
    ((2, 3), [0, 1])
    >>> split_batch(torch.zeros(4, 3))[1] is None
    True
"""

from __future__ import annotations

from typing import Any

import torch


def batch_parts(batch: Any) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
    """``(inputs, labels, teacher_logits)``; the parts a batch does not carry are None.

    Example:
        >>> batch_parts((torch.zeros(1, 2),))[1:]
        (None, None)
    """
    if not isinstance(batch, (list, tuple)):
        return batch, None, None
    parts = list(batch[:3]) + [None] * (3 - min(len(batch), 3))
    return parts[0], parts[1], parts[2]


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of a batch; ``labels`` is None for unlabelled data.

    Example:
        >>> split_batch([torch.ones(1, 2), torch.tensor([3])])[1].tolist()
        [3]
    """
    inputs, labels, _ = batch_parts(batch)
    return inputs, labels


def batch_inputs(batch: Any) -> Any:
    """The inputs of a batch (what the model is called with).

    Example:
        >>> batch_inputs((torch.ones(2, 1), torch.tensor([0, 1]))).shape
        torch.Size([2, 1])
    """
    return batch_parts(batch)[0]


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` (a tensor, or None) on ``device``.

    Example:
        >>> to_device(None, "cpu") is None, to_device(torch.ones(1), "cpu").device.type
        (True, 'cpu')
    """
    return None if value is None else value.to(device)
