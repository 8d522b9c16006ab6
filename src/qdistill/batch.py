"""What a batch is: the one place that splits a loader's batch into inputs, labels and cached logits.

A batch is an input tensor alone, or a tuple/list ``(inputs,)``, ``(inputs, labels)`` or
``(inputs, labels, teacher_logits)`` (the last from ``qdistill.kd.CachedTeacherLoader``), or a mapping
in the Hugging Face convention: model inputs by name (``input_ids``, ``attention_mask``, ...) beside
the optional keys ``labels`` (or ``label``) and ``teacher_logits``.

*Inputs* are what the model is called with: one tensor (``model(x)``), a tuple of tensors
(``model(*inputs)``) or a dict of tensors (``model(**inputs)``); integer tensors (token ids) stay
integer. ``call_model``, ``move_inputs``, ``input_tensors``, ``input_rows``, ``take_rows``,
``concat_inputs`` (and ``cpu_inputs``, ``check_inputs``, ``describe_inputs``) are the one place that
knows these three forms; every module that calls a model with a batch's inputs goes through them.
A tuple batch is always read as ``(inputs, labels?, teacher_logits?)``: a model with several
positional inputs gets batches ``((a, b), labels)``, never ``(a, b, labels)``.

Example:
    >>> import torch
    >>> inputs, labels = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
    >>> tuple(inputs.shape), labels.tolist()
    ((2, 3), [0, 1])
    >>> split_batch(torch.zeros(4, 3))[1] is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from qdistill.errors import DataError

LABEL_KEYS = ("labels", "label")
LOGITS_KEY = "teacher_logits"


def batch_parts(batch: Any) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
    """``(inputs, labels, teacher_logits)``; the parts a batch does not carry are None.

    Example:
        >>> batch_parts((torch.zeros(1, 2),))[1:]
        (None, None)
        >>> inputs, labels, _ = batch_parts({"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([0, 1])})
        >>> sorted(inputs), labels.tolist()
        (['input_ids'], [0, 1])
    """
    if isinstance(batch, Mapping):
        labels = next((batch[key] for key in LABEL_KEYS if key in batch), None)
        inputs = {key: value for key, value in batch.items() if key not in (*LABEL_KEYS, LOGITS_KEY)}
        return inputs, labels, batch.get(LOGITS_KEY)
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


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """``model`` called with ``inputs``: ``model(x)``, ``model(*inputs)`` or ``model(**inputs)``.

    Example:
        >>> call_model(lambda a, b: a + b, (torch.ones(1), torch.ones(1))).item()
        2.0
        >>> call_model(lambda input_ids: input_ids.shape, {"input_ids": torch.zeros(2, 7)})
        torch.Size([2, 7])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def forward_batches(model: torch.nn.Module, batches: Iterable[Any], limit: int) -> int:
    """Run ``model`` without gradients on the inputs of up to ``limit`` batches (on the model's device); returns how many.

    The passes whose side effects are the point (calibration, BatchNorm statistics, smoothing maxima) share it.

    Example:
        >>> forward_batches(torch.nn.Linear(3, 1), [(torch.rand(2, 3), torch.zeros(2))] * 5, limit=3)
        3
    """
    device = next(model.parameters()).device
    used = 0
    with torch.no_grad():
        for batch in batches:
            if used >= limit:
                break
            call_model(model, move_inputs(batch_inputs(batch), device))
            used += 1
    return used


def _map_tensors(inputs: Any, change: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(inputs, Mapping):
        return {key: change(value) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(change(value) for value in inputs)
    return change(inputs)


def input_tensors(inputs: Any) -> list[torch.Tensor]:
    """The tensors of ``inputs`` in call order (a dict's in its key order).

    Example:
        >>> [tuple(t.shape) for t in input_tensors({"a": torch.ones(2, 3), "b": torch.ones(2)})]
        [(2, 3), (2,)]
    """
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    return [inputs]


def move_inputs(inputs: Any, device: torch.device | str) -> Any:
    """``inputs`` (any of the three forms) with every tensor on ``device``; dtypes are kept.

    Example:
        >>> move_inputs({"input_ids": torch.ones(1, 2, dtype=torch.long)}, "cpu")["input_ids"].dtype
        torch.int64
    """
    return _map_tensors(inputs, lambda tensor: tensor.to(device))


def input_rows(inputs: Any) -> int:
    """The batch size of ``inputs`` (the first dimension of its first tensor).

    Example:
        >>> input_rows((torch.ones(3, 2), torch.ones(3)))
        3
    """
    return int(input_tensors(inputs)[0].shape[0])


def take_rows(inputs: Any, rows: slice | torch.Tensor | Sequence[int]) -> Any:
    """The given rows (a slice or indices) of every tensor in ``inputs``.

    Example:
        >>> take_rows({"input_ids": torch.arange(6).reshape(3, 2)}, slice(0, 1))["input_ids"].tolist()
        [[0, 1]]
    """
    return _map_tensors(inputs, lambda tensor: tensor[rows])


def concat_inputs(parts: Sequence[Any]) -> Any:
    """Inputs of several batches joined along the batch dimension (all parts of one form).

    Example:
        >>> concat_inputs([torch.ones(1, 2), torch.zeros(2, 2)]).shape
        torch.Size([3, 2])
    """
    first = parts[0]
    if isinstance(first, Mapping):
        return {key: torch.cat([part[key] for part in parts]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(torch.cat([part[index] for part in parts]) for index in range(len(first)))
    return torch.cat(list(parts))


def cpu_inputs(inputs: Any) -> Any:
    """``inputs`` detached on the CPU: float tensors as float32, integer (token ids) and bool tensors kept as they are.

    Example:
        >>> moved = cpu_inputs({"x": torch.ones(1, 2, dtype=torch.float64), "input_ids": torch.ones(1, 2, dtype=torch.long)})
        >>> moved["x"].dtype, moved["input_ids"].dtype
        (torch.float32, torch.int64)
    """
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().cpu()
        return tensor.float() if tensor.is_floating_point() else tensor

    return _map_tensors(inputs, change)


def describe_inputs(inputs: Any) -> str:
    """A short description of ``inputs`` for error messages: shapes, and dtypes other than float32.

    Example:
        >>> describe_inputs(torch.zeros(2, 3))
        'shape (2, 3)'
        >>> describe_inputs({"input_ids": torch.zeros(2, 7, dtype=torch.long), "x": torch.zeros(2, 3)})
        'input_ids (2, 7) int64, x (2, 3)'
    """
    if isinstance(inputs, torch.Tensor):
        return f"shape {tuple(inputs.shape)}" + ("" if inputs.dtype == torch.float32 else f" {_dtype(inputs)}")
    names = list(inputs) if isinstance(inputs, Mapping) else [f"input {index}" for index in range(len(inputs))]
    return ", ".join(f"{name} {tuple(tensor.shape)}" + ("" if tensor.dtype == torch.float32 else f" {_dtype(tensor)}")
                     for name, tensor in zip(names, input_tensors(inputs), strict=True))


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def check_inputs(inputs: Any, what: str) -> None:
    """``DataError`` unless ``inputs`` is one of the three forms: tensors with one batch size, at least one dimension.

    Example:
        >>> check_inputs({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)}, "train data")
        >>> check_inputs({"input_ids": [1, 2]}, "train data")
        Traceback (most recent call last):
        qdistill.errors.DataError: train data: input 'input_ids' is a list; allowed: a tensor, a tuple of tensors or a dict of tensors (e.g. input_ids, attention_mask)
    """
    names = list(inputs) if isinstance(inputs, Mapping) else None
    tensors = input_tensors(inputs)
    if not tensors:
        raise DataError(f"{what}: a batch has no inputs; allowed: a tensor, a tuple of tensors or a dict of tensors")
    for index, tensor in enumerate(tensors):
        label = repr(names[index]) if names else str(index)
        if not isinstance(tensor, torch.Tensor):
            raise DataError(f"{what}: input {label} is a {type(tensor).__name__}; allowed: a tensor, a tuple of tensors "
                            "or a dict of tensors (e.g. input_ids, attention_mask)")
        if tensor.dim() == 0:
            raise DataError(f"{what}: input {label} is a scalar; every input needs a batch dimension first")
    rows = {int(tensor.shape[0]) for tensor in tensors}
    if len(rows) > 1:
        raise DataError(f"{what}: the inputs of one batch have different batch sizes ({describe_inputs(inputs)}); "
                        "they must agree in their first dimension")
