"""A batch's inputs in ONNX: their names, their dynamic axes, and the feed of an ONNX Runtime session.

The names follow the inputs' form (``qdistill.batch``): one tensor is ``input``; a tuple's tensors
are ``input_0``, ``input_1``, ...; a dict's are its keys (``input_ids``, ``attention_mask``, ...).
Every input's axis 0 is dynamic (``batch``); an integer input of two or more dimensions (token ids,
attention masks) also has a dynamic axis 1 (``sequence``), so one file serves every batch size and
sequence length. Integer inputs stay integer (int64 token ids are int64 ONNX inputs).

Example:
    >>> import torch
    >>> inputs = {"input_ids": torch.ones(2, 7, dtype=torch.long), "features": torch.ones(2, 3)}
    >>> onnx_input_names(inputs), dynamic_axes(inputs)
    (['input_ids', 'features'], {'input_ids': {0: 'batch', 1: 'sequence'}, 'features': {0: 'batch'}})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qdistill.batch import cpu_inputs, describe_inputs, input_tensors
from qdistill.errors import ExportError

INPUT_NAME = "input"
BATCH_AXIS, SEQUENCE_AXIS = "batch", "sequence"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def onnx_input_names(inputs: Any) -> list[str]:
    """The ONNX input names of ``inputs``, in call order (module docstring).

    Example:
        >>> onnx_input_names(torch.zeros(1, 3)), onnx_input_names((torch.zeros(1, 3), torch.zeros(1, 2)))
        (['input'], ['input_0', 'input_1'])
    """
    if isinstance(inputs, Mapping):
        return [str(key) for key in inputs]
    if isinstance(inputs, (list, tuple)):
        return [f"{INPUT_NAME}_{index}" for index in range(len(inputs))]
    return [INPUT_NAME]


def dynamic_axes(inputs: Any) -> dict[str, dict[int, str]]:
    """``torch.onnx.export``'s ``dynamic_axes`` for ``inputs``: batch everywhere, sequence on integer inputs of 2+ dims.

    Example:
        >>> dynamic_axes(torch.zeros(1, 1, 8, 8))
        {'input': {0: 'batch'}}
    """
    axes = {}
    for name, tensor in zip(onnx_input_names(inputs), input_tensors(inputs), strict=True):
        integer = not tensor.is_floating_point() and not tensor.is_complex()
        axes[name] = {0: BATCH_AXIS, 1: SEQUENCE_AXIS} if integer and tensor.dim() >= 2 else {0: BATCH_AXIS}
    return axes


def session_feed(session: Any, inputs: Any) -> dict[str, np.ndarray]:
    """The feed of ``session.run`` for ``inputs``: each input the session declares, by name, in its declared type.

    Inputs the session does not declare (the exporter drops inputs the model never reads) are left
    out; an input it declares that ``inputs`` lacks is an ``ExportError`` naming both sides.

    Example:
        >>> class Session:       # what session_feed reads of an onnxruntime.InferenceSession
        ...     def get_inputs(self):
        ...         from types import SimpleNamespace
        ...         return [SimpleNamespace(name="input_ids", type="tensor(int64)")]
        >>> feed = session_feed(Session(), {"input_ids": torch.ones(2, 4, dtype=torch.int32), "unused": torch.ones(2)})
        >>> sorted(feed), feed["input_ids"].dtype
        (['input_ids'], dtype('int64'))
    """
    given = dict(zip(onnx_input_names(inputs), input_tensors(cpu_inputs(inputs)), strict=True))
    feed = {}
    for declared in session.get_inputs():
        tensor = given.get(declared.name)
        if tensor is None:
            raise ExportError(f"the ONNX model's input {declared.name!r} is not among the batch's inputs "
                              f"({', '.join(given)}: {describe_inputs(inputs)}); the batches must have the example "
                              "input's form (a tensor, a tuple or a dict with the same keys)")
        array = tensor.numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        dtype = _ORT_TYPES.get(getattr(declared, "type", None))  # unknown: as cpu_inputs gives it (float32, integers kept)
        feed[declared.name] = array.astype(dtype, copy=False) if dtype is not None else array
    return feed


FORMS = ("tuple", "dict")


def input_spec(inputs: Any) -> dict[str, Any] | None:
    """What a packed file's header records of several inputs (None for one tensor, whose shape is ``input_shape``):
    ``{form: tuple|dict, names, shapes, dtypes}``, one sample's shapes.

    Example:
        >>> input_spec({"input_ids": torch.ones(4, 7, dtype=torch.long), "features": torch.ones(4, 3)})
        {'form': 'dict', 'names': ['input_ids', 'features'], 'shapes': [[1, 7], [1, 3]], 'dtypes': ['int64', 'float32']}
        >>> input_spec(torch.ones(4, 3)) is None
        True
    """
    if isinstance(inputs, torch.Tensor):
        return None
    tensors = input_tensors(inputs)
    return {"form": "dict" if isinstance(inputs, Mapping) else "tuple", "names": onnx_input_names(inputs),
            "shapes": [[1, *[int(size) for size in tensor.shape[1:]]] for tensor in tensors],
            "dtypes": [str(tensor.dtype).removeprefix("torch.") for tensor in tensors]}


def valid_input_spec(spec: Any) -> bool:
    """True when ``spec`` has ``input_spec``'s form (a packed file's header is checked with it).

    Example:
        >>> valid_input_spec({"form": "tuple", "names": ["input_0"], "shapes": [[1, 3]], "dtypes": ["float32"]})
        True
        >>> valid_input_spec({"form": "tuple", "names": ["input_0"], "shapes": [[1, 0]], "dtypes": ["float32"]})
        False
    """
    if not isinstance(spec, dict) or spec.get("form") not in FORMS:
        return False
    names, shapes, dtypes = spec.get("names"), spec.get("shapes"), spec.get("dtypes")
    if not all(isinstance(item, list) for item in (names, shapes, dtypes)) or not len(names) == len(shapes) == len(dtypes) >= 1:
        return False
    return (all(isinstance(name, str) for name in names)
            and all(isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) for dtype in dtypes)
            and all(isinstance(shape, list) and shape and all(isinstance(size, int) and size >= 1 for size in shape)
                    for shape in shapes))


def inputs_from_spec(spec: dict[str, Any], rows: int = 1, generator: torch.Generator | None = None) -> Any:
    """Inputs of ``rows`` samples in the form ``spec`` records: float inputs uniform in [0, 1), integer inputs
    0 or 1 (valid token ids, attention masks and token types), bool inputs True; zeros and True without ``generator``.

    Example:
        >>> spec = {"form": "dict", "names": ["input_ids", "x"], "shapes": [[1, 7], [1, 3]], "dtypes": ["int64", "float32"]}
        >>> inputs = inputs_from_spec(spec, rows=2)
        >>> tuple(inputs["input_ids"].shape), inputs["input_ids"].dtype, tuple(inputs["x"].shape)
        ((2, 7), torch.int64, (2, 3))
    """
    tensors = []
    for shape, dtype_name in zip(spec["shapes"], spec["dtypes"], strict=True):
        dtype, size = getattr(torch, dtype_name), (rows, *shape[1:])
        if dtype == torch.bool:
            tensors.append(torch.ones(size, dtype=dtype))
        elif generator is None:
            tensors.append(torch.zeros(size, dtype=dtype))
        elif dtype.is_floating_point:
            tensors.append(torch.rand(size, generator=generator).to(dtype))
        else:
            tensors.append(torch.randint(0, 2, size, generator=generator).to(dtype))
    if spec["form"] == "dict":
        return dict(zip(spec["names"], tensors, strict=True))
    return tuple(tensors)


__all__ = ["INPUT_NAME", "dynamic_axes", "input_spec", "inputs_from_spec", "onnx_input_names", "session_feed",
           "valid_input_spec"]
