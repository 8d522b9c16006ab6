"""Serving from the packed file: rebuild the int8 ONNX graph in memory and return an ONNX Runtime session.

The file that ships is ``student.qpack.safetensors`` (weights at their true bit width: W4 about 8x,
W2 about 15x smaller than fp32). ``load(path)`` unpacks it into the fake-quant student (bit for
bit), runs the same export code as ``qdistill.export_onnx`` (``export.onnx.build_int8_model``)
into memory, and opens an ONNX Runtime session on the bytes. The graph is the one ``model.onnx``
holds, so the session's outputs equal ``model.onnx``'s bit for bit and it runs at int8 speed.
What is needed to rebuild it lives in the file's header (``rebuild``, format_version 3, written by
``qdistill run`` / ``qdistill export``): the float architecture, the quant settings, the opset and
the input shape (and, for a model of several inputs such as token ids, each input's name, shape
and dtype: ``export.feeds.input_spec``). A file without it (format_version 2, or ``save_packed`` called without
``rebuild``) loads when the caller passes ``model`` (the float architecture or the prepared
student) and ``input_shape``.

Example:
    >>> import tempfile, numpy as np
    >>> from qdistill import models
    >>> from qdistill.export import export_onnx, rebuild_info, save_packed
    >>> from qdistill.export.latency import BATCHES, BUDGET_SECONDS, interleaved_us_per_sample, make_session
    >>> from qdistill.quant import prepare
    >>> from qdistill.recipe import ModelSpec, QuantSpec
    >>> kwargs, quant = {"in_channels": 1, "num_classes": 3, "image_size": 4}, QuantSpec(weight_bits=4, act_bits=8)
    >>> student = prepare(models.create("mlp", **kwargs), quant, calibration_data=[torch.rand(8, 1, 4, 4)])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     onnx_path = export_onnx(student, f"{folder}/model.onnx", torch.rand(1, 1, 4, 4))["path"]
    ...     rebuild = rebuild_info(ModelSpec(name="mlp"), kwargs, quant, (1, 1, 4, 4), 13)
    ...     packed = save_packed(student, f"{folder}/student.qpack.safetensors", rebuild)["path"]
    ...     session, exported = load(packed), make_session(onnx_path)
    >>> x = {"input": np.random.rand(5, 1, 4, 4).astype(np.float32)}
    >>> np.array_equal(session.run(None, x)[0], exported.run(None, x)[0])     # bit for bit
    True
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from qdistill.batch import take_rows
from qdistill.errors import FileFormatError, ModelError
from qdistill.export.feeds import inputs_from_spec, session_feed
from qdistill.export.latency import BATCHES, BUDGET_SECONDS, interleaved_us_per_sample, make_session
from qdistill.export.onnx import OPSET, build_int8_model
from qdistill.export.packed import read_packed, unpack_student
from qdistill.models import build_model
from qdistill.quant import prepare
from qdistill.recipe import ModelSpec, QuantSpec


def _rebuilt_model(header: dict[str, Any], path: Path) -> nn.Module:
    """The prepared student skeleton the header's ``rebuild`` entry describes (weights come from the file)."""
    rebuild = header["rebuild"]
    try:
        spec = ModelSpec.model_validate(rebuild["model"])
        quant = QuantSpec.model_validate(rebuild["quant"])
    except ValueError as error:
        reason = str(error).splitlines()[0]
        raise FileFormatError(f"packed file {str(path)!r}: the header's 'rebuild' entry is not a valid model or quant "
                              f"section ({reason})") from None
    # every scale is overwritten from the file: the cheapest range init gives the same skeleton
    return prepare(build_model(spec, rebuild["model_kwargs"]), quant.model_copy(update={"init": "minmax"}))


def rebuild_onnx(path: str | Path, model: nn.Module | None = None,
                 input_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    """The int8 ONNX model of a packed file, built in memory the way ``export_onnx`` builds ``model.onnx``.

    ``model`` and ``input_shape`` override (or, for a file without a ``rebuild`` header, supply)
    the architecture and the example input's shape; ``input_shape`` is one batch's, e.g. ``(1, 1, 28, 28)``.

    Example (a file without a ``rebuild`` header: the architecture and the shape are given):
        >>> import tempfile
        >>> from qdistill import models
        >>> from qdistill.export import save_packed
        >>> from qdistill.quant import prepare
        >>> student = prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8},
        ...                   calibration_data=[torch.rand(8, 1, 4, 4)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = save_packed(student, f"{folder}/student.qpack.safetensors")["path"]
        ...     graph = rebuild_onnx(path, model=models.create("mlp", in_channels=1, num_classes=3, image_size=4), input_shape=(1, 1, 4, 4))
        >>> sorted({node.op_type for node in graph.graph.node} & {"QuantizeLinear", "DequantizeLinear"})
        ['DequantizeLinear', 'QuantizeLinear']
    """
    path = Path(path)
    header, tensors = read_packed(path)
    rebuild = header.get("rebuild")
    if rebuild is None and (model is None or input_shape is None):
        raise FileFormatError(
            f"packed file {str(path)!r} (format_version {header['format_version']}) does not record how to rebuild its "
            "model (no 'rebuild' header); pass model= (the float architecture or the prepared student) and input_shape= "
            "(e.g. (1, 1, 28, 28)), or re-export the run with `qdistill export DIR --format packed`")
    skeleton = model if model is not None else _rebuilt_model(header, path)
    shape = tuple(input_shape) if input_shape is not None else tuple(rebuild["export"]["input_shape"])
    if not shape or not all(isinstance(size, int) and size >= 1 for size in shape):
        raise ModelError(f"input_shape: {shape!r} is not allowed; allowed: positive integers, one batch's shape, e.g. (1, 1, 28, 28)")
    opset = rebuild["export"]["opset"] if rebuild is not None else OPSET
    student = unpack_student(header, tensors, skeleton, path)
    spec = rebuild["export"].get("inputs") if rebuild is not None and input_shape is None else None
    example = torch.zeros(shape) if spec is None else inputs_from_spec(spec)
    return build_int8_model(student, example if spec is None else (example,), opset)


def load(path: str | Path, model: nn.Module | None = None, input_shape: Sequence[int] | None = None,
         threads: int | None = None, level: str = "all", spinning: bool | None = None) -> ort.InferenceSession:
    """A ready ONNX Runtime session of a packed file's int8 graph; outputs equal ``model.onnx``'s bit for bit.

    ``threads`` sets ONNX Runtime's intra-op threads (None: its default), ``level`` the graph
    optimisation level (``"basic"``, ``"extended"``, ``"all"``: the default, which the int8 graph
    is built for) and ``spinning`` ``session.intra_op.allow_spinning`` (None: ONNX Runtime's
    default), as ``export.make_session`` does for the exported file (docs/deploy.md). ``model`` and ``input_shape``: see ``rebuild_onnx``. Bad files raise
    ``FileFormatError``; a file that does not fit ``model`` raises ``ModelError``.

    Example: see the module docstring.
    """
    return make_session(rebuild_onnx(path, model, input_shape).SerializeToString(), threads=threads, level=level,
                        spinning=spinning)


def _timed_loads(path: Path, loads: int, threads: int | None) -> tuple[ort.InferenceSession, list[float]]:
    seconds, session = [], None
    for _ in range(loads):
        started = time.perf_counter()
        session = load(path, threads=threads)
        seconds.append(time.perf_counter() - started)
    return session, seconds


def serve_bench(path: str | Path, compare: str | Path | None = None, threads: int | None = None,
                batches: Sequence[int] = BATCHES, loads: int = 3, budget_s: float = BUDGET_SECONDS,
                seed: int = 0) -> dict[str, Any]:
    """What ``qdistill serve-bench PATH`` prints: load time, latency and (with ``compare``) bit-equality.

    Returns ``{path, file_bytes, input_shape, threads, load_ms: {first, best}, latency_us_per_sample:
    {batch<N>}, compared_with?, outputs_equal?}``. The load is timed ``loads`` times (the first one
    includes one-off costs such as ONNX Runtime's kernel registration); latency is ONNX Runtime's
    on uniform random inputs in [0, 1) (``seed``; integer inputs such as token ids 0 or 1), timed as ``export.latency`` does (interleaved
    rounds, best of the rounds' medians). ``compare`` is an int8 ONNX file (e.g. the run's
    ``model.onnx``): both sessions run the same batch and ``outputs_equal`` says whether every
    output is bit for bit the same.

    Example:
        >>> info = serve_bench("out/run/student.qpack.safetensors", compare="out/run/model.onnx")  # doctest: +SKIP
        >>> info["outputs_equal"], info["load_ms"]["best"] < 500                                    # doctest: +SKIP
        (True, True)
    """
    path = Path(path)
    if threads is not None and threads < 1:
        raise ModelError(f"--threads: {threads} is not allowed; allowed: an integer >= 1")
    if loads < 1 or not batches or any(batch < 1 for batch in batches):
        raise ModelError(f"serve-bench: loads {loads} and batches {list(batches)} are not allowed; allowed: at least "
                         "one load and positive batch sizes")
    session, seconds = _timed_loads(path, loads, threads)
    shape = session.get_inputs()[0].shape
    rebuild = read_packed(path)[0]["rebuild"]  # present: the load above needed it
    sample_shape = rebuild["export"]["input_shape"][1:]
    generator = torch.Generator().manual_seed(seed)
    spec = rebuild["export"].get("inputs")
    if spec is None:
        inputs = torch.rand(max(batches), *sample_shape, generator=generator)
    else:
        inputs = inputs_from_spec(spec, max(batches), generator)
    runs = {batch: {"packed": _run(session, take_rows(inputs, slice(0, batch)))} for batch in batches}
    latency = {f"batch{batch}": round(interleaved_us_per_sample(runs[batch], batch, budget_s=budget_s)["packed"], 2)
               for batch in batches}
    info: dict[str, Any] = {
        "path": str(path), "file_bytes": path.stat().st_size, "input_shape": [shape[0], *sample_shape],
        "threads": threads if threads is not None else "onnxruntime default",
        "load_ms": {"first": round(seconds[0] * 1e3, 1), "best": round(min(seconds) * 1e3, 1)},
        "latency_us_per_sample": latency,
    }
    if compare is not None:
        reference = make_session(compare, threads=threads)
        ours, theirs = session.run(None, session_feed(session, inputs)), reference.run(None, session_feed(reference, inputs))
        info["compared_with"] = str(compare)
        info["outputs_equal"] = len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    return info


def _run(session: ort.InferenceSession, inputs: Any):
    feed = session_feed(session, inputs)
    return lambda: session.run(None, feed)


__all__ = ["load", "rebuild_onnx", "serve_bench"]
