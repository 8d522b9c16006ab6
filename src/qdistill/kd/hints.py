"""Feature hints: forward hooks that keep a layer's output, and the adapter that maps student to teacher width."""

from __future__ import annotations

import torch
from torch import nn

from qdistill.errors import ModelError


class FeatureTap:
    """Keeps the latest output of a named submodule via a forward hook."""

    def __init__(self, model: nn.Module, name: str, role: str) -> None:
        modules = dict(model.named_modules())
        if name not in modules:
            available = ", ".join(n for n in modules if n and "quantizer" not in n) or "(none)"
            raise ModelError(f"distill.features: {role} layer {name!r} does not exist; available: {available}")
        self.output: torch.Tensor | None = None
        self.handle = modules[name].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if isinstance(output, (tuple, list)):  # e.g. attention returns (values, weights): hint on the first
            output = output[0]
        self.output = output

    def remove(self) -> None:
        self.handle.remove()


def make_adapter(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> nn.Module:
    """Identity when widths match, else a 1x1 conv (4-D features) or linear map (others)."""
    student_width, teacher_width = student_feature.shape[1], teacher_feature.shape[1]
    if student_feature.dim() == 4:
        if student_feature.shape[2:] != teacher_feature.shape[2:]:
            raise ModelError(
                f"distill.features: spatial sizes differ ({tuple(student_feature.shape[2:])} vs "
                f"{tuple(teacher_feature.shape[2:])}); pick layers with the same H x W"
            )
        if student_width == teacher_width:
            return nn.Identity()
        return nn.Conv2d(student_width, teacher_width, kernel_size=1, bias=False)
    student_width, teacher_width = student_feature.shape[-1], teacher_feature.shape[-1]
    return nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width, bias=False)
