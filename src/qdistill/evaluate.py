"""Metrics: accuracy, macro and per-class precision/recall/F1, confusion matrix, agreement, size."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from qdistill.batch import call_model, move_inputs, split_batch
from qdistill.errors import DataError
from qdistill.quant.modules import is_quantized
from qdistill.quant.quantizer import Quantizer, quantizer_parameters

FLOAT_BITS = 32
SCALE_BITS = 32  # each quantization scale is stored as float32
ZERO_POINT_BITS = 32  # activation zero points as int32


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """All logits ``(N, C)`` and labels ``(N,)`` (or None) of ``model`` over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for batch in loader:
        inputs, targets = split_batch(batch)
        logits.append(call_model(model, move_inputs(inputs, device)).float().cpu())
        if targets is not None:
            labels.append(targets.cpu())
    model.train(was_training)
    if not logits:
        raise DataError("evaluation data: the loader yielded no batches; at least one sample is needed")
    return torch.cat(logits).numpy(), (torch.cat(labels).numpy() if labels else None)


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro P/R/F1, per-class P/R/F1/support and the confusion matrix.

    A class with no sample in ``labels`` has no recall or F1 to speak of: it is left out of the
    macro averages (listed under ``absent_classes``, with a warning) and its row shows support 0.

    Example:
        >>> metrics = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), num_classes=2)
        >>> metrics["accuracy"], metrics["recall_macro"], metrics["absent_classes"]
        (0.6666666666666666, 0.75, [])
    """
    classes = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, average=None, zero_division=0
    )
    present = [index for index in classes if support[index] > 0]
    absent = [index for index in classes if support[index] == 0]
    if absent:
        warnings.warn(f"classes {absent} have no sample in the evaluation data; they are left out of the macro "
                      "averages (per-class rows show support 0)", stacklevel=2)
    return {
        "accuracy": float(np.mean(predictions == labels)),
        "precision_macro": float(np.mean(precision[present])),
        "recall_macro": float(np.mean(recall[present])),
        "f1_macro": float(np.mean(f1[present])),
        "absent_classes": absent,
        "per_class": [
            {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for p, r, f, s in zip(precision, recall, f1, support, strict=True)
        ],
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
    }


def count_params(model: nn.Module) -> int:
    """Weights and biases of the network (quantizer step sizes, found by type, are not counted).

    Example:
        >>> count_params(nn.Linear(3, 2))
        8
    """
    step_sizes = {id(parameter) for parameter in quantizer_parameters(model).values()}
    return sum(parameter.numel() for parameter in model.parameters() if id(parameter) not in step_sizes)


def theoretical_size_bytes(model: nn.Module) -> int:
    """Bytes to store the model at its bit widths: quantized weights at their bits plus their
    scales (and activation scale/zero point), everything else (biases, float layers) at 32 bits."""
    bits = 0
    step_sizes = {id(parameter) for parameter in quantizer_parameters(model).values()}
    quantized_weights: set[int] = set()
    for module in model.modules():
        if is_quantized(module):
            quantized_weights.add(id(module.weight))
            bits += module.weight.numel() * module.weight_bits + module.weight_quantizer.scale.numel() * SCALE_BITS
            if module.input_quantizer is not None:
                bits += SCALE_BITS + ZERO_POINT_BITS
    for parameter in model.parameters():
        if id(parameter) not in quantized_weights and id(parameter) not in step_sizes:
            bits += parameter.numel() * FLOAT_BITS
    quantizer_buffers = {id(buffer) for module in model.modules() if isinstance(module, Quantizer)
                         for buffer in module.buffers(recurse=False)}
    for buffer in model.buffers():
        if id(buffer) not in quantizer_buffers and buffer.is_floating_point():
            bits += buffer.numel() * FLOAT_BITS
    return (bits + 7) // 8


def evaluate(model: nn.Module, loader: Iterable[Any], num_classes: int | None = None,
             teacher: nn.Module | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on a labelled ``loader``; with ``teacher``, top-1 agreement too.

    Example:
        >>> from qdistill.data import make_loader
        >>> model = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
        >>> loader = make_loader(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.1]]), torch.tensor([0, 1, 1]), 2, 0, False)
        >>> metrics = evaluate(model, loader)
        >>> metrics["accuracy"], metrics["params"], metrics["size_bytes"]   # 2 of 3 right; 6 float32 parameters
        (0.6666666666666666, 6, 24)
    """
    logits, labels = predict(model, loader)
    teacher_logits = predict(teacher, loader)[0] if teacher is not None else None
    return logit_metrics(model, logits, labels, num_classes, teacher_logits)


def logit_metrics(model: nn.Module, logits: np.ndarray, labels: np.ndarray | None, num_classes: int | None = None,
                  teacher_logits: np.ndarray | None = None) -> dict[str, Any]:
    """``evaluate``'s metrics from logits already computed (``predict``); ``model`` gives the size.

    Example:
        >>> metrics = logit_metrics(nn.Linear(2, 2), np.array([[2.0, 1.0], [0.0, 1.0]]), np.array([0, 0]),
        ...                         teacher_logits=np.array([[1.0, 0.0], [1.0, 0.0]]))
        >>> metrics["accuracy"], metrics["agreement_with_teacher"]
        (0.5, 0.5)
    """
    predictions = logits.argmax(axis=1)
    metrics: dict[str, Any] = {}
    if labels is not None:
        classes = num_classes or int(max(labels.max(), logits.shape[1] - 1)) + 1
        metrics.update(classification_metrics(predictions, labels, classes))
    metrics["params"] = count_params(model)
    metrics["size_bytes"] = theoretical_size_bytes(model)
    if teacher_logits is not None:
        metrics["agreement_with_teacher"] = float(np.mean(teacher_logits.argmax(axis=1) == predictions))
    return metrics


RETRIEVAL_KS = (1, 10)


def nearest_neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """For each row, the indices of its ``k`` most cosine-similar other rows (itself excluded), most similar first.

    Example:
        >>> nearest_neighbours(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), 1).flatten().tolist()
        [1, 0, 1]
    """
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(min(k, len(embeddings) - 1), dim=1).indices


def embedding_metrics(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, Any]:
    """How closely a student's embeddings follow the teacher's on the same held-out texts.

    ``mean_cosine`` / ``min_cosine``: cosine similarity between the two embeddings of each text;
    ``agreement_at_1``: the fraction of texts whose nearest neighbour (cosine, among the other held-out
    texts) is the same for student and teacher; ``agreement_at_10``: the mean overlap of the two
    10-nearest-neighbour sets, divided by 10 (fewer when there are fewer texts).

    Example:
        >>> teacher = torch.eye(4) + 0.1
        >>> metrics = embedding_metrics(teacher * 2, teacher)
        >>> metrics["mean_cosine"], metrics["agreement_at_1"], metrics["agreement_at_10"]
        (1.0, 1.0, 1.0)
    """
    if student.shape != teacher.shape or student.dim() != 2 or len(student) < 2:
        raise DataError(f"embedding metrics need two (samples >= 2, width) tensors of one shape; got "
                        f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    cosine = torch.nn.functional.cosine_similarity(student.double(), teacher.double(), dim=1)
    metrics: dict[str, Any] = {"mean_cosine": round(float(cosine.mean()), 6), "min_cosine": round(float(cosine.min()), 6),
                               "samples": len(student)}
    for k in RETRIEVAL_KS:
        ours, theirs = nearest_neighbours(student, k), nearest_neighbours(teacher, k)
        overlap = [len(set(a) & set(b)) / len(a) for a, b in zip(ours.tolist(), theirs.tolist(), strict=True)]
        metrics[f"agreement_at_{k}"] = round(float(np.mean(overlap)), 6)
    return metrics


@torch.no_grad()
def embed(model: nn.Module, loader: Iterable[Any]) -> torch.Tensor:
    """The model's outputs (embeddings) for every batch of ``loader``, in order, on the CPU."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return torch.cat([call_model(model, move_inputs(split_batch(batch)[0], device)).float().cpu() for batch in loader])
    finally:
        model.train(was_training)


def size_metrics(model: nn.Module) -> dict[str, Any]:
    """``params`` and theoretical ``size_bytes`` of a model (the part of ``evaluate`` that needs no data).

    Example:
        >>> size_metrics(nn.Linear(3, 2))
        {'params': 8, 'size_bytes': 32}
    """
    return {"params": count_params(model), "size_bytes": theoretical_size_bytes(model)}


def evaluate_embeddings(student: nn.Module, teacher: nn.Module,
                        loader: Iterable[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(teacher metrics, student metrics) of an embedding model on held-out inputs: sizes for both, and for
    the student ``embedding_metrics`` against the teacher's embeddings of the same inputs (labels are ignored).

    Example:
        >>> from qdistill.data import make_loader
        >>> loader = make_loader(torch.eye(3), None, 3, 0, False)
        >>> _, student = evaluate_embeddings(nn.Linear(3, 2), nn.Linear(3, 2), loader)
        >>> sorted(student)
        ['agreement_at_1', 'agreement_at_10', 'embedding_samples', 'mean_cosine', 'min_cosine', 'params', 'size_bytes']
    """
    metrics = embedding_metrics(embed(student, loader), embed(teacher, loader))
    metrics["embedding_samples"] = metrics.pop("samples")
    return size_metrics(teacher), {**size_metrics(student), **metrics}
