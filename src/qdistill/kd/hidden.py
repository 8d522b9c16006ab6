"""Transformer distillation beyond the output: hidden-state KD on chosen layers and MiniLM's attention-relation KD.

Both read the inner activations of a Hugging Face encoder (``models.hf.HFEncoder``, BERT family) through
forward hooks on its transformer layers, so the teacher must run at every step (no cached outputs), and
both average over the non-padding tokens only (the batch's ``attention_mask``).

- ``HiddenStateKD``: for each ``(teacher_layer, student_layer)`` pair, the MSE between the teacher's and
  the student's hidden states after those layers, through a learned linear projection when the widths
  differ (TinyBERT's hidden-state loss).
- ``AttentionRelationKD``: MiniLM v2's self-attention relation transfer on the last layer of each model:
  for queries, keys and values alike, the scaled dot-product relation ``softmax(A A^T / sqrt(d))`` of
  each relation head, teacher and student compared with KL divergence (the two models may have different
  widths: both are split into the teacher's number of heads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import ModelError
from qdistill.models.hf import encoder_layers


def _inner_encoder(model: nn.Module, key: str) -> nn.Module:
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ModelError(f"distill.{key}: applies to Hugging Face encoders (model.hf); {type(model).__name__} has "
                         "no .encoder")
    return encoder


def _layers(model: nn.Module, key: str) -> nn.ModuleList:
    try:
        return encoder_layers(_inner_encoder(model, key))
    except ModelError:
        raise ModelError(f"distill.{key}: applies to BERT-family Hugging Face encoders (encoder.encoder.layer); "
                         f"{type(model).__name__} has none") from None


class _Keep:
    """A forward hook that keeps a module's latest output (the first element of a tuple output)."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.output = output[0] if isinstance(output, (tuple, list)) else output

    def remove(self) -> None:
        self.handle.remove()


def token_mask(inputs: Any, like: torch.Tensor) -> torch.Tensor:
    """The ``(batch, tokens)`` float mask of real tokens: the batch's ``attention_mask``, or all ones.

    Example:
        >>> token_mask({"attention_mask": torch.tensor([[1, 0]])}, torch.zeros(1, 2, 4)).tolist()
        [[1.0, 0.0]]
    """
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None:
        return like.new_ones(like.shape[:2])
    return mask.to(like.dtype)


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the tokens whose ``mask`` is 1 and over the width.

    Example:
        >>> masked_mse(torch.tensor([[[1.0], [5.0]]]), torch.tensor([[[0.0], [0.0]]]), torch.tensor([[1.0, 0.0]]))
        tensor(1.)
    """
    squared = ((student - teacher) ** 2).mean(dim=-1)  # (B, T)
    return (squared * mask).sum() / mask.sum().clamp(min=1.0)


class HiddenStateKD(nn.Module):
    """MSE between hidden states of chosen ``(teacher_layer, student_layer)`` pairs, over non-padding tokens.

    ``forward(inputs)`` (after both models ran on ``inputs``) returns ``{"hidden:<t>-><s>": loss}``,
    each already multiplied by ``weight``. A projection (``nn.Linear``, trained with the student) maps
    the student's width to the teacher's when they differ.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, pairs: Sequence[tuple[int, int]],
                 weight: float = 1.0) -> None:
        super().__init__()
        teacher_layers, student_layers = _layers(teacher, "hidden_layers"), _layers(student, "hidden_layers")
        self.pairs = [tuple(int(index) for index in pair) for pair in pairs]
        for teacher_index, student_index in self.pairs:
            for role, index, layers in (("teacher", teacher_index, teacher_layers),
                                        ("student", student_index, student_layers)):
                if not 0 <= index < len(layers):
                    raise ModelError(f"distill.hidden_layers: {role} layer {index} does not exist; the {role} has "
                                     f"{len(layers)} layers (allowed: 0..{len(layers) - 1})")
        self.weight = float(weight)
        self.__dict__["_taps"] = [(_Keep(teacher_layers[t]), _Keep(student_layers[s])) for t, s in self.pairs]
        teacher_width = _inner_encoder(teacher, "hidden_layers").config.hidden_size
        student_width = _inner_encoder(student, "hidden_layers").config.hidden_size
        self.projections = nn.ModuleList(
            nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width)
            for _ in self.pairs)
        if student_width != teacher_width:
            self.projections.to(next(student.parameters()).device)

    def forward(self, inputs: Any) -> dict[str, torch.Tensor]:
        losses = {}
        for (teacher_index, student_index), (teacher_tap, student_tap), projection in zip(
                self.pairs, self._taps, self.projections, strict=True):
            student_hidden = projection(student_tap.output)
            teacher_hidden = teacher_tap.output.detach()
            loss = masked_mse(student_hidden, teacher_hidden, token_mask(inputs, student_hidden))
            losses[f"hidden:{teacher_index}->{student_index}"] = self.weight * loss
        return losses

    def remove(self) -> None:
        """Detach the hooks from both models."""
        for teacher_tap, student_tap in self._taps:
            teacher_tap.remove()
            student_tap.remove()


def relation(states: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """Log of ``softmax(A_h A_h^T / sqrt(d_h))`` per relation head ``h``: ``(batch, heads, tokens, tokens)``;
    padded keys get no weight.

    Example:
        >>> relation(torch.eye(2).unsqueeze(0), 1, torch.ones(1, 2)).exp().sum(-1).tolist()
        [[[1.0, 1.0]]]
    """
    batch, tokens, width = states.shape
    split = states.view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, H, T, d)
    scores = split @ split.transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


class AttentionRelationKD(nn.Module):
    """MiniLM v2's self-attention relation KD between the last layers of teacher and student.

    For each of query, key and value: ``KL(teacher relation || student relation)`` per query token,
    averaged over the real (non-padding) query tokens and the relation heads; the three are summed
    and multiplied by ``weight``. ``forward(inputs)`` returns ``{"attention_relation": loss}``.
    """

    PROJECTIONS = ("query", "key", "value")

    def __init__(self, teacher: nn.Module, student: nn.Module, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.heads = _inner_encoder(teacher, "attention_relation_weight").config.num_attention_heads
        student_width = _inner_encoder(student, "attention_relation_weight").config.hidden_size
        if student_width % self.heads:
            raise ModelError(f"distill.attention_relation_weight: the student's width {student_width} does not split "
                             f"into the teacher's {self.heads} relation heads")
        taps = []
        for model in (teacher, student):
            attention = _layers(model, "attention_relation_weight")[-1].attention.self
            taps.append([_Keep(getattr(attention, name)) for name in self.PROJECTIONS])
        self.__dict__["_taps"] = taps

    def forward(self, inputs: Any) -> dict[str, torch.Tensor]:
        teacher_taps, student_taps = self._taps
        total = None
        for teacher_tap, student_tap in zip(teacher_taps, student_taps, strict=True):
            mask = token_mask(inputs, student_tap.output)
            teacher_log = relation(teacher_tap.output.detach(), self.heads, mask)
            student_log = relation(student_tap.output, self.heads, mask)
            kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)  # (B, H, T)
            loss = (kl.mean(dim=1) * mask).sum() / mask.sum().clamp(min=1.0)
            total = loss if total is None else total + loss
        return {"attention_relation": self.weight * total}

    def remove(self) -> None:
        """Detach the hooks from both models."""
        for taps in self._taps:
            for tap in taps:
                tap.remove()
