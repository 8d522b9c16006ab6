"""Dropout off while training: for students that match a teacher's function (``train.dropout``).

A quantized student that distils a pretrained embedding model has one target, the teacher's
output on the same input. Dropout makes the student's output a random draw around it: on
all-MiniLM-L6-v2 (dropout 0.1) the noise it adds to each step's loss is larger than the
quantization error the step is meant to remove (docs/transformers.md measures the difference).
``dropout_off`` sets every dropout probability in a module to 0 for the duration of a ``with``
block and restores it afterwards, so the saved model and later training are unchanged.

Two forms are covered: ``nn.Dropout`` and its relatives (``p``), and attention modules that keep
their probability as a float attribute ``dropout`` and pass it to a functional call
(``nn.MultiheadAttention``, Hugging Face attention, ``quant.attention``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.dropout import _DropoutNd


def _probabilities(module: nn.Module) -> list[tuple[nn.Module, str, float]]:
    """``(module, attribute, probability)`` for every dropout probability above 0 in ``module``."""
    found = []
    for layer in module.modules():
        if isinstance(layer, _DropoutNd) and layer.p > 0:
            found.append((layer, "p", layer.p))
        elif isinstance(getattr(layer, "dropout", None), float) and layer.dropout > 0:
            found.append((layer, "dropout", layer.dropout))
    return found


@contextmanager
def dropout_off(module: nn.Module) -> Iterator[int]:
    """Inside the block every dropout probability of ``module`` is 0; yields how many were set.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
        >>> x = torch.ones(2, 4)
        >>> with dropout_off(model) as count:
        ...     bool(torch.equal(model(x), model(x))), count
        (True, 1)
        >>> model[1].p
        0.5
    """
    found = _probabilities(module)
    for layer, attribute, _ in found:
        setattr(layer, attribute, 0.0)
    try:
        yield len(found)
    finally:
        for layer, attribute, probability in found:
            setattr(layer, attribute, probability)


__all__ = ["dropout_off"]
