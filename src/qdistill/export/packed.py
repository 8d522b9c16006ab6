"""Packed low-bit files: each quantized weight stored as integers at its true bit width.

``student.qpack.safetensors`` is a safetensors file. For every quantized layer ``L`` the float
weight ``L.weight`` is replaced by ``L.weight.packed`` (uint8): the codes ``q - qmin`` (all in
``0 .. 2^bits - 1``) written as one little-endian bit stream, value ``i`` in bits
``[i*bits, (i+1)*bits)``, so two 4-bit or four 2-bit values share a byte and 3/5/6/7-bit values
straddle bytes. Everything else in the student's ``state_dict`` (biases, per-channel weight scales
and zero points, activation quantizer scale/zero point, float layers) is stored as it is. The
metadata key ``qdistill_qpack`` holds a JSON header: format name and version, qdistill version,
per layer its bits, grid, shape and axis, per quantizer (every ``Quantizer`` of the student under
each module path it is reached by: weights, layer inputs, residual adds, concatenations, pools,
LayerNorm inputs) its ``bits``, ``signed``, ``axis`` and ``instance`` (paths with the same number
are one shared quantizer), plus a CRC32 per tensor (safetensors itself checks sizes, not contents).

Loading rebuilds each weight as ``(q - zero_point) * scale``. That value is a fixed point of the
student's fake quantizer, so the loaded model computes with exactly the integers it was trained
with: its outputs equal the fake-quant student's bit for bit. From a float architecture the
student is rebuilt by ``prepare`` and every quantizer then gets the bit width the header records;
a quantizer the header does not describe, or one shared differently in the rebuilt model, is a
one-line ``ModelError`` (the file does not fit that architecture). ``format_version`` 1 files
(qdistill before the quantizer table) record only the layers' bits: they load into a prepared
skeleton, or from a float architecture whose only quantizers are its layers'; anything else is
refused naming the first quantizer whose bits the file does not record.

``format_version`` 3 adds an optional ``rebuild`` entry (``rebuild_info``): the float
architecture (the recipe's model section without its checkpoint, and the data's model
arguments), the quant section ``prepare`` was given, and the export settings (``opset``, the
input shape of one sample batch). With it ``qdistill.runtime.load(path)`` rebuilds the int8 ONNX
graph from the file alone; without it (``save_packed`` called with no ``rebuild``, or a version 2
file) the caller passes the architecture. Version 1 and 2 files are still read.

Example (4-bit weights; the first and last layers keep 8 bits, ``first_last_bits``):
    >>> import tempfile, torch
    >>> from qdistill import models
    >>> from qdistill.quant import prepare
    >>> student = prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     info = save_packed(student, f"{folder}/student.qpack.safetensors")
    ...     loaded = load_packed(f"{folder}/student.qpack.safetensors", model=models.create("mlp", in_channels=1, num_classes=3, image_size=4))
    >>> x = torch.rand(2, 1, 4, 4)
    >>> torch.equal(loaded.eval()(x), student.eval()(x))      # bit for bit
    True
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import nn

from qdistill.errors import ExportError, FileFormatError, ModelError
from qdistill.export.feeds import valid_input_spec
from qdistill.io import atomic_write, load_state
from qdistill.quant.fake_quant import MIN_SCALE, IntRange
from qdistill.quant.modules import is_quantized
from qdistill.quant.prepare import prepare
from qdistill.quant.quantizer import Quantizer
from qdistill.quant.smoothing import add_smoothing_buffers
from qdistill.recipe import ModelSpec, QuantSpec
from qdistill.version import __version__

FORMAT_NAME = "qdistill.qpack"
FORMAT_VERSION = 3  # 2: the header's "quantizers" table (bit width of every quantizer); 3: optional "rebuild"
READABLE_VERSIONS = (1, 2, 3)
REBUILD_KEYS = ("model", "model_kwargs", "quant", "export")
HEADER_KEY = "qdistill_qpack"
PACKED_SUFFIX = ".packed"


@dataclass
class IntegerWeight:
    """A quantized layer's weight as integers: ``weight == (ints - zero_point) * scale`` exactly.

    Example:
        >>> from qdistill import models
        >>> student = prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8})
        >>> weights = weight_integers(student.net[4], "net.4")
        >>> weights.qrange, torch.equal(weights.dequantize(), student.net[4].quantized_weight())
        (IntRange(bits=4, signed=True), True)
    """

    ints: torch.Tensor  # int64, same shape as the weight
    scale: torch.Tensor  # float32, (C,) per channel or () per tensor, already clamped like the forward
    zero_point: torch.Tensor  # int64, shape of scale
    axis: int | None
    qrange: IntRange

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` shaped to multiply the weight along ``axis``."""
        if self.axis is None:
            return values.reshape(())
        shape = [1] * self.ints.dim()
        shape[self.axis] = -1
        return values.reshape(shape)

    def dequantize(self) -> torch.Tensor:
        # the same float32 product torch's fake-quantize kernel forms: float(q - z) * s
        return (self.ints - self.broadcast(self.zero_point)).float() * self.broadcast(self.scale)


def weight_integers(layer: nn.Module, name: str) -> IntegerWeight:
    """The trained integers of a quantized layer's weight, checked to reproduce it bit for bit.

    Example:
        >>> from qdistill import models
        >>> student = prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8})
        >>> weights = weight_integers(student.net[4], "net.4")
        >>> weights.ints.dtype, weights.ints.shape, (weights.qrange.qmin, weights.qrange.qmax), weights.axis
        (torch.int64, torch.Size([128, 256]), (-7, 7), 0)
    """
    quantizer = layer.weight_quantizer
    if not bool(quantizer.initialized):
        raise ExportError(f"layer {name!r}: its weight quantizer was never initialised; prepare the student with qdistill.quant.prepare")
    with torch.no_grad():
        dequantized = layer.quantized_weight().detach().cpu().float()
        scale = quantizer.scale.detach().cpu().float().clamp_min(MIN_SCALE)
        zero_point = quantizer.zero_point.detach().cpu().to(torch.int64)
        weights = IntegerWeight(dequantized, scale, zero_point, quantizer.axis, quantizer.qrange)  # ints set below
        codes = torch.round(dequantized / weights.broadcast(scale)) + weights.broadcast(zero_point)
        weights.ints = codes.clamp(quantizer.qrange.qmin, quantizer.qrange.qmax).to(torch.int64)
    if not torch.equal(weights.dequantize(), dequantized):
        raise ExportError(f"layer {name!r}: its quantized weight is not (integer - zero_point) * scale; "
                          "the quantizer's scale must be finite and positive")
    return weights


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes below ``2**bits`` as a little-endian bit stream (uint8).

    Example:
        >>> pack_bits(np.array([1, 2, 3, 4]), 4)       # two 4-bit values per byte
        array([33, 67], dtype=uint8)
    """
    codes = np.asarray(codes, dtype=np.uint16).reshape(-1)
    bit_matrix = (codes[:, None] >> np.arange(bits, dtype=np.uint16)) & 1  # (N, bits), lowest bit first
    return np.packbits(bit_matrix.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` codes of ``bits`` bits (int64).

    Example:
        >>> unpack_bits(np.array([33, 67], dtype=np.uint8), 4, 4)
        array([1, 2, 3, 4])
    """
    bit_stream = np.unpackbits(np.asarray(data, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64))
    return bit_stream.reshape(count, bits).astype(np.int64) @ weights


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if is_quantized(module)}


def _layer_header(layer: nn.Module, weights: IntegerWeight) -> dict[str, Any]:
    return {
        "weight_bits": weights.qrange.bits, "act_bits": layer.act_bits, "signed": weights.qrange.signed,
        "qmin": weights.qrange.qmin, "qmax": weights.qrange.qmax, "shape": list(weights.ints.shape),
        "axis": weights.axis, "kind": type(layer).__name__,
    }


def quantizer_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path: {bits, signed, axis, instance}}`` of every quantizer, shared ones under each path.

    Example (in a ResNet block the residual add's input is also the first conv's input):
        >>> from qdistill import models
        >>> table = quantizer_table(prepare(models.create("tiny_resnet", width=4), {"weight_bits": 4, "act_bits": 4}))
        >>> table["layer1.0.add.input1_quantizer"]["instance"] == table["layer1.0.conv1.input_quantizer"]["instance"]
        True
        >>> {key: table["layer1.0.conv1.weight_quantizer"][key] for key in ("bits", "signed", "axis")}
        {'bits': 4, 'signed': True, 'axis': 0}
    """
    instances: dict[int, int] = {}
    table: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Quantizer):
            instance = instances.setdefault(id(module), len(instances))
            table[path] = {"bits": module.bits, "signed": module.qrange.signed, "axis": module.axis, "instance": instance}
    return table


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def rebuild_info(model: ModelSpec, model_kwargs: dict[str, Any], quant: QuantSpec, input_shape: Iterable[int],
                 opset: int, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The header's ``rebuild`` entry: what ``qdistill.runtime.load`` needs to rebuild the int8 graph.

    ``inputs`` (``export.feeds.input_spec``) records a model of several inputs (a tuple, or named
    inputs such as token ids); ``input_shape`` is then the first input's shape.

    Example:
        >>> info = rebuild_info(ModelSpec(name="mlp", checkpoint="teacher.safetensors"), {"num_classes": 3}, QuantSpec(), (1, 1, 4, 4), 13)
        >>> info["model"]["name"], info["model"]["checkpoint"], info["export"]
        ('mlp', None, {'opset': 13, 'input_shape': [1, 1, 4, 4]})
    """
    export: dict[str, Any] = {"opset": int(opset), "input_shape": [int(size) for size in input_shape]}
    if inputs is not None:
        export["inputs"] = inputs
    return {"model": model.model_copy(update={"checkpoint": None}).model_dump(mode="json"),
            "model_kwargs": json.loads(json.dumps(model_kwargs)), "quant": quant.model_dump(mode="json"),
            "export": export}


def packed_tensors(student: nn.Module, rebuild: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and header ``save_packed`` writes (also used to measure sizes in memory).

    Example (a 128 x 256 weight at 4 bits: two values per byte):
        >>> from qdistill import models
        >>> tensors, header = packed_tensors(prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8}))
        >>> header["layers"]["net.4"]["weight_bits"], tensors["net.4.weight.packed"].dtype, tensors["net.4.weight.packed"].shape
        (4, torch.uint8, torch.Size([16384]))
        >>> "net.4.weight" in tensors
        False
    """
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in student.state_dict().items()}
    layers: dict[str, Any] = {}
    for name, layer in _quantized_layers(student).items():
        if not bool(layer.weight_quantizer.initialized):
            continue  # the forward uses the float weight as it is, so it is stored as it is
        weights = weight_integers(layer, name)
        codes = (weights.ints - weights.qrange.qmin).numpy()
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight{PACKED_SUFFIX}"] = torch.from_numpy(pack_bits(codes, weights.qrange.bits))
        layers[name] = _layer_header(layer, weights)
    header = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "qdistill_version": __version__,
        "bit_order": "little-endian bit stream; value i in bits [i*bits, (i+1)*bits); code = q - qmin",
        "layers": layers, "quantizers": quantizer_table(student),
        "crc32": {key: _crc(value) for key, value in tensors.items()},
    }
    if rebuild is not None:
        header["rebuild"] = rebuild
    return tensors, header


def save_packed(student: nn.Module, path: str | Path, rebuild: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the packed file atomically; returns ``{path, file_bytes}`` (bytes measured on disk).

    ``rebuild`` (``rebuild_info``) is stored in the header so that ``qdistill.runtime.load`` can
    rebuild the int8 ONNX graph from the file alone.

    Example:
        >>> import tempfile
        >>> from qdistill import models
        >>> student = prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     sorted(save_packed(student, f"{folder}/student.qpack.safetensors"))
        ['file_bytes', 'path']
    """
    tensors, header = packed_tensors(student, rebuild)
    metadata = {HEADER_KEY: json.dumps(header, separators=(",", ":"))}
    path = atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    return {"path": str(path), "file_bytes": path.stat().st_size}


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Size of ``model``'s floating-point ``state_dict`` saved as an fp32 safetensors file.

    Example (10 float32 values, 40 bytes, plus the safetensors header):
        >>> fp32_safetensors_bytes(nn.Linear(4, 2))
        168
    """
    quantizers = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, Quantizer))
    # a float model has no quantizer step sizes (float_copy keeps them, passing through, possibly shared)
    tensors = {key: value.detach().cpu().float().contiguous() for key, value in model.state_dict().items()
               if value.is_floating_point() and not key.startswith(quantizers)}
    return len(save_bytes(tensors))


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileFormatError(f"packed file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FileFormatError(f"packed file {str(path)!r} is truncated or not a safetensors file ({reason})") from None
    if HEADER_KEY not in metadata:
        raise FileFormatError(f"packed file {str(path)!r} has no {HEADER_KEY!r} header; it was not written by qdistill.save_packed")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError:
        raise FileFormatError(f"packed file {str(path)!r}: the {HEADER_KEY!r} header is not valid JSON (corrupt file)") from None
    return header, tensors


def _check_header(header: Any, tensors: dict[str, torch.Tensor], path: Path) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise FileFormatError(f"packed file {str(path)!r}: format {header.get('format') if isinstance(header, dict) else None!r} is not {FORMAT_NAME!r}")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise FileFormatError(f"packed file {str(path)!r}: format_version {version!r} is not supported; "
                              f"allowed: {', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 2 and not _valid_quantizers(header.get("quantizers")):
        raise FileFormatError(f"packed file {str(path)!r}: the header's 'quantizers' table is missing or malformed "
                              "(each entry needs integer bits 2..8, signed, axis, instance; corrupt file)")
    if version >= 3 and "rebuild" in header and not _valid_rebuild(header["rebuild"]):
        raise FileFormatError(f"packed file {str(path)!r}: the header's 'rebuild' entry is malformed (it needs "
                              f"{', '.join(REBUILD_KEYS)}; export needs an integer opset and a positive input_shape; corrupt file)")
    checksums = header.get("crc32", {})
    if set(checksums) != set(tensors):
        missing = sorted(set(checksums) ^ set(tensors))[:3]
        raise FileFormatError(f"packed file {str(path)!r}: tensors {missing} do not match the header (corrupt file)")
    for key, tensor in tensors.items():
        if _crc(tensor) != checksums[key]:
            raise FileFormatError(f"packed file {str(path)!r}: tensor {key!r} fails its CRC32 check (corrupt file)")


def _valid_rebuild(rebuild: Any) -> bool:
    if not isinstance(rebuild, dict) or not all(isinstance(rebuild.get(key), dict) for key in REBUILD_KEYS):
        return False
    export, shape = rebuild["export"], rebuild["export"].get("input_shape")
    return (isinstance(export.get("opset"), int) and isinstance(shape, list) and len(shape) >= 1
            and all(isinstance(size, int) and size >= 1 for size in shape)
            and ("inputs" not in export or valid_input_spec(export["inputs"])))


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked JSON header and the tensors of a packed file (every tensor's CRC checked).

    ``load_packed`` is ``read_packed`` then ``unpack_student``; ``qdistill.runtime.load`` reads the
    header first to rebuild the architecture, then unpacks without reading the file again.

    Example:
        >>> import tempfile
        >>> from qdistill import models
        >>> student = prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     header, tensors = read_packed(save_packed(student, f"{folder}/s.qpack.safetensors")["path"])
        >>> header["format_version"], "rebuild" in header, tensors["net.4.weight.packed"].dtype
        (3, False, torch.uint8)
    """
    path = Path(path)
    header, tensors = _read(path)
    _check_header(header, tensors, path)
    return header, tensors


def _valid_quantizers(table: Any) -> bool:
    def valid(entry: Any) -> bool:
        return (isinstance(entry, dict) and isinstance(entry.get("bits"), int) and 2 <= entry["bits"] <= 8
                and isinstance(entry.get("signed"), bool) and entry.get("axis") in (None, 0)
                and isinstance(entry.get("instance"), int))

    return isinstance(table, dict) and all(isinstance(name, str) and valid(entry) for name, entry in table.items())


def _file_quantizers(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The header's quantizer table; for a version-1 file, the layers' weight and input quantizers."""
    if header["format_version"] >= 2:
        return header["quantizers"]
    table: dict[str, dict[str, Any]] = {}
    for name, entry in header["layers"].items():
        table[f"{name}.weight_quantizer"] = {"bits": entry["weight_bits"], "signed": entry["signed"], "axis": entry["axis"]}
        if entry["act_bits"] is not None:
            table[f"{name}.input_quantizer"] = {"bits": entry["act_bits"], "signed": False, "axis": None}
    return table


def _skeleton(model: nn.Module, header: dict[str, Any], path: Path) -> tuple[nn.Module, bool]:
    """A prepared student to load into and whether it was rebuilt from the float ``model``."""
    if _quantized_layers(model):
        return copy.deepcopy(model), False
    axes = {entry["axis"] for entry in header["layers"].values()}
    if len(axes) > 1:
        raise ModelError(f"packed file {str(path)!r}: its layers mix per-channel and per-tensor weights, which "
                         "prepare cannot rebuild from a float model; pass the prepared student as model")
    spec = QuantSpec(first_last_bits=None, granularity="per_tensor" if axes == {None} else "per_channel", init="minmax")
    return prepare(model, spec), True


def _apply_quantizer_bits(student: nn.Module, header: dict[str, Any], rebuilt: bool, path: Path) -> None:
    """Give a rebuilt student the file's bit widths; check a given skeleton's against them."""
    source = f"packed file {str(path)!r}"
    version, table, model_table = header["format_version"], _file_quantizers(header), quantizer_table(student)
    unknown = [name for name in table if name not in model_table]
    if unknown:
        raise ModelError(f"{source}: quantizer {unknown[0]!r} is not in the model; the file was saved from another "
                         f"architecture (model quantizers: {', '.join(list(model_table)[:6])}, ...)")
    missing = [name for name in model_table if name not in table]
    if missing and (version >= 2 or rebuilt):
        if version < 2:
            raise FileFormatError(f"{source}: format_version 1 records only the layers' bit widths, not those of "
                                  f"quantizer {missing[0]!r}; load it into the prepared student (model=prepare(...)) or "
                                  f"re-save it with save_packed (format_version {FORMAT_VERSION})")
        raise ModelError(f"{source}: the model has quantizer {missing[0]!r}, which the file does not record; "
                         "the file was saved from another architecture")
    if version >= 2:
        _check_sharing(table, model_table, source)
    for name, entry in table.items():
        found = model_table[name]
        if entry["axis"] != found["axis"]:
            raise ModelError(f"{source}: quantizer {name!r} has axis {entry['axis']} in the file but {found['axis']} in the model")
        if rebuilt:
            student.get_submodule(name).qrange = IntRange(entry["bits"], entry["signed"])
        elif (entry["bits"], entry["signed"]) != (found["bits"], found["signed"]):
            raise ModelError(f"{source}: quantizer {name!r} is {entry['bits']}-bit in the file but {found['bits']}-bit in the model")
    final = quantizer_table(student)
    clash = next((name for name, entry in table.items() if entry["bits"] != final[name]["bits"]), None)
    if clash is not None:  # paths of one shared quantizer with different bits: the header was edited
        raise FileFormatError(f"{source}: the header gives shared quantizer {clash!r} two bit widths (corrupt header)")


def _check_sharing(table: dict[str, dict[str, Any]], model_table: dict[str, dict[str, Any]], source: str) -> None:
    """Each shared quantizer of the file must be one shared quantizer of the model, and back."""
    for first, second, where, elsewhere in ((table, model_table, "the file", "the model"),
                                            (model_table, table, "the model", "the file")):
        counterparts: dict[int, set[int]] = {}
        for name, entry in first.items():
            counterparts.setdefault(entry["instance"], set()).add(second[name]["instance"])
        split = next((instance for instance, others in counterparts.items() if len(others) > 1), None)
        if split is not None:
            names = [name for name, entry in first.items() if entry["instance"] == split]
            raise ModelError(f"{source}: quantizers {', '.join(map(repr, names[:3]))} are one shared quantizer in "
                             f"{where} but separate ones in {elsewhere}; pass the prepared student as model")


def _unpack_weight(name: str, entry: dict[str, Any], packed: torch.Tensor, state: dict[str, torch.Tensor],
                   path: Path) -> torch.Tensor:
    bits, qmin, qmax = entry["weight_bits"], entry["qmin"], entry["qmax"]
    count = int(np.prod(entry["shape"]))
    if packed.numel() != (count * bits + 7) // 8:
        raise FileFormatError(f"packed file {str(path)!r}: {name}.weight holds {packed.numel()} bytes, {count} values of {bits} bits need {(count * bits + 7) // 8}")
    codes = unpack_bits(packed.numpy(), bits, count)
    if codes.max(initial=0) > qmax - qmin:
        raise FileFormatError(f"packed file {str(path)!r}: {name}.weight has codes above {qmax - qmin} (corrupt file)")
    scale = state[f"{name}.weight_quantizer.scale"].float().clamp_min(MIN_SCALE)
    zero_point = state[f"{name}.weight_quantizer.zero_point"].to(torch.int64)
    weights = IntegerWeight(torch.from_numpy(codes + qmin).reshape(entry["shape"]), scale, zero_point, entry["axis"],
                            IntRange(bits, entry["signed"]))
    return weights.dequantize()


def _check_layers(student: nn.Module, layers: dict[str, Any], path: Path) -> None:
    quantized = _quantized_layers(student)
    for name in layers:
        if name not in quantized:
            raise ModelError(f"packed file {str(path)!r}: layer {name!r} is not a quantized layer of the model; model layers: {', '.join(quantized)}")


def load_packed(path: str | Path, model: nn.Module) -> nn.Module:
    """Rebuild a student from a packed file; outputs equal the saved fake-quant student's bit for bit.

    ``model`` is either the float architecture (it is prepared, then every quantizer gets the bit
    width recorded in the file) or a prepared student skeleton with the same bit widths. ``model``
    is never modified. Missing, truncated or corrupt files and unknown versions raise
    ``FileFormatError``; a file that does not fit ``model`` raises ``ModelError``.

    Example (``model`` a float architecture: the student is rebuilt with the file's bit widths):
        >>> import tempfile
        >>> from qdistill import models
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     info = save_packed(prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8}), f"{folder}/s.qpack.safetensors")
        ...     student = load_packed(info["path"], model=models.create("mlp", in_channels=1, num_classes=3, image_size=4))
        >>> type(student.net[4]).__name__, student.net[4].weight_bits, student.net[1].weight_bits
        ('QuantLinear', 4, 8)
    """
    path = Path(path)
    header, tensors = read_packed(path)
    return unpack_student(header, tensors, model, path)


def unpack_student(header: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module,
                   path: str | Path) -> nn.Module:
    """The student of a file ``read_packed`` returned (``load_packed``'s second half; ``path`` names it in errors).

    Example:
        >>> import tempfile
        >>> from qdistill import models
        >>> student = prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     header, tensors = read_packed(save_packed(student, f"{folder}/s.qpack.safetensors")["path"])
        >>> x = torch.rand(2, 1, 4, 4)
        >>> torch.equal(unpack_student(header, tensors, student, "s.qpack.safetensors")(x), student.eval()(x))
        True
    """
    path = Path(path)
    student, rebuilt = _skeleton(model, header, path)
    add_smoothing_buffers(student, tensors)  # quant.smoothing's 1/s buffers, when the file has them
    _check_layers(student, header["layers"], path)
    _apply_quantizer_bits(student, header, rebuilt, path)  # and checks a given skeleton's bits
    state = {key: value for key, value in tensors.items() if not key.endswith(f".weight{PACKED_SUFFIX}")}
    for name, entry in header["layers"].items():
        packed = tensors.get(f"{name}.weight{PACKED_SUFFIX}")
        if packed is None:
            raise FileFormatError(f"packed file {str(path)!r}: {name}.weight{PACKED_SUFFIX} is missing (corrupt file)")
        state[f"{name}.weight"] = _unpack_weight(name, entry, packed, state, path)
    load_state(student, state, f"packed file {str(path)!r}")
    return student.eval()
