"""Knowledge-distillation losses as modules whose forward returns the parts of the loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import RecipeError


@dataclass
class LossParts:
    """The total loss and its parts (logged separately in the history)."""

    total: torch.Tensor
    kd: torch.Tensor
    task: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def items(self) -> dict[str, torch.Tensor]:
        """Every part by name (``total``, ``kd``, ``task``, ``feature:<student layer>``)."""
        parts = {"total": self.total, "kd": self.kd, "task": self.task}
        parts.update({f"feature:{name}": value for name, value in self.features.items()})
        return parts


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(z_t/T) || softmax(z_s/T))`` averaged over the batch (no ``T^2`` factor)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)


UNLABELED = -1  # the label of an unlabeled sample inside a mixed batch (``kd.mixing.MixedLoader``)


def soft_kl_each(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``soft_kl`` per sample, shape ``(B,)`` (its mean is ``soft_kl``).

    Example:
        >>> each = soft_kl_each(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]]), 1.0)
        >>> [round(value, 4) for value in each.tolist()], round(each.mean().item(), 6) == round(
        ...     soft_kl(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]]), 1.0).item(), 6)
        ([0.4621, 0.0], True)
    """
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)


class KDLoss(nn.Module):
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    The ``T^2`` factor keeps the soft-target gradients on the scale of the hard-label ones
    (Hinton et al. 2015). Without labels only the KD term is used (label-free distillation).
    In a batch that mixes labelled samples with unlabeled ones (label ``UNLABELED``), each labelled
    sample contributes ``alpha * T^2 * KL + (1 - alpha) * CE`` and each unlabeled one ``T^2 * KL``
    alone; the total is the mean over the batch (``kd`` and ``task`` are logged as the mean KD term over
    all samples and the mean cross-entropy over the labelled ones).

    Example:
        >>> student_logits = torch.tensor([[2.0, 0.0]], requires_grad=True)
        >>> parts = KDLoss(temperature=4.0, alpha=0.9)(student_logits, torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
        >>> round(parts.kd.item(), 6), round(parts.task.item(), 4)   # same logits: no KL; CE of a 2-logit margin
        (0.0, 0.1269)
        >>> parts.total.backward()
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        if not temperature > 0:
            raise RecipeError(f"distill.temperature: {temperature!r} is not allowed; it must be > 0")
        if not 0.0 <= alpha <= 1.0:
            raise RecipeError(f"distill.alpha: {alpha!r} is not allowed; it must be in [0, 1]")
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                labels: torch.Tensor | None = None) -> LossParts:
        if labels is not None and bool((labels == UNLABELED).any()):
            return self._mixed(student_logits, teacher_logits, labels)
        zero = student_logits.new_zeros(())
        kd = zero
        if teacher_logits is not None and self.alpha > 0:
            kd = soft_kl(student_logits, teacher_logits, self.temperature) * self.temperature**2
        task = F.cross_entropy(student_logits, labels) if labels is not None else zero
        if labels is None:
            total = kd  # label-free: the teacher's outputs are the only target
        elif teacher_logits is None:
            total = task
        else:
            total = self.alpha * kd + (1.0 - self.alpha) * task
        return LossParts(total=total, kd=kd, task=task)

    def _mixed(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
               labels: torch.Tensor) -> LossParts:
        """Per-sample rule for a batch with unlabeled samples (see the class docstring)."""
        labelled = labels != UNLABELED  # (B,)
        zero = student_logits.new_zeros(())
        task_sum = F.cross_entropy(student_logits[labelled], labels[labelled], reduction="sum") if labelled.any() else zero
        count = max(int(labelled.sum()), 1)
        if teacher_logits is None or self.alpha == 0:  # no teacher signal: unlabeled samples carry no loss
            return LossParts(total=task_sum / count, kd=zero, task=task_sum / count)
        kd_each = soft_kl_each(student_logits, teacher_logits, self.temperature) * self.temperature**2  # (B,)
        total = (self.alpha * kd_each[labelled].sum() + (1.0 - self.alpha) * task_sum + kd_each[~labelled].sum())
        return LossParts(total=total / len(labels), kd=kd_each.mean(), task=task_sum / count)


def cosine_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """The (B, B) matrix of cosine similarities between a batch's embeddings (what retrieval ranks by).

    Example:
        >>> [[round(value, 4) for value in row] for row in cosine_similarities(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).tolist()]
        [[1.0, 0.7071], [0.7071, 1.0]]
    """
    unit = F.normalize(embeddings, dim=1)
    return unit @ unit.T


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor, cosine_weight: float = 1.0,
                       mse_weight: float = 0.0, relation_weight: float = 0.0) -> torch.Tensor:
    """``cosine_weight * mean(1 - cos(student, teacher)) + mse_weight * mean((student - teacher)^2)
    + relation_weight * mean((S_student - S_teacher)^2)`` per batch, where ``S`` is the batch's matrix of
    cosine similarities (relational KD, Park et al. 2019: the student keeps how the teacher ranks the
    batch's texts against each other, which nearest-neighbour retrieval depends on).

    Example:
        >>> float(embedding_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 1.0, 1.0))
        3.5
        >>> student, teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> round(float(embedding_distance(student, teacher, 0.0, 0.0, 1.0)), 6)  # (2 * 0.7071^2) / 4
        0.25
    """
    loss = student.new_zeros(())
    if cosine_weight:
        loss = loss + cosine_weight * (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(student, teacher)
    if relation_weight:
        loss = loss + relation_weight * F.mse_loss(cosine_similarities(student), cosine_similarities(teacher))
    return loss


class EmbeddingKDLoss(nn.Module):
    """KD for embedding models: the student's pooled vector follows the teacher's (cosine and/or MSE, and optionally
    the batch's similarity relations, ``embedding_distance``); no labels.

    Same interface as ``KDLoss`` (``alpha`` is 1: the loss is distillation only), so ``Distiller`` takes either.

    Example:
        >>> loss = EmbeddingKDLoss(cosine_weight=1.0, mse_weight=0.0)
        >>> parts = loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]]), None)
        >>> round(float(parts.total), 6), float(parts.task)
        (0.0, 0.0)
    """

    alpha = 1.0

    def __init__(self, cosine_weight: float = 1.0, mse_weight: float = 0.0, relation_weight: float = 0.0) -> None:
        super().__init__()
        if cosine_weight < 0 or mse_weight < 0 or cosine_weight + mse_weight == 0:
            raise RecipeError("distill.cosine_weight and distill.mse_weight must be >= 0 and not both 0")
        if relation_weight < 0:
            raise RecipeError(f"distill.relation_weight {relation_weight} must be >= 0")
        self.cosine_weight, self.mse_weight, self.relation_weight = cosine_weight, mse_weight, relation_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None,
                labels: torch.Tensor | None = None) -> LossParts:
        if teacher is None:
            raise RecipeError("embedding distillation needs the teacher's embeddings (it uses no labels)")
        kd = embedding_distance(student, teacher.detach(), self.cosine_weight, self.mse_weight, self.relation_weight)
        return LossParts(total=kd, kd=kd, task=student.new_zeros(()))
