"""What qdistill needs from a model's output: one tensor, class logits ``(batch, classes)`` or an embedding.

``OUTPUT_KINDS``: ``"logits"`` are class logits (softmax KD, accuracy, argmax agreement);
``"embedding"`` is a pooled vector per sample (cosine/MSE KD, cosine and retrieval metrics).
A run's kind comes from ``distill.output`` when given, else from the model (``models.hf.HFEncoder``
declares it through ``model.task``), else ``"logits"`` (``output_kind``).

``class_logits`` runs a model on an example batch and turns every way that can go wrong into a
one-line error that names the model's role (teacher, student) and what is allowed.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from qdistill.batch import call_model, describe_inputs
from qdistill.errors import DataError, ModelError

PROBABILITY_TOLERANCE = 1e-4
OUTPUT_KINDS = ("logits", "embedding")


def output_kind(model: nn.Module, declared: str | None = None) -> str:
    """The run's output kind: ``declared`` (``distill.output``) when given, else the model's ``output_kind``
    attribute (Hugging Face encoders set it from ``task``), else ``"logits"``.

    Example:
        >>> output_kind(nn.Linear(4, 3)), output_kind(nn.Linear(4, 3), "embedding")
        ('logits', 'embedding')
    """
    kind = declared if declared is not None else getattr(model, "output_kind", "logits")
    if kind not in OUTPUT_KINDS:
        raise ModelError(f"output kind {kind!r} is not supported; allowed: {', '.join(OUTPUT_KINDS)}")
    return kind


def describe_output(output: Any) -> str:
    """A short name for what a forward returned.

    Example:
        >>> describe_output((torch.zeros(1),)), describe_output(torch.zeros(2, 3))
        ('a tuple', 'a tensor of shape (2, 3)')
    """
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    article = "an" if type(output).__name__[0].lower() in "aeiou" else "a"
    return f"{article} {type(output).__name__}"


def looks_like_probabilities(logits: torch.Tensor) -> bool:
    """True when every row is non-negative and sums to 1 (a softmax was applied already).

    Example:
        >>> looks_like_probabilities(torch.softmax(torch.randn(4, 3), dim=1)), looks_like_probabilities(torch.randn(4, 3))
        (True, False)
    """
    if logits.numel() == 0 or bool((logits < 0).any()):
        return False
    sums = logits.double().sum(dim=1)
    return bool(torch.allclose(sums, torch.ones_like(sums), atol=PROBABILITY_TOLERANCE))


def class_logits(model: nn.Module, inputs: Any, role: str) -> torch.Tensor:
    """``model(inputs)`` in eval mode without gradients, checked to be class logits ``(batch, classes)``.

    ``inputs`` is any form of ``qdistill.batch`` (a tensor, a tuple, or a dict of named inputs).

    Errors name ``role`` ("teacher", "student", "model"): inputs that do not fit are ``DataError``s,
    outputs of another kind ``ModelError``s; outputs that look like probabilities give a warning.

    Example:
        >>> class_logits(nn.Linear(4, 3), torch.zeros(2, 4), "teacher").shape
        torch.Size([2, 3])
    """
    was_training = model.training
    try:
        with torch.no_grad():
            output = call_model(model.eval(), inputs)
    except (RuntimeError, ValueError, TypeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"data: inputs of {describe_inputs(inputs)} do not fit the {role} ({first_line})") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or not output.is_floating_point():
        raise ModelError(f"{role} returns {describe_output(output)}; qdistill needs one float tensor of class logits "
                         "(batch, classes): wrap the model so that its forward returns the logits")
    if looks_like_probabilities(output):
        warnings.warn(f"{role} outputs look like probabilities (non-negative, each row sums to 1); qdistill expects "
                      "logits before softmax, and distilling probabilities trains badly", stacklevel=2)
    return output
