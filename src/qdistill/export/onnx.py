"""ONNX export with int8 kernels checked and a parity gate against the PyTorch student.

``export_onnx`` writes a QDQ model (opset 13, dynamic batch) through the TorchScript exporter.
Its inputs follow the example's form (``export.feeds``): ``input`` for one tensor, ``input_0``,
``input_1``, ... for a tuple, a dict's keys for named inputs (token ids stay int64, with a dynamic
``sequence`` axis); the parity gate, the diagnosis and latency feed batches by those names.

1. A copy of the student whose weight quantizers write ``DequantizeLinear`` over an int8
   initializer holding the trained integers (times ``weight_multiplier``; no float weights in
   the file); the input quantizers write ``QuantizeLinear -> [integer Clip] -> DequantizeLinear``
   (``QdqForExport``), the Clip keeping grids narrower than 8 bits exact inside int8 tensors.
2. ``qdq_graph.rewrite_for_int8`` moves each Q up to the layer that produces its input, so ONNX
   Runtime fuses ``QLinearConv``/``QGemm``, gives conv biases an int32 form that rounds like
   PyTorch on zero input, and gives output layers an explicit integer form.
3. ONNX Runtime optimises the file (``ORT_ENABLE_EXTENDED``, saved with
   ``optimized_model_filepath``); every quantized layer's int8 weight must feed an integer kernel
   (QLinearConv, QGemm, ConvInteger, MatMulInteger, ...), and every quantized op without weights
   must be an integer kernel writing its quantized output (``QuantAdd``: QLinearAdd, ``QuantCat``:
   QLinearConcat, ``QuantAvgPool2d``: QLinearAveragePool, ``QuantAdaptiveAvgPool2d``:
   QLinearGlobalAveragePool, or QLinearAveragePool at other output sizes), or ``ExportError``
   names the layer or op. Exempt, because they are not quantized ops: ``QuantLayerNorm`` (ONNX
   Runtime has no integer LayerNorm; its statistics are per sample, so it computes in float and
   only its *input* is quantized, which lets the residual Add before it fuse into QLinearAdd),
   and what ``prepare`` leaves float and lists in ``student.qdistill_unquantized`` or never
   quantizes: softmax and the attention score/value matmuls, mean pooling written as
   ``x.mean()``, GELU and other activations between quantizers.
4. Parity gate on the validation loader (``parity_gate``, a pure function of the two sets of
   logits and the labels), three rules:

   - **Logits.** ``logit_sqnr_db``, the SQNR of ONNX Runtime's logits against the student's
     (both centred per sample: softmax and top-1 ignore a constant added to a sample's logits,
     so such a constant must neither count as signal nor as error) over all samples but the
     worst 1% (at least one sample once there are two), must be at least
     ``LOGIT_SQNR_GATE_DB`` (40 dB: logits equal to 1% RMS). An honest export computes the
     student's integers, so its logits match to float precision (about 140 dB on the test
     models) except on rare samples where a float rounding tie sends one activation code the
     other way and the difference cascades (measured on a W4A4 MobileNetV2 after QAT: 47 dB
     over all 360 validation samples because of one of them, above 130 dB without it); leaving
     those out keeps the bound from failing on them, while a corrupted weight or scale moves the
     logits of most samples. ``logit_sqnr_db_all`` is the figure over every sample. What the
     bound cannot see: a 3-step change of one weight of an 8-bit layer moves the logits only to
     55-85 dB on the test models, a level the float ops of an honest export can reach (67 dB on
     a W8A8 transformer: softmax, LayerNorm, GELU); at 4 bits the same change in an early layer
     gives 14-35 dB and fails.
   - **Top-1.** A sample whose top-1 class differs from the student's ("flip") fails the gate,
     unless it is a near tie: the student's top-2 margin is at most twice the largest (centred)
     logit error measured on the samples that did *not* flip (``near_tie_margin``), i.e. an error the
     export demonstrably makes elsewhere could have caused it. Near-tie flips are reported as
     ``near_tie_flips`` and do not fail; a flip with a clear margin always fails, whatever the
     number of samples. (The margin is measured on the other samples because a flip's own error
     always exceeds half its margin, so measuring it on the flip itself would excuse every flip.)
   - **Accuracy.** ONNX accuracy within 0.1 pp of the student's, with the near-tie flips counted
     as the student predicted them, so a near-tie flip cannot fail through this rule either
     (with no clear flips the rule always holds; it states what the reported accuracy may show).

   On failure each layer's output is compared with the student's (truncated graphs vs forward
   hooks) and the error names the first layer that diverges. Without validation data nothing is
   compared and the returned info says ``parity_checked: False``.

The file appears at ``path`` only when every check passed.

Example (a tiny prepared MLP; ``verify_on`` takes batches of inputs, with or without labels):
    >>> import tempfile, torch
    >>> from qdistill import models, quant
    >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4),
    ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     info = export_onnx(student, f"{folder}/model.onnx", torch.rand(1, 1, 4, 4), verify_on=[torch.rand(16, 1, 4, 4)])
    >>> info["parity_checked"], info["samples"], info["integer_ops"]
    (True, 16, {'net.1': 'QGemm', 'net.4': 'QGemm', 'net.7': 'QGemm'})
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from qdistill.batch import (
    batch_inputs,
    call_model,
    check_inputs,
    cpu_inputs,
    describe_inputs,
    input_tensors,
    move_inputs,
    split_batch,
    take_rows,
)
from qdistill.errors import DataError, ExportError
from qdistill.evaluate import predict
from qdistill.export.feeds import dynamic_axes, onnx_input_names, session_feed
from qdistill.export.latency import first_samples, make_session
from qdistill.export.packed import IntegerWeight, weight_integers
from qdistill.export.qdq_graph import (
    FLOAT_CODE_FORM,
    FLOAT_LOOKUP_KERNELS,
    INTEGER_OPS,
    LAYER_MARKER,
    LOOKUP_MARKER,
    OP_KERNELS,
    OP_MARKER,
    LayerInfo,
    OpInfo,
    _array,
    _prune,
    float_code_codes,
    rewrite_for_int8,
)
from qdistill.io import atomic_write
from qdistill.models.outputs import OUTPUT_KINDS
from qdistill.quant.modules import QUANTIZED_OPS, QuantElementwise, is_quantized
from qdistill.version import __version__

OPSET = 13
OUTPUT_NAME = "logits"  # the inputs' names: export.feeds (``input``, ``input_0``..., or a dict's keys)
LOGIT_SQNR_GATE_DB = 40.0  # bound on logit_sqnr_db (SQNR of ORT's logits vs the student's, worst 1% of samples left out)
LOGIT_SQNR_TRIM = 0.01  # the share of samples (the worst, at least one) left out of logit_sqnr_db
NEAR_TIE_FACTOR = 2.0  # a flip is a near tie when the student's top-2 margin <= this * the logit error elsewhere
ACCURACY_GATE = 0.001  # 0.1 percentage points (near-tie flips counted as the student predicted them)
CODE_CONV_KERNEL = "Conv on integer codes (exact int32 sums)"  # a narrow layer's kernel, see FLOAT_CODE_FORM
EMBEDDING_MEAN_COSINE_GATE = 0.999  # output_kind "embedding": mean cosine(ONNX, student) over the samples, at least
EMBEDDING_MIN_COSINE_GATE = 0.99  # and the worst sample's cosine, at least (the same integer grid: near 1 when honest)
DIVERGENCE_SQNR_DB = 30.0  # below this a layer's output no longer tracks the student's
DIAGNOSIS_SAMPLES = 256
FLOAT_OUTPUT_MATMULS = ("MatMulIntegerToFloat", "MatMulInteger")
LAYERS_KEY = "qdistill_layers"
OPS_KEY = "qdistill_ops"
DROPPED_KEY = "qdistill_dropped_layers"  # {name: why}: quantized layers whose output the model never uses
UNUSED_OUTPUT = ("computed, but the model's output does not depend on it (e.g. BertModel's pooler under mean "
                 "pooling); the exporter removed it, so it does not run in the ONNX file")


class _DequantizeWeight(torch.autograd.Function):
    """Returns the dequantized weight; in ONNX, ``DequantizeLinear`` over an int8 initializer."""

    @staticmethod
    def forward(ctx, weight, layer_name, ints, scale, zero_point, axis):
        shape = _shape(ints, axis)
        dequantized = (ints.astype(np.float32) - zero_point.astype(np.float32).reshape(shape)) * scale.reshape(shape)
        return torch.from_numpy(dequantized.astype(np.float32)).to(weight.dtype)

    @staticmethod
    def symbolic(g, weight, layer_name, ints, scale, zero_point, axis):
        attributes = {f"{LAYER_MARKER}_s": layer_name}  # read and removed by rewrite_for_int8
        if axis is not None:
            attributes["axis_i"] = axis
        constants = [g.op("Constant", value_t=torch.from_numpy(array)) for array in (ints, scale, zero_point)]
        return g.op("DequantizeLinear", *constants, **attributes)


class _MarkOp(torch.autograd.Function):
    """Passes a quantized op's result on; in ONNX, an ``Identity`` carrying the op's module name."""

    @staticmethod
    def forward(ctx, output, op_name):
        return output.clone()

    @staticmethod
    def symbolic(g, output, op_name):
        return g.op("Identity", output, **{f"{OP_MARKER}_s": op_name})  # read and removed by rewrite_for_int8


class _LookupMarker(torch.autograd.Function):
    """Passes the activation's output on; in ONNX, an ``Identity`` on the quantized *input* carrying the table
    (the float activation's nodes, now unused, are dropped by the exporter)."""

    @staticmethod
    def forward(ctx, quantized_input, output, name, table):
        return output.clone()

    @staticmethod
    def symbolic(g, quantized_input, output, name, table):
        # read and removed by rewrite_for_int8, which writes Cast -> Gather(table) on the input codes
        attributes = {f"{LOOKUP_MARKER}_name_s": name, f"{LOOKUP_MARKER}_table_t": torch.from_numpy(table)}
        return g.op("Identity", quantized_input, **attributes)


class _ExportLookup(nn.Module):
    """Stands in for a ``QuantElementwise`` in the export copy: same values, written as a table lookup."""

    def __init__(self, name: str, module: QuantElementwise) -> None:
        super().__init__()
        self.name, self.inner, self.input_quantizer = name, module.inner, module.input_quantizer
        self.table = module.lookup_table().numpy()  # not a tensor: apply() would trace it as an input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = self.input_quantizer(x)
        return _LookupMarker.apply(quantized, self.inner(quantized), self.name, self.table)


def _mark_lookups(export_model: nn.Module) -> None:
    for name, module in list(export_model.named_modules()):
        if isinstance(module, QuantElementwise):
            export_model.set_submodule(name, _ExportLookup(name, module))


def _mark_ops(export_model: nn.Module) -> None:
    """Each quantized op without weights marks its output, so the rewrite can find and check it."""
    for name, module in export_model.named_modules():
        if not isinstance(module, QUANTIZED_OPS):
            continue
        if "output_quantizer" in module._modules:  # the op's own result, before it quantizes it
            module.output_quantizer.register_forward_pre_hook(lambda _, args, name=name: (_MarkOp.apply(args[0], name),))
        else:
            module.register_forward_hook(lambda module, args, output, name=name: _MarkOp.apply(output, name))


def _shape(ints: np.ndarray, axis: int | None) -> list[int]:
    if axis is None:
        return []
    shape = [1] * ints.ndim
    shape[axis] = -1
    return shape


STRETCH_LIMIT = 63  # the largest stretched low-bit weight code: cannot saturate u8s8 sums (weight_multiplier)


def weight_multiplier(weights: IntegerWeight) -> int:
    """The integer ``k`` a low-bit weight grid is stretched by in the file (1 for 8-bit weights).

    ONNX Runtime adds a Conv/Gemm bias as int32 in units of ``s_x * s_w`` (its BiasQuantization
    rounds the float bias to that grid). At 2-4 bits ``s_w`` is coarse and the rounding costs up
    to half an accumulator unit per output: 16-30 dB SQNR on a random W2/W4 net, enough to flip
    predictions. Storing ``k * q`` with scale ``s / k`` keeps the weight values and the
    ``2**bits``-level grid, and makes the bias grid ``k`` times finer.

    ``k * qmax <= 63`` (``STRETCH_LIMIT``): on x86 CPUs without VNNI, ONNX Runtime's u8s8 kernels
    add two products in a saturating 16-bit step, so a weight beyond [-64, 63] needs its slower
    exact u8u8 kernels (``make_session``'s ``session.x64quantprecision``). Stretched to 63 the
    codes cannot saturate (``255 * 63 * 2 < 32767``) and keep the fast kernels on every CPU: the
    demo CNN's W4A4 file on an AVX2 CPU ran at 63.1 us/sample with ``k = 9`` against 82.9 with
    ``k = 18`` (batch 64, one thread), with the same logits.

    Example (the first and last layers keep 8-bit weights, ``first_last_bits``):
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 8})
        >>> weight_multiplier(weight_integers(student.net[1], "net.1")), weight_multiplier(weight_integers(student.net[4], "net.4"))
        (1, 9)
    """
    if not weights.qrange.signed or bool((weights.zero_point != 0).any()):
        return 1
    return max(1, STRETCH_LIMIT // max(abs(weights.qrange.qmin), weights.qrange.qmax))


class _IntegerWeight(nn.Module):
    """Stands in for a weight quantizer in the export copy; holds the trained integers (times ``k``)."""

    def __init__(self, layer_name: str, weights: IntegerWeight) -> None:
        super().__init__()
        dtype = np.int8 if weights.qrange.signed else np.uint8
        self.multiplier = weight_multiplier(weights)
        self.layer_name = layer_name
        self.ints = (weights.ints * self.multiplier).numpy().astype(dtype)
        self.scale = (weights.scale / self.multiplier).numpy().astype(np.float32)
        self.zero_point = weights.zero_point.numpy().astype(dtype)
        self.axis = weights.axis

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _DequantizeWeight.apply(weight, self.layer_name, self.ints, self.scale, self.zero_point, self.axis)


def _export_copy(student: nn.Module) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A CPU copy of the student with integer weights, and each quantized layer's bit widths."""
    export_model = copy.deepcopy(student).cpu().eval()
    bits: dict[str, dict[str, Any]] = {}
    for name, layer in export_model.named_modules():
        if not is_quantized(layer):
            continue
        quantizer = layer.input_quantizer
        if quantizer is not None and not bool(quantizer.initialized):
            raise ExportError(f"layer {name!r}: its input quantizer was never calibrated (no data reached it), so it "
                              "would run in float; calibrate the student (qdistill.quant.calibrate) before exporting")
        bits[name] = {"weight_bits": layer.weight_bits, "act_bits": layer.act_bits}
        if getattr(layer, "bias", None) is not None:  # the bias as the student adds it: already on the runtime's int32 grid
            layer.bias.data = layer.quantized_bias().detach().clone()
        layer.weight_quantizer = _IntegerWeight(name, weight_integers(layer, name))
        bits[name]["weight_int_multiplier"] = layer.weight_quantizer.multiplier
    if not bits:
        raise ExportError("student: no quantized layer found; export_onnx needs a model made by qdistill.quant.prepare")
    _mark_ops(export_model)
    _mark_lookups(export_model)
    return export_model, bits


class _Positional(nn.Module):
    """Calls ``model`` with keyword inputs from positional tensors, so the exported inputs keep the dict's order and names."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, tensors, strict=True)))


def _torchscript_export(model: nn.Module, example: Any, path: Path, opset: int) -> None:
    """``example`` (inputs from ``_example``) gives the ONNX inputs: names, dtypes, dynamic axes (``export.feeds``)."""
    names = onnx_input_names(example)
    traced = _Positional(model, list(example)) if isinstance(example, dict) else model
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        try:
            torch.onnx.export(traced, tuple(input_tensors(example)), str(path), dynamo=False, opset_version=opset,
                              input_names=names, output_names=[OUTPUT_NAME],
                              dynamic_axes={**dynamic_axes(example), OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        except Exception as error:  # the exporter raises many types for unsupported Python
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise ExportError(f"ONNX export failed in torch.onnx.export ({reason}); the model must be traceable with one tensor output") from None


def _example(example_input: Any) -> Any:
    """The first sample of ``example_input`` (a batch, read as ``qdistill.batch`` reads batches), on the CPU.

    A tuple is a batch ``(inputs, labels?, ...)``, so a model with several positional inputs is given
    ``((a, b),)``; a dict gives named inputs. Float tensors become float32; integer inputs stay integer.
    """
    inputs = batch_inputs(example_input)
    try:
        check_inputs(inputs, "example_input")
    except DataError as error:
        raise ExportError(f"{error}, e.g. train_x[:1]") from None
    if any(tensor.is_complex() for tensor in input_tensors(inputs)):
        raise ExportError(f"example_input: complex inputs ({describe_inputs(inputs)}) are not allowed; allowed: float, "
                          "integer (token ids) or bool tensors")
    return take_rows(cpu_inputs(inputs), slice(0, 1))


def _called_layers(model: nn.Module, example: Any, names: list[str]) -> list[str]:
    """Which of the layers ``names`` a forward pass of ``model`` on ``example`` calls (absent from the graph: unused output)."""
    if not names:
        return []
    called: list[str] = []
    hooks = [model.get_submodule(name).register_forward_hook(lambda *_, name=name: called.append(name)) for name in names]
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(set(called))


def build_int8_model(student: nn.Module, example_input: Any, opset: int = OPSET) -> onnx.ModelProto:
    """The rewritten int8 QDQ ``ModelProto`` (not yet checked against ONNX Runtime).

    Example:
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4),
        ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
        >>> model = build_int8_model(student, torch.rand(1, 1, 4, 4))
        >>> [value.name for value in model.graph.input], [prop.key for prop in model.metadata_props]
        (['input'], ['qdistill_layers', 'qdistill_ops', 'qdistill_version'])
    """
    export_model, bits = _export_copy(student)
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw.onnx"
        _torchscript_export(export_model, _example(example_input), raw, opset)
        model = onnx.load(str(raw))
    layers, ops = rewrite_for_int8(model)
    missing = sorted(set(bits) - set(layers))
    dropped = {name: UNUSED_OUTPUT for name in _called_layers(export_model, _example(example_input), missing)}
    missing = [name for name in missing if name not in dropped]
    if missing:
        raise ExportError(f"layers {missing} did not appear in the exported graph (not called in forward?); every quantized layer must run")
    table = [{**info.as_dict(), **bits[name]} for name, info in layers.items()]
    props = {LAYERS_KEY: json.dumps(table), OPS_KEY: json.dumps([op.as_dict() for op in ops.values()])}
    if dropped:
        props[DROPPED_KEY] = json.dumps(dropped)
    helper.set_model_props(model, {**props, "qdistill_version": __version__})
    model.producer_name, model.doc_string = "qdistill", "int8 QDQ model written by qdistill.export_onnx"
    onnx.checker.check_model(model)
    return model


def _metadata(model: onnx.ModelProto, key: str) -> list[dict[str, Any]] | None:
    for prop in model.metadata_props:
        if prop.key == key:
            return json.loads(prop.value)
    return None


def _layer_table(model: onnx.ModelProto) -> list[dict[str, Any]]:
    table = _metadata(model, LAYERS_KEY)
    if table is None:
        raise ExportError(f"ONNX file has no {LAYERS_KEY!r} metadata; it was not written by qdistill.export_onnx")
    return table


def _layer_kernels(table: list[dict[str, Any]], optimized: onnx.ModelProto) -> dict[str, str]:
    kernels: dict[str, str] = {}
    for entry in table:
        if entry["op"] == "Gather":
            kernels[entry["name"]] = "Gather (embedding lookup, no arithmetic)"
            continue
        ops = [node.op_type for node in optimized.graph.node if entry["weight"] in node.input]
        if entry["form"] == FLOAT_CODE_FORM:  # exact integer sums in a float Conv (qdq_graph._float_code_conv)
            readers = [node for node in optimized.graph.node if entry["weight"] in node.input]
            if not any(node.op_type == "Conv" and node.input[0] == f"{entry['name']}.input_codes" for node in readers):
                raise ExportError(f"ONNX Runtime rewrote layer {entry['name']!r} (its integer codes feed {'/'.join(ops) or 'nothing'}, "
                                  "not a Conv on integer codes); its integer sums would no longer be exact")
            kernels[entry["name"]] = CODE_CONV_KERNEL
            continue
        integer = [op for op in ops if op in INTEGER_OPS]
        if not integer:
            found = "/".join(ops) if ops else "a folded float constant"
            raise ExportError(f"ONNX Runtime runs layer {entry['name']!r} in float (its int8 weight feeds {found}); "
                              "every quantized layer must use an integer kernel (QLinearConv, QGemm, ConvInteger, MatMulInteger)")
        kernels[entry["name"]] = integer[0]
    return kernels


def _op_kernels(table: list[dict[str, Any]], optimized: onnx.ModelProto) -> dict[str, str]:
    producers = {output: node for node in optimized.graph.node for output in node.output}
    kernels: dict[str, str] = {}
    for entry in table:
        op = OpInfo(**entry)
        allowed = OP_KERNELS.get(op.op, ())
        if op.op == "Lookup" and op.quantized_output is None:  # exact float values: its readers are float ops
            kernels[op.name] = "Gather (float table)"
            continue
        if op.op == "MatMul" and op.quantized_output is None:  # scores before a softmax: integer product, float result
            producer = producers.get(op.output)
            kernel = producer.op_type if producer is not None else "nothing"
            if kernel not in FLOAT_OUTPUT_MATMULS:
                raise ExportError(f"ONNX Runtime runs quantized op {op.name!r} (MatMul) in float ({kernel}); it must "
                                  f"run as {' or '.join(FLOAT_OUTPUT_MATMULS)}")
            kernels[op.name] = kernel
            continue
        if op.quantized_output is None:
            raise ExportError(f"quantized op {op.name!r} ({op.op}) cannot run in integers: its result feeds no "
                              f"quantizer (it feeds {op.feeds or 'nothing'} in float), so ONNX Runtime has no output scale "
                              "for an integer kernel; every quantized op must feed one quantized layer or op")
        producer = producers.get(op.quantized_output)
        kernel = producer.op_type if producer is not None else "nothing (folded away)"
        if op.op == "Lookup" and op.form:  # exact float ops, checked on every input code (qdq_graph._float_lookups)
            allowed = FLOAT_LOOKUP_KERNELS
        if kernel not in allowed:
            expected = " or ".join(allowed) or "an integer kernel"
            raise ExportError(f"ONNX Runtime runs quantized op {op.name!r} ({op.op}) in float (its integer output is "
                              f"written by {kernel}); every quantized op must run as an integer kernel ({expected})")
        kernels[op.name] = f"{kernel} ({op.form})" if op.form else kernel
    return kernels


def integer_kernels(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """``({layer: integer op}, {op: integer op})`` after ONNX Runtime's optimisation; ``ExportError``
    if a quantized layer or a quantized op without weights (add, concat, pool) runs in float.

    A layer runs in integers when its int8 weight initializer feeds an integer kernel in the
    optimised graph (a narrow first conv, ``FLOAT_CODE_FORM``: when a float Conv sums its integer
    codes exactly, ``CODE_CONV_KERNEL``); an op when the integer tensor its result is quantized to is written by its
    integer kernel (``OP_KERNELS``) rather than by a ``QuantizeLinear`` after a float op.

    Example (a small ResNet: its residual adds and its pooling are quantized ops):
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("tiny_resnet", width=4), {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 8, 8)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     layers, ops = integer_kernels(export_onnx(student, f"{folder}/model.onnx", torch.rand(1, 1, 8, 8))["path"])
        >>> layers["stem.0"], layers["layer1.0.conv1"], layers["fc"], ops
        ('Conv on integer codes (exact int32 sums)', 'QLinearConv', 'QGemm', {'layer1.0.add': 'QLinearAdd', 'layer2.0.add': 'QLinearAdd', 'layer3.0.add': 'QLinearAdd', 'pool': 'QLinearGlobalAveragePool'})
    """
    model = onnx.load(str(path))
    layer_table, op_table = _layer_table(model), _metadata(model, OPS_KEY) or []
    with tempfile.TemporaryDirectory() as folder:
        optimized_path = Path(folder) / "optimized.onnx"
        # the kernels as the graph is written, whatever this CPU is (make_session: exact_int8)
        make_session(path, level="extended", optimized_path=optimized_path, exact_int8=False)
        optimized = onnx.load(str(optimized_path))
    return _layer_kernels(layer_table, optimized), _op_kernels(op_table, optimized)


def wide_weight_layers(model: onnx.ModelProto) -> dict[str, int]:
    """``{layer: its largest |weight code|}`` for the integer layers whose int8 weights leave [-64, 63].

    On x86 CPUs without VNNI (AVX2 only), ONNX Runtime's fast u8s8 kernels add two products in a
    saturating 16-bit step, so such a layer runs exactly only on its slower u8u8 kernels
    (``make_session``'s ``exact_int8``). ``quant.weight_bits: 7`` keeps every code within
    [-64, 63] (``STRETCH_LIMIT``), as ``quantize_static``'s ``reduce_range`` does. Low-bit weights
    are stretched only up to 63 (``weight_multiplier``), so only layers at 8 bits can be listed.

    Example (8-bit weights reach +-127 on their widest channel; 7-bit ones stay within the range):
        >>> from qdistill import models, quant
        >>> net = models.create("mlp", in_channels=1, num_classes=3, image_size=4)
        >>> def wide(bits):
        ...     student = quant.prepare(net, {"weight_bits": bits, "act_bits": 8, "first_last_bits": bits},
        ...                             calibration_data=[torch.rand(8, 1, 4, 4)])
        ...     return wide_weight_layers(build_int8_model(student, torch.rand(1, 1, 4, 4)))
        >>> sorted(wide(8)), wide(7)
        (['net.1', 'net.4', 'net.7'], {})
    """
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    wide: dict[str, int] = {}
    for entry in _layer_table(model):
        tensor = initializers.get(entry["weight"])
        if (entry["op"] == "Gather" or entry["form"] == FLOAT_CODE_FORM or tensor is None
                or tensor.data_type != onnx.TensorProto.INT8):
            continue  # lookups do no arithmetic; float-code convs and uint8 weights never meet a u8s8 kernel
        codes = numpy_helper.to_array(tensor).astype(np.int16)
        if codes.min() < -(STRETCH_LIMIT + 1) or codes.max() > STRETCH_LIMIT:
            wide[entry["name"]] = int(np.abs(codes).max())
    return wide


def check_integer_kernels(path: str | Path) -> dict[str, str]:
    """``{layer: integer op}`` after ONNX Runtime's optimisation; ``ExportError`` if a layer or op runs in float.

    See ``integer_kernels``, which also returns the ops' kernels.

    Example:
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4),
        ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     check_integer_kernels(export_onnx(student, f"{folder}/model.onnx", torch.rand(1, 1, 4, 4))["path"])
        {'net.1': 'QGemm', 'net.4': 'QGemm', 'net.7': 'QGemm'}
    """
    return integer_kernels(path)[0]


def onnx_predict(session, loader: Iterable[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """All logits ``(N, C)`` and labels (or None) of an ONNX Runtime session over ``loader``.

    Each batch's inputs (any form of ``qdistill.batch``) are fed by input name (``export.feeds``).

    Example:
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4),
        ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     session = make_session(export_onnx(student, f"{folder}/model.onnx", torch.rand(1, 1, 4, 4))["path"])
        >>> logits, labels = onnx_predict(session, [(torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1]))])
        >>> logits.shape, labels.tolist()
        ((5, 3), [0, 1, 2, 0, 1])
    """
    logits, labels = [], []
    for batch in loader:
        inputs, targets = split_batch(batch)
        logits.append(session.run(None, session_feed(session, inputs))[0])
        if targets is not None:
            labels.append(targets.cpu().numpy())
    if not logits:
        raise ExportError("verify_on: the loader yielded no batches; the parity gate needs at least one sample")
    return np.concatenate(logits), (np.concatenate(labels) if labels else None)


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def parity_metrics(onnx_logits: np.ndarray, student_logits: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Agreement, flips (near ties apart), logit SQNR, accuracies and the largest logit difference.

    See the module docstring for ``logit_sqnr_db`` (worst 1% of samples left out),
    ``logit_sqnr_db_all`` and ``near_tie_margin``; SQNRs are ``inf`` when the logits are equal.

    Example (ONNX logits that differ only by a constant per sample, which softmax and top-1 ignore):
        >>> student_logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
        >>> metrics = parity_metrics(student_logits + 0.5, student_logits, np.array([0, 2]))
        >>> metrics["agreement_with_student"], metrics["logit_sqnr_db"], metrics["max_abs_logit_diff"], metrics["accuracy"]
        (1.0, inf, 0.5, 0.5)
    """
    onnx_logits, student_logits = np.asarray(onnx_logits, np.float64), np.asarray(student_logits, np.float64)
    onnx_top1, student_top1 = onnx_logits.argmax(axis=1), student_logits.argmax(axis=1)
    flipped = onnx_top1 != student_top1
    # softmax and top-1 ignore a constant added to a sample's logits: errors of logits centred per sample
    difference = onnx_logits - student_logits
    difference -= difference.mean(axis=1, keepdims=True)
    error = np.abs(difference).max(axis=1)  # per sample
    noise = (difference ** 2).sum(axis=1)
    signal = ((student_logits - student_logits.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    left_out = max(1, math.floor(LOGIT_SQNR_TRIM * len(noise))) if len(noise) > 1 else 0
    kept = np.argsort(noise, kind="stable")[: len(noise) - left_out]
    top2 = np.sort(student_logits, axis=1)[:, -2:] if student_logits.shape[1] > 1 else None
    margin = top2[:, 1] - top2[:, 0] if top2 is not None else np.full(len(flipped), np.inf)
    near_tie_margin = NEAR_TIE_FACTOR * float(error[~flipped].max()) if (~flipped).any() else 0.0
    near_tie = flipped & (margin <= near_tie_margin)
    metrics: dict[str, Any] = {
        "samples": int(len(onnx_top1)),
        "agreement_with_student": float(np.mean(~flipped)),
        "flips": int(flipped.sum()),
        "near_tie_flips": int(near_tie.sum()),
        "near_tie_margin": near_tie_margin,
        "max_abs_logit_diff": float(np.abs(onnx_logits - student_logits).max()),
        "logit_sqnr_db": _sqnr(float(signal[kept].sum()), float(noise[kept].sum())),
        "logit_sqnr_db_all": _sqnr(float(signal.sum()), float(noise.sum())),
        "logit_sqnr_left_out_samples": left_out,
    }
    if labels is not None:
        labels = np.asarray(labels)
        excused = np.where(near_tie, student_top1, onnx_top1)  # near-tie flips as the student predicted them
        metrics["accuracy"] = float(np.mean(onnx_top1 == labels))
        metrics["student_accuracy"] = float(np.mean(student_top1 == labels))
        metrics["accuracy_near_ties_excused"] = float(np.mean(excused == labels))
    return metrics


def parity_gate(onnx_logits: np.ndarray, student_logits: np.ndarray, labels: np.ndarray | None,
                sqnr_gate_db: float = LOGIT_SQNR_GATE_DB) -> tuple[dict[str, Any], str | None]:
    """``(metrics, failure)``: the parity metrics and why the gate fails, or None when it passes.

    The rules (module docstring): ``logit_sqnr_db >= sqnr_gate_db``, no flip with a clear margin,
    accuracy within 0.1 pp of the student's with near-tie flips counted as the student's. The
    bound used is returned as ``logit_sqnr_gate_db``.

    Example:
        >>> student_logits = np.array([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
        >>> parity_gate(student_logits, student_logits, None)[1] is None      # equal logits pass
        True
        >>> metrics, failure = parity_gate(student_logits[[0, 1, 1]], student_logits, None)   # sample 2 flips
        >>> metrics["logit_sqnr_db"], metrics["logit_sqnr_left_out_samples"]    # the flip is the worst sample, left out
        (inf, 1)
        >>> print(failure)
        1 of 3 samples change their top-1 class with a clear margin (student's top-2 margin > 0, twice the largest logit error elsewhere; allowed: none)
    """
    metrics = {**parity_metrics(onnx_logits, student_logits, labels), "logit_sqnr_gate_db": sqnr_gate_db}
    reasons = []
    if not metrics["logit_sqnr_db"] >= sqnr_gate_db:
        reasons.append(f"logit SQNR {metrics['logit_sqnr_db']:.1f} dB < {sqnr_gate_db:g} dB "
                       f"(ONNX vs student logits, worst {metrics['logit_sqnr_left_out_samples']} sample(s) left out)")
    clear_flips = metrics["flips"] - metrics["near_tie_flips"]
    if clear_flips:
        reasons.append(f"{clear_flips} of {metrics['samples']} samples change their top-1 class with a clear margin "
                       f"(student's top-2 margin > {metrics['near_tie_margin']:.3g}, twice the largest logit error "
                       f"elsewhere; allowed: none)")
    if "accuracy" in metrics and abs(metrics["accuracy_near_ties_excused"] - metrics["student_accuracy"]) > ACCURACY_GATE + 1e-9:
        reasons.append(f"accuracy {metrics['accuracy']:.2%} vs student {metrics['student_accuracy']:.2%} "
                       f"(allowed: within 0.1 pp once near-tie flips are counted as the student's)")
    return metrics, "; ".join(reasons) or None


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    # two zero vectors agree (cosine 1); a zero vector against a non-zero one does not (0)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(both_zero, 1.0, dots / np.where(norms == 0, 1.0, norms))


def embedding_parity_gate(onnx_embeddings: np.ndarray, student_embeddings: np.ndarray,
                          mean_gate: float = EMBEDDING_MEAN_COSINE_GATE,
                          min_gate: float = EMBEDDING_MIN_COSINE_GATE) -> tuple[dict[str, Any], str | None]:
    """``(metrics, failure)`` for ``output_kind="embedding"``: cosine of each sample's ONNX vs student vector.

    Metrics: ``samples``, ``mean_cosine``, ``min_cosine``, ``max_abs_diff`` and the bounds
    ``mean_cosine_gate`` (``EMBEDDING_MEAN_COSINE_GATE``), ``min_cosine_gate`` (``EMBEDDING_MIN_COSINE_GATE``).

    Example:
        >>> student = np.array([[1.0, 0.0], [0.0, 2.0]])
        >>> metrics, failure = embedding_parity_gate(student * 1.001, student)
        >>> metrics["mean_cosine"], metrics["min_cosine"], failure is None
        (1.0, 1.0, True)
        >>> print(embedding_parity_gate(np.array([[1.0, 0.0], [2.0, 0.0]]), student)[1])
        mean cosine 0.5000 < 0.999; min cosine 0.0000 < 0.99 (ONNX vs student embeddings)
    """
    onnx_embeddings = np.asarray(onnx_embeddings, np.float64)
    student_embeddings = np.asarray(student_embeddings, np.float64)
    cosines = _cosines(onnx_embeddings, student_embeddings)
    metrics = {"samples": int(len(cosines)), "mean_cosine": round(float(cosines.mean()), 12),
               "min_cosine": round(float(cosines.min()), 12),
               "max_abs_diff": float(np.abs(onnx_embeddings - student_embeddings).max()),
               "mean_cosine_gate": mean_gate, "min_cosine_gate": min_gate}
    reasons = []
    if not metrics["mean_cosine"] >= mean_gate:
        reasons.append(f"mean cosine {metrics['mean_cosine']:.4f} < {mean_gate:g}")
    if not metrics["min_cosine"] >= min_gate:
        reasons.append(f"min cosine {metrics['min_cosine']:.4f} < {min_gate:g}")
    return metrics, ("; ".join(reasons) + " (ONNX vs student embeddings)") if reasons else None


def _check_output_kind(output_kind: str) -> None:
    if output_kind not in OUTPUT_KINDS:
        raise ExportError(f"output_kind: {output_kind!r} is not allowed; allowed: {', '.join(OUTPUT_KINDS)}")


def verify_onnx(path: str | Path, student: nn.Module, loader: Iterable[Any],
                sqnr_gate_db: float = LOGIT_SQNR_GATE_DB, output_kind: str = "logits") -> dict[str, Any]:
    """Run the parity gate of an exported file against ``student``; returns the parity metrics.

    Example:
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4),
        ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = export_onnx(student, f"{folder}/model.onnx", torch.rand(1, 1, 4, 4))["path"]   # no gate yet
        ...     metrics = verify_onnx(path, student, [torch.rand(16, 1, 4, 4)])
        >>> metrics["samples"], metrics["logit_sqnr_db"] >= metrics["logit_sqnr_gate_db"]
        (16, True)
    """
    _check_output_kind(output_kind)
    onnx_logits, labels = onnx_predict(make_session(path), loader)
    student_logits, _ = predict(student, loader)
    if output_kind == "embedding":
        metrics, failure = embedding_parity_gate(onnx_logits, student_logits)
    else:
        metrics, failure = parity_gate(onnx_logits, student_logits, labels, sqnr_gate_db)
    if failure is None:
        return metrics
    layers = diagnose_layers(path, student, loader)
    first = next((layer for layer in layers if layer["sqnr_db"] < DIVERGENCE_SQNR_DB), None)
    if first is None:
        first = min(layers, key=lambda layer: layer["sqnr_db"])
    error = ExportError(f"ONNX parity gate failed: {failure}; first diverging layer: {first['name']!r} "
                        f"(output SQNR {first['sqnr_db']:.1f} dB, max abs diff {first['max_abs_diff']:.4g} vs the PyTorch student)")
    error.metrics, error.layers = metrics, layers  # the full comparison, for scripts that want it
    raise error


def _snapshot(output: torch.Tensor) -> np.ndarray:
    """A copy of a layer's output: an in-place op after the layer (``ReLU(inplace=True)``) would change a view."""
    return output.detach().cpu().float().numpy().copy()


def _student_layer_outputs(student: nn.Module, inputs: Any, names: list[str]) -> dict[str, np.ndarray]:
    outputs: dict[str, np.ndarray] = {}
    hooks = [student.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: outputs.__setitem__(name, _snapshot(output)))
        for name in names]
    was_training = student.training
    device = next(student.parameters()).device
    try:
        with torch.no_grad():
            call_model(student.eval(), move_inputs(inputs, device))
    finally:
        for hook in hooks:
            hook.remove()
        student.train(was_training)
    return outputs


def _truncated(model: onnx.ModelProto, output: str, elem_type: int = onnx.TensorProto.FLOAT) -> bytes:
    """The part of ``model`` that computes ``output``, with ``output`` as its only graph output."""
    part = onnx.ModelProto.FromString(model.SerializeToString())
    del part.graph.output[:]
    part.graph.output.append(helper.make_tensor_value_info(output, elem_type, None))
    _prune(part.graph)
    return part.SerializeToString()


def _only_user(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto | None:
    users = [node for node in graph.node if tensor in node.input]
    return users[0] if len(users) == 1 else None


def _layer_result(graph: onnx.GraphProto, output: str, requantized: bool = False
                  ) -> tuple[str, tuple[np.ndarray, np.ndarray] | None]:
    """The tensor holding a layer's whole result as the student's layer returns it, and how to dequantize it.

    A Linear on 3-D input exports as MatMul, then its bias Add. A layer the student requantizes
    itself (``requantizer``: one rounding, as in QLinearConv) is compared on the codes of the
    QuantizeLinear (and narrow-grid Clip) that the runtime fuses into it: ``(tensor, (scale, zero point))``.
    """
    narrow = float_code_codes(graph, output)  # a narrow conv: its codes, computed as the runtime does
    if narrow is not None:
        return narrow
    constants = {tensor.name for tensor in graph.initializer}
    user = _only_user(graph, output)
    if user is not None and user.op_type == "Add" and any(name in constants for name in user.input):
        output, user = user.output[0], _only_user(graph, user.output[0])
    if not requantized or user is None or user.op_type != "QuantizeLinear":
        return output, None
    grid = (_array(graph, user.input[1]), _array(graph, user.input[2]))
    codes, clip = user.output[0], _only_user(graph, user.output[0])
    if clip is not None and clip.op_type == "Clip":
        codes = clip.output[0]
    return codes, grid


def _sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    noise = float(np.sum((value.astype(np.float64) - reference) ** 2))
    return _sqnr(float(np.sum(reference.astype(np.float64) ** 2)), noise)


def diagnose_layers(path: str | Path, student: nn.Module, loader: Iterable[Any],
                    samples: int = DIAGNOSIS_SAMPLES) -> list[dict[str, Any]]:
    """Each quantized layer's and quantized op's output in ONNX Runtime vs the student, in graph order.

    ``sqnr_db`` is the signal-to-noise ratio of the ONNX output against the student's (inf when
    equal); a healthy int8 export stays far above ``DIVERGENCE_SQNR_DB``. The ops without weights
    (adds, concatenations, pools, products, activation tables) are compared on the integer codes their
    kernels write, dequantized, so a divergence that starts in one of them is named there rather than
    at the next layer.

    Example:
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4),
        ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = export_onnx(student, f"{folder}/model.onnx", torch.rand(1, 1, 4, 4))["path"]
        ...     layers = diagnose_layers(path, student, [torch.rand(16, 1, 4, 4)])
        >>> [layer["name"] for layer in layers], all(layer["sqnr_db"] > DIVERGENCE_SQNR_DB for layer in layers)
        (['net.1', 'net.4', 'net.7'], True)
    """
    model = onnx.load(str(path))
    targets = _diagnosis_targets(model, student)
    inputs = first_samples(loader, samples)
    reference = _student_layer_outputs(student, inputs, [name for name, *_ in targets])
    results = []
    for name, output, grid, requantize in targets:
        elem_type = onnx.TensorProto.FLOAT if grid is None else helper.np_dtype_to_tensor_dtype(grid[1].dtype)
        session = make_session(_truncated(model, output, elem_type))
        value = session.run(None, session_feed(session, inputs))[0]
        if grid is not None:
            value = ((value.astype(np.float32) - grid[1].astype(np.float32)) * grid[0]).astype(np.float32)
        expected = reference.get(name)
        if expected is None or expected.shape != value.shape:
            results.append({"name": name, "sqnr_db": -math.inf, "max_abs_diff": math.inf})
            continue
        if requantize:
            expected = _on_grid(expected, grid)
        results.append({"name": name, "sqnr_db": _sqnr_db(expected, value),
                        "max_abs_diff": float(np.abs(expected - value).max())})
    return results


def _diagnosis_targets(model: onnx.ModelProto, student: nn.Module) -> list[tuple[str, str, Any, bool]]:
    """``(module name, ONNX tensor, grid or None, requantize)`` for every quantized layer and op, in graph
    order: the tensor holding its result, how to dequantize it, and whether the student's result must be
    put on that grid first (an op's result, which the runtime's kernel writes on its reader's grid)."""
    graph = model.graph
    positions = {output: index for index, node in enumerate(graph.node) for output in node.output}
    keyed = []  # (position of the node that computes the result, target); diagnosis nodes go at the end
    for entry in _layer_table(model):
        requantized = getattr(student.get_submodule(entry["name"]), "requantizer", None) is not None
        keyed.append((positions.get(entry["output"], -1),
                      (entry["name"], *_layer_result(graph, entry["output"], requantized), False)))
    modules = dict(student.named_modules())
    for op in (OpInfo(**entry) for entry in _metadata(model, OPS_KEY) or []):
        if op.name not in modules:
            continue
        if not op.quantized_output:  # a float result (attention scores before a softmax, an exact float table)
            keyed.append((positions.get(op.output, -1), (op.name, op.output, None, False)))
        elif (codes := _op_codes(graph, op.quantized_output)) is not None:
            keyed.append((positions.get(op.quantized_output, -1), (op.name, *codes, True)))
    return [target for _, target in sorted(keyed, key=lambda pair: pair[0])]


# readers of integer codes that name their grid: {op type: {input position: (scale input, zero point input)}}
_GRID_INPUTS = {"DequantizeLinear": {0: (1, 2)}, "MatMulIntegerToFloat": {0: (2, 4), 1: (3, 5)}}


def _op_codes(graph: onnx.GraphProto, codes: str) -> tuple[str, tuple[np.ndarray, ...]] | None:
    """The integer tensor an op's kernel writes (after the narrow-grid Clip that follows it) and its grid:
    ``(tensor, (scale, zero point, lowest code, highest code))``; None when no quantize/dequantize names it."""
    nodes = list(graph.node)
    producer = next((node for node in nodes if codes in node.output), None)
    clip = _only_user(graph, codes)
    clipped = clip is not None and clip.op_type == "Clip" and len(clip.input) == 3
    tensor = clip.output[0] if clipped else codes
    if producer is not None and producer.op_type == "QuantizeLinear":
        scale, zero = _array(graph, producer.input[1]), _array(graph, producer.input[2])
    else:  # written by a table lookup (Gather): the grid its readers dequantize it with
        grids = [(_array(graph, node.input[scale]), _array(graph, node.input[zero])) for node in nodes
                 for position, (scale, zero) in _GRID_INPUTS.get(node.op_type, {}).items()
                 if len(node.input) > max(scale, zero) and node.input[position] == tensor]
        if not grids:
            return None
        scale, zero = grids[0]
    limits = np.iinfo(zero.dtype)
    low, high = (_array(graph, clip.input[1]), _array(graph, clip.input[2])) if clipped else (limits.min, limits.max)
    return tensor, (scale, zero, np.float32(low), np.float32(high))


def _on_grid(values: np.ndarray, grid: tuple[np.ndarray, ...]) -> np.ndarray:
    """``values`` quantized to ``grid`` (scale, zero point, lowest and highest code) and dequantized."""
    scale, zero, low, high = (np.float32(part) for part in grid)
    codes = np.clip(np.round(values / scale) + zero, low, high)
    return ((codes - zero) * scale).astype(np.float32)


def export_onnx(student: nn.Module, path: str | Path, example_input: Any, verify_on: Iterable[Any] | None = None,
                opset: int = OPSET, sqnr_gate_db: float = LOGIT_SQNR_GATE_DB, output_kind: str = "logits") -> dict[str, Any]:
    """Export ``student`` to an int8 ONNX file whose integer kernels and parity are checked.

    Returns ``{path, file_bytes, integer_ops, integer_ops_other, dropped_layers, wide_weight_layers, opset, file_opset,
    parity_checked}``
    (``integer_ops``: each quantized layer's kernel; ``integer_ops_other``: each quantized
    add/concat/pool/matmul's; ``dropped_layers``: ``{layer: why}`` for quantized layers that the
    forward pass computes but whose output the model's output never uses, which the exporter removes;
    ``wide_weight_layers``: ``{layer: largest |code|}`` for 8-bit weights that need VNNI to run fast on x86,
    see ``wide_weight_layers``). With ``verify_on`` the parity gate runs (``parity_checked: True``) and
    its metrics are added: ``samples``, ``agreement_with_student``, ``flips``, ``near_tie_flips``,
    ``near_tie_margin``, ``max_abs_logit_diff``, ``logit_sqnr_db`` (the gated figure),
    ``logit_sqnr_db_all``, ``logit_sqnr_left_out_samples``, ``logit_sqnr_gate_db`` and, with
    labels, ``accuracy``, ``student_accuracy``, ``accuracy_near_ties_excused``. Without it
    ``parity_checked`` is False and nothing was compared.
    With ``output_kind="embedding"`` (``models.outputs.OUTPUT_KINDS``) the gate compares cosines instead
    (``embedding_parity_gate``: ``samples``, ``mean_cosine``, ``min_cosine``, ``max_abs_diff``,
    ``mean_cosine_gate``, ``min_cosine_gate``); argmax agreement means nothing for an embedding.
    Raises ``ExportError`` (and writes nothing) when a layer or op runs in float or the gate fails.

    ``example_input`` is read as a batch (``qdistill.batch``) and its first sample exported: a tensor,
    ``(x, labels)``, a dict of named inputs (``{"input_ids": ..., "attention_mask": ...}``, labels
    keys ignored), or ``((a, b),)`` for a model of two positional inputs.

    Example (without ``verify_on``; the module docstring's example runs the gate):
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4),
        ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     info = export_onnx(student, f"{folder}/model.onnx", torch.rand(1, 1, 4, 4))
        >>> info["parity_checked"], info["opset"], info["integer_ops"], info["integer_ops_other"]
        (False, 13, {'net.1': 'QGemm', 'net.4': 'QGemm', 'net.7': 'QGemm'}, {})
    """
    if opset < OPSET:
        raise ExportError(f"opset {opset} is not allowed; per-channel QuantizeLinear needs opset {OPSET} or higher")
    _check_output_kind(output_kind)
    model = build_int8_model(student, example_input, opset)
    info: dict[str, Any] = {"parity_checked": verify_on is not None}

    def write_and_check(temporary: Path) -> None:
        onnx.save(model, str(temporary))
        info["integer_ops"], info["integer_ops_other"] = integer_kernels(temporary)
        info["dropped_layers"] = _metadata(model, DROPPED_KEY) or {}
        info["wide_weight_layers"] = wide_weight_layers(model)
        if verify_on is not None:
            info.update(verify_onnx(temporary, student, verify_on, sqnr_gate_db, output_kind))

    path = atomic_write(path, write_and_check)
    # "opset": the exporter's setting (what a packed file's rebuild exports at); "file_opset": the file's own,
    # raised when a lookup's one-node form needs a newer op (qdq_graph.FORM_OPSETS)
    file_opset = max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    return {"path": str(path), "file_bytes": path.stat().st_size, "opset": opset, "file_opset": file_opset, **info}


def export_float_onnx(model: nn.Module, path: str | Path, example_input: Any, opset: int = OPSET) -> dict[str, Any]:
    """Export a float model (the fp32 baseline) with the same input/output names and dynamic batch.

    Example:
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = export_float_onnx(nn.Linear(4, 2), f"{folder}/fp32.onnx", torch.rand(1, 4))["path"]
        ...     [node.op_type for node in onnx.load(path).graph.node], make_session(path).get_inputs()[0].shape
        (['Gemm'], ['batch', 4])
    """
    float_model = copy.deepcopy(model).cpu().eval()
    path = atomic_write(path, lambda temporary: _torchscript_export(float_model, _example(example_input), temporary, opset))
    return {"path": str(path), "file_bytes": path.stat().st_size}


__all__ = [
    "LayerInfo", "OpInfo", "build_int8_model", "check_integer_kernels", "diagnose_layers", "export_float_onnx",
    "export_onnx", "integer_kernels", "onnx_predict", "parity_gate", "parity_metrics", "verify_onnx", "wide_weight_layers",
]
