"""The frozen teacher: eval mode, no gradients, never trained, saved or wrapped."""

from __future__ import annotations

from torch import nn


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never trains and holds no optimizer state."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher
