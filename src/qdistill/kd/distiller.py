"""The ``Distiller``: teacher + student + KD loss (+ feature hints); only the student and adapters train."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qdistill.batch import call_model
from qdistill.errors import ModelError
from qdistill.kd.hints import FeatureTap, make_adapter
from qdistill.kd.losses import KDLoss, LossParts
from qdistill.kd.teacher import freeze


class Distiller(nn.Module):
    """Teacher + student + KD loss (+ feature hints). Only the student and adapters train.

    Example:
        >>> teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
        >>> distiller = Distiller(teacher, student, KDLoss(4.0, 0.9))
        >>> parts = distiller(torch.randn(8, 4), torch.randint(0, 3, (8,)))   # LossParts(total, kd, task, features)
        >>> parts.total.backward()
        >>> student.weight.grad is not None, teacher.weight.requires_grad
        (True, False)
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: KDLoss,
                 features: Iterable = (), example_input: Any = None, extra_losses: Iterable[nn.Module] = ()) -> None:
        super().__init__()
        # inner-activation losses (``kd.hidden``): called with the batch's inputs after both forwards,
        # each returns {name: weighted loss}; their parameters (projections) train with the student
        self.extra_losses = nn.ModuleList(extra_losses)
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

    def _build_adapters(self, example_input: Any) -> None:
        with torch.no_grad():
            was_training = self.student.training
            self.student.eval()
            call_model(self.student, example_input)
            call_model(self.teacher, example_input)
            self.student.train(was_training)
        device = next(self.student.parameters()).device
        for name, student_tap, teacher_tap, _ in self._taps:
            adapter = make_adapter(student_tap.output, teacher_tap.output).to(device)
            self.adapters[name.replace(".", "_")] = adapter

    def teacher_logits(self, x: Any) -> torch.Tensor:
        """The teacher's outputs for ``x``, computed without autograd.

        Without feature hints or extra losses the forward runs in ``torch.inference_mode`` (no version
        counters or view tracking) and the small output is cloned into an ordinary tensor, which a loss
        may save for its backward. With them the teacher's inner activations are saved by their
        losses, so plain ``no_grad`` is used.
        """
        if self._taps or len(self.extra_losses):  # their losses save the teacher's inner activations
            with torch.no_grad():
                return call_model(self.teacher, x)
        with torch.inference_mode():
            logits = call_model(self.teacher, x)
        return logits.clone()

    def forward(self, x: Any, labels: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None) -> LossParts:
        """Loss parts for a batch; ``teacher_logits`` may come precomputed (``CachedTeacherLoader``).

        ``x`` is the batch's inputs in any form of ``qdistill.batch`` (a tensor, a tuple or a dict).
        """
        if teacher_logits is None and (self.loss.alpha > 0 or self._taps or len(self.extra_losses)):
            teacher_logits = self.teacher_logits(x)
        student_logits = call_model(self.student, x)
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
        for extra in self.extra_losses:
            for name, value in extra(x).items():
                parts.features[name] = value
                parts.total = parts.total + value
        return parts

    def remove_hooks(self) -> None:
        """Detach the feature hooks from both models."""
        for _, student_tap, teacher_tap, _ in self._taps:
            student_tap.remove()
            teacher_tap.remove()
        for extra in self.extra_losses:
            extra.remove()
