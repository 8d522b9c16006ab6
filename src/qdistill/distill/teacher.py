"""The frozen teacher, feature hints, and the ``Distiller`` that pairs teacher and student."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qdistill.distill.losses import KDLoss, LossParts
from qdistill.errors import ModelError


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never trains and holds no optimizer state."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


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


class Distiller(nn.Module):
    """Teacher + student + KD loss (+ feature hints). Only the student and adapters train.

    Example:
        >>> distiller = Distiller(teacher, student, KDLoss(4.0, 0.9))
        >>> parts = distiller(x, y)            # LossParts(total, kd, task, features)
        >>> parts.total.backward()
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: KDLoss,
                 features: Iterable = (), example_input: torch.Tensor | None = None) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        # kept out of the module tree: its weights are not trained, saved or wrapped
        self.__dict__["teacher"] = freeze(teacher)
        self.hints = list(features)
        self.adapters = nn.ModuleDict()
        self._taps: list[tuple[str, FeatureTap, FeatureTap, float]] = []
        for hint in self.hints:
            self._taps.append((hint.student, FeatureTap(student, hint.student, "student"),
                               FeatureTap(teacher, hint.teacher, "teacher"), hint.weight))
        if self._taps:
            if example_input is None:
                raise ModelError("distill.features: an example input is needed to size the adapters")
            self._build_adapters(example_input)

    def _build_adapters(self, example_input: torch.Tensor) -> None:
        with torch.no_grad():
            was_training = self.student.training
            self.student.eval()
            self.student(example_input)
            self.teacher(example_input)
            self.student.train(was_training)
        device = example_input.device
        for name, student_tap, teacher_tap, _ in self._taps:
            adapter = make_adapter(student_tap.output, teacher_tap.output).to(device)
            self.adapters[name.replace(".", "_")] = adapter

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None) -> LossParts:
        """Loss parts for a batch; ``teacher_logits`` may come precomputed (``CachedTeacherLoader``)."""
        if teacher_logits is None and (self.loss.alpha > 0 or self._taps):
            teacher_logits = self.teacher_logits(x)
        student_logits = self.student(x)
        if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
            raise ModelError(
                f"teacher outputs {tuple(teacher_logits.shape)} but student outputs {tuple(student_logits.shape)}; "
                "they must have the same shape"
            )
        parts = self.loss(student_logits, teacher_logits if self.loss.alpha > 0 else None, labels)
        for name, student_tap, teacher_tap, weight in self._taps:
            adapted = self.adapters[name.replace(".", "_")](student_tap.output)
            feature_loss = torch.nn.functional.mse_loss(adapted, teacher_tap.output.detach())
            parts.features[name] = feature_loss
            parts.total = parts.total + weight * feature_loss
        return parts

    def remove_hooks(self) -> None:
        """Detach the feature hooks from both models."""
        for _, student_tap, teacher_tap, _ in self._taps:
            student_tap.remove()
            teacher_tap.remove()


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
        from torch.utils.data import TensorDataset

        from qdistill.data import EpochSampler

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
