"""``prepare(model, spec)``: copy a float model into a fake-quantized student.

The steps, each in its own module:

1. ``nn.MultiheadAttention`` becomes ``DecomposedMultiheadAttention`` (``attention.py``): the same
   function with plain Linear projections, which the next steps quantize; timm attention modules
   take their explicit ``q @ k^T`` path (``fused_attn = False``).
2. BatchNorm after a conv/linear layer is folded into it (``fold.py``), found on the fx graph, so
   the weights the student trains are the weights that are exported; a BatchNorm2d with nothing
   to fold into becomes a depthwise 1x1 conv; per-channel layer scales fold into the layer before.
3. Conv1d, Conv2d (grouped and depthwise too), Linear and Embedding become quantized layers.
4. AvgPool2d, AdaptiveAvgPool2d, LayerNorm and elementwise activations (exported as tables of
   their input codes) get a quantized input, and additions, products, matrix products and
   concatenations of tensors in custom forwards become ``QuantAdd``/``QuantMul``/``QuantMatMul``/
   ``QuantCat`` (``rewrite.py``).
5. The consumers of one tensor share one activation quantizer (``sharing.py``); an op whose result
   float code reads quantizes its own result.

torch.fx traces the whole model where it can; where it cannot, each custom module is traced on
its own. Anything not handled stays float and is listed, with the reason, in
``student.qdistill_unquantized`` (report.json ``student.unquantized_layers``).
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch  # noqa: F401 (the docstring examples use it)
import torch.nn.functional as F
from torch import nn

from qdistill.batch import batch_inputs, forward_batches
from qdistill.errors import ModelError
from qdistill.quant.attention import (
    GELU_NOTE,
    RESIDUAL_NOTE,
    DecomposedMultiheadAttention,
    decompose_attention,
    explicit_hf_attention,
    is_transformers_activation,
    residual_stream_modules,
    share_projection_inputs,
    unfuse_attention,
)
from qdistill.quant.fold import batchnorms_to_convs, fold_batchnorms, fold_layer_scales
from qdistill.quant.graph import CALLED_WITH, called_arguments, module_graphs, torch_module_notes, trace_model
from qdistill.quant.modules import (
    INPUT_QUANTIZED_CLASS,
    QUANTIZED_CLASS,
    QUANTIZED_OPS,
    ActivationQuantizer,
    QuantElementwise,
    QuantInputOf,
    QuantLayerNorm,
    RuntimeGelu,
    clear_memos,
    input_slots,
    is_elementwise_activation,
    is_quantized,
)
from qdistill.quant.quantizer import Quantizer
from qdistill.quant.rewrite import rewrite_functional_ops
from qdistill.quant.sharing import link_requantizers, quantize_float_reads, share_quantizers
from qdistill.quant.smoothing import chosen_groups, input_channel_maxima, smooth_layers
from qdistill.recipe import QuantSpec, Recipe

FLOAT_BY_DESIGN = {
    QuantLayerNorm: "LayerNorm computes in float (per-sample statistics); only its input is quantized",
    nn.LayerNorm: "LayerNorm stays float (its statistics are per sample)",
    nn.GroupNorm: "GroupNorm stays float (its statistics are per sample)",
    nn.BatchNorm1d: "BatchNorm1d not preceded by a conv/linear layer it could fold into",
    nn.MultiheadAttention: "nn.MultiheadAttention calls its weights directly; its projections stay float",
    nn.PReLU: "PReLU slope stays float",
}
NOT_REPORTED = (Quantizer, DecomposedMultiheadAttention, *QUANTIZED_OPS)


def _as_spec(spec: QuantSpec | dict | None) -> QuantSpec:
    if spec is None:
        return QuantSpec()
    if isinstance(spec, dict):
        return Recipe(quant=spec).quant
    return spec


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, layer)`` pairs ``prepare`` would quantize, in registration order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in QUANTIZED_CLASS or (isinstance(module, nn.Linear) and _is_plain_linear(module))
    ]


def _is_plain_linear(module: nn.Module) -> bool:
    # NonDynamicallyQuantizableLinear (MHA's out_proj) is a Linear subclass whose weight MHA uses directly
    return type(module).__name__ != "NonDynamicallyQuantizableLinear" and not is_quantized(module)


def layer_bits(names: list[str], spec: QuantSpec, strict: bool = True) -> dict[str, tuple[int, int]]:
    """``{name: (weight_bits, act_bits)}``: defaults, then first/last layer, then glob overrides.

    ``strict``: a pattern that matches none of ``names`` is a ``ModelError``. ``prepare`` checks
    patterns itself, against the quantized ops as well; to check a recipe before a run, call
    ``check_overrides``, which accepts exactly what ``prepare`` accepts.

    Example:
        >>> layer_bits(["conv", "mid", "head"], QuantSpec(weight_bits=4, act_bits=4))["mid"]
        (4, 4)
    """
    bits = {name: (spec.weight_bits, spec.act_bits) for name in names}
    if spec.first_last_bits is not None and names:
        for edge in {names[0], names[-1]}:
            bits[edge] = (spec.first_last_bits, spec.first_last_bits)
    for pattern, override in spec.overrides.items():
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched and strict:
            _unmatched(pattern, names)
        for name in matched:
            weight_bits, act_bits = bits[name]
            bits[name] = (override.weight_bits or weight_bits, override.act_bits or act_bits)
    return bits


def _unmatched(pattern: str, names: list[str]) -> None:
    raise ModelError(f"quant.overrides: pattern {pattern!r} matches no quantizable layer; layers: {', '.join(names)}")


def _activation_quantizer(spec: QuantSpec, bits: int) -> ActivationQuantizer:
    return ActivationQuantizer(bits, init=spec.init, percentile=spec.percentile, learn_scale=spec.learn_scale,
                               learn_input_scale=spec.learn_input_scale)


def _make_layer(layer: nn.Module, weight_bits: int, act_bits: int, spec: QuantSpec, init_weights: bool) -> nn.Module:
    per_channel = spec.granularity == "per_channel"
    weight_quantizer = Quantizer(
        weight_bits, signed=True, channels=layer.weight.shape[0] if per_channel else None,
        init=spec.init, percentile=spec.percentile, learn_scale=spec.learn_scale, role="weight",
    )
    # an embedding's input is indices: nothing to quantize
    input_quantizer = None if isinstance(layer, nn.Embedding) else _activation_quantizer(spec, act_bits)
    quantized = QUANTIZED_CLASS[type(layer) if type(layer) in QUANTIZED_CLASS else nn.Linear]
    student_layer = quantized.from_float(layer, weight_quantizer, input_quantizer)
    if init_weights:
        student_layer.weight_quantizer.init_from_weight(layer.weight)
    return student_layer


def _quantize_layers(student: nn.Module, spec: QuantSpec, init_weights: bool) -> list[str]:
    layers = quantizable_layers(student)
    if not layers:
        raise ModelError("model: no Conv1d/Conv2d/Linear/Embedding layer to quantize; qdistill needs at least one")
    bits = layer_bits([name for name, _ in layers], spec, strict=False)
    for name, layer in layers:
        student.set_submodule(name, _make_layer(layer, *bits[name], spec, init_weights))
    return [name for name, _ in layers]


def _quantize_float_ops(student: nn.Module, spec: QuantSpec, float_modules: frozenset[str] = frozenset()) -> list[str]:
    """Average pools, LayerNorms and elementwise activations get a quantized input (their computation
    is unchanged); an activation then runs as a table of its input codes in the export.

    The direct children of ``float_modules`` (a transformer's residual-stream modules) are left as they are, and so
    are transformers' own activation modules when ``float_modules`` is not empty (``GELU_NOTE``)."""
    names = []
    for name, module in list(student.named_modules()):
        if not name or any(name.startswith(done + ".") for done in names):
            continue
        if name.rpartition(".")[0] in float_modules:
            continue
        quantizer = _activation_quantizer(spec, spec.act_bits)
        quantized = INPUT_QUANTIZED_CLASS.get(type(module))
        if quantized is not None:
            student.set_submodule(name, quantized.from_float(module, quantizer))
        elif float_modules and is_transformers_activation(module):
            if getattr(module, "act", None) is F.gelu:  # transformers' GELUActivation, erf form
                student.set_submodule(name, RuntimeGelu())  # float still; evaluates as ONNX Runtime's Gelu
            continue  # prepare lists GELU_NOTE
        elif is_elementwise_activation(module):
            inner = copy.copy(module)
            if hasattr(inner, "inplace"):
                inner.inplace = False  # it would write into the quantizer's (shared, remembered) output
            student.set_submodule(name, QuantElementwise(inner, quantizer))
        elif isinstance(module, nn.LayerNorm):  # a subclass with its own forward (LayerNorm2d)
            student.set_submodule(name, QuantInputOf(module, quantizer))
        else:
            continue
        names.append(name)
    return names


def _override_ops(student: nn.Module, op_names: list[str], layer_names: list[str], spec: QuantSpec) -> None:
    """Apply ``quant.overrides`` act_bits to the quantized ops; check every pattern matched something."""
    for pattern, override in spec.overrides.items():
        matched = [name for name in op_names if fnmatch.fnmatchcase(name, pattern)]
        if not matched and not any(fnmatch.fnmatchcase(name, pattern) for name in layer_names):
            _unmatched(pattern, layer_names + op_names)
        for name in matched if override.act_bits else []:
            module = student.get_submodule(name)
            for slot in input_slots(module):
                setattr(module, slot, _activation_quantizer(spec, override.act_bits))


def _quantize_graph(student: nn.Module, spec: QuantSpec, layer_names: list[str]) -> dict[str, str]:
    """Steps 4 and 5 of ``prepare``; returns ``{name: reason}`` for what could not be handled."""
    make = partial(_activation_quantizer, spec)
    residual = frozenset(residual_stream_modules(student))  # transformers: the residual adds and LayerNorms stay float
    op_names = _quantize_float_ops(student, spec, residual)
    trace = trace_model(student)
    constant_notes = _float_if_constant_input(student, trace)
    added, notes = rewrite_functional_ops(student, trace, lambda: make(spec.act_bits), skip=residual)
    notes |= {name: RESIDUAL_NOTE for name in sorted(residual)}
    notes |= {name: GELU_NOTE for name, module in student.named_modules()
              if residual and (isinstance(module, RuntimeGelu)
                               or is_transformers_activation(module) and is_elementwise_activation(module))}
    notes |= {f"{name}.{child}": RESIDUAL_NOTE for name in sorted(residual)
              for child, module in student.get_submodule(name).named_children() if isinstance(module, nn.LayerNorm)}
    _override_ops(student, op_names + added, layer_names, spec)
    share_projection_inputs(student, make)  # transformers: Q, K and V read one tensor, which fx cannot see
    retrace = trace_model(student) if trace.graph is not None else trace  # it now shows the new ops
    if retrace.graph is not None:
        share_quantizers(retrace.graph, student, make)
        quantize_float_reads(retrace.graph, student, make)
        link_requantizers(retrace.graph, student)
    else:
        notes["<graph>"] = (f"{retrace.failure}; BatchNorm folding, quantized additions and shared quantizers "
                            "were applied within each module that traces on its own")
        graphs, _ = module_graphs(student, trace)
        for _, module, graph, _ in graphs:
            share_quantizers(graph, module, make)
            link_requantizers(graph, module)
    return {**torch_module_notes(student), **notes, **constant_notes}


CONSTANT_INPUT = ("computes on constants only (e.g. a position-bias table from buffers): the exporter and ONNX Runtime "
                  "fold it to a float constant, so it stays float")


def _float_if_constant_input(student: nn.Module, trace) -> dict[str, str]:
    """Quantized conv/linear layers whose input does not depend on the model's inputs go back to float, with the reason.

    Swin-V2's continuous position bias runs an MLP on a buffer; a quantized copy would export as
    weights that ONNX Runtime folds away in float, failing the integer-kernel check.
    """
    if trace.graph is None:
        return {}
    variable: set = set()
    notes = {}
    for node in trace.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder" or any(item in variable for item in inputs):
            variable.add(node)
        elif node.op == "call_module" and inputs:
            layer = student.get_submodule(node.target)
            if is_quantized(layer) and layer.input_quantizer is not None:  # an embedding's lookup stays quantized
                student.set_submodule(node.target, layer.as_float())
                notes[node.target] = CONSTANT_INPUT
    return notes


def _unquantized(model: nn.Module) -> dict[str, str]:
    reasons: dict[str, str] = {}
    quantized_names = {name for name, module in model.named_modules() if is_quantized(module)}
    for name, module in model.named_modules():
        if is_quantized(module) or any(name.startswith(q + ".") for q in quantized_names) or not name:
            continue
        if isinstance(module, QuantInputOf) and not isinstance(module, QuantElementwise):
            reasons[name] = f"{type(module.inner).__name__} computes in float; only its input is quantized"
            quantized_names.add(name)
            continue
        reason = next((text for kind, text in FLOAT_BY_DESIGN.items() if isinstance(module, kind)), None)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is None:
            reason = "BatchNorm without running statistics normalises with each batch's own; it stays float"
        if reason is not None:
            reasons[name] = reason
        elif not isinstance(module, NOT_REPORTED) and any(True for _ in module.parameters(recurse=False)):
            reasons[name] = f"{type(module).__name__} is not a layer qdistill quantizes (Conv1d/Conv2d/Linear/Embedding)"
    return reasons


def prepare(
    model: nn.Module, spec: QuantSpec | dict | None = None, calibration_data: Iterable[Any] | None = None
) -> nn.Module:
    """A fake-quantized copy of ``model``; ``model`` itself is never modified.

    Example:
        >>> from qdistill import models
        >>> teacher = models.create("tiny_resnet")
        >>> student = prepare(teacher, {"weight_bits": 4, "act_bits": 4}, calibration_data=[torch.rand(8, 1, 8, 8)])
        >>> student.qdistill_unquantized     # {layer name: reason it stayed float}
        {}
        >>> layer_table(student)["layer1.0.add"]
        {'weight_bits': None, 'act_bits': 4}
    """
    spec = _as_spec(spec)
    called: tuple[str, ...] = ()
    batches: list[Any] = []
    if calibration_data is not None:  # kept: smoothing reads them too, and a loader may be iterable once
        batches = list(itertools.islice(iter(calibration_data), spec.calibration_batches))
        if batches:  # how the batches call the model decides which optional arguments stay inputs
            called = called_arguments(model, batch_inputs(batches[0]))
    student = _quantized_copy(model, spec, init_weights=True, called=called, calibration=batches)
    if calibration_data is not None:
        calibrate(student, batches, spec.calibration_batches)
    return student


def check_overrides(model: nn.Module, spec: QuantSpec | dict | None) -> dict[str, dict[str, int | None]]:
    """Raise the ``ModelError`` that ``prepare(model, spec)`` would raise; else its ``layer_table``.

    It runs ``prepare``'s own steps (so it accepts exactly what ``prepare`` accepts: an override
    may name a layer or a quantized op such as ``layer1.0.add``) and leaves out only what cannot
    fail: weight range initialisation and calibration. Meant as a check before a run starts.

    Example:
        >>> from qdistill import models
        >>> check_overrides(models.create("tiny_resnet"), {"overrides": {"layer1.0.add": {"act_bits": 8}}})["layer1.0.add"]
        {'weight_bits': None, 'act_bits': 8}
        >>> check_overrides(models.create("tiny_resnet"), {"overrides": {"nothing*": {"act_bits": 8}}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        qdistill.errors.ModelError: quant.overrides: pattern 'nothing*' matches no quantizable layer; layers: stem.0, ...
    """
    return layer_table(_quantized_copy(model, _as_spec(spec), init_weights=False))


def _quantized_copy(model: nn.Module, spec: QuantSpec, init_weights: bool, called: tuple[str, ...] = (),
                    calibration: list[Any] | None = None) -> nn.Module:
    """Steps 1-5 of ``prepare`` on a copy of ``model``, and ``quant.smoothing``; weight step sizes set only with ``init_weights``.

    ``called``: the forward parameters the batches give (``graph.called_arguments``); the other optional ones are
    fixed at their defaults while tracing. ``calibration``: the batches whose float activations set the smoothing
    factors (without them the factors stay 1, for a state dict to fill).
    """
    student = copy.deepcopy(model).eval()
    if called:
        setattr(student, CALLED_WITH, called)
    kept_attention = decompose_attention(student)
    hf_attention = explicit_hf_attention(student)  # transformers: Q.K^T and attention.V as modules
    unfuse_attention(student)  # timm: explicit q @ k^T and attn @ v, which become quantized matmuls
    folded = fold_batchnorms(student)
    student.qdistill_layer_scales = fold_layer_scales(student)  # x * gamma folded into the layer before
    norm_convs = batchnorms_to_convs(student)
    smooth = spec.smoothing > 0
    maxima = input_channel_maxima(student, calibration, spec.calibration_batches) if smooth and calibration else None
    layer_names = _quantize_layers(student, spec, init_weights)
    notes = _quantize_graph(student, spec, layer_names)
    if smooth:  # after the graph steps: which inputs are shared decides which layers can be smoothed
        student.qdistill_smoothed = smooth_layers(student, chosen_groups(student, spec.smoothing_layers), maxima,
                                                  spec.smoothing)
    _to_model_device(student)
    student.qdistill_unquantized = {**_unquantized(student), **kept_attention, **notes, **hf_attention}
    student.qdistill_folded = folded
    student.qdistill_norm_convs = norm_convs  # BatchNorms with no layer before them, now depthwise 1x1 convs
    # shared quantizers remember their last tensors only within one forward pass
    student.register_forward_pre_hook(clear_memos)
    student.register_forward_hook(clear_memos)
    return student


def _to_model_device(student: nn.Module) -> None:
    # the quantizers of the graph steps are made on the CPU; a model may already be on a GPU
    device = next(student.parameters()).device
    for quantizer in activation_quantizers(student):
        quantizer.to(device)


def activation_quantizers(student: nn.Module) -> list[Quantizer]:
    """Every quantizer of ``student`` that is not a weight quantizer (each shared one once).

    Example:
        >>> from qdistill import models
        >>> len(activation_quantizers(prepare(models.create("tiny_resnet"))))
        14
    """
    weight_quantizers = {id(module.weight_quantizer) for module in student.modules() if is_quantized(module)}
    return [module for module in student.modules() if isinstance(module, Quantizer) and id(module) not in weight_quantizers]


def calibrate(student: nn.Module, batches: Iterable[Any], max_batches: int) -> int:
    """Initialise activation ranges from up to ``max_batches`` batches; returns batches used.

    A batch is anything ``qdistill.batch`` reads (a tensor, ``(inputs, labels)``, a dict of named inputs).

    Example:
        >>> from qdistill import models
        >>> student = prepare(models.create("tiny_mlp"))
        >>> calibrate(student, [torch.rand(4, 1, 8, 8)] * 10, max_batches=8)
        8
    """
    quantizers = activation_quantizers(student)
    was_training = student.training
    student.eval()
    for quantizer in quantizers:
        quantizer.observe()
    used = forward_batches(student, batches, max_batches)
    for quantizer in quantizers:
        quantizer.finish_calibration()
    if used:
        _float_again_if_never_called(student)
    student.train(was_training)
    return used


NEVER_CALLED = ("not called as a layer during calibration (a branch unused in eval mode, such as an auxiliary "
                "classifier, or a weight its parent reads directly); it stays float")


def _float_again_if_never_called(student: nn.Module) -> None:
    """Quantized layers that calibration never reached go back to float, with the reason in ``qdistill_unquantized``."""
    for name, module in list(student.named_modules()):
        quantizer = getattr(module, "input_quantizer", None)
        if is_quantized(module) and quantizer is not None and not bool(quantizer.initialized):
            student.set_submodule(name, module.as_float())
            student.__dict__.setdefault("qdistill_unquantized", {})[name] = NEVER_CALLED


def layer_table(student: nn.Module) -> dict[str, dict[str, int | None]]:
    """``{name: {weight_bits, act_bits}}`` for every quantized layer and op (report.json per_layer).

    Ops without weights (``QuantAdd``, ``QuantCat``, average pools) have ``weight_bits: None``.

    Example:
        >>> from qdistill import models
        >>> table = layer_table(prepare(models.create("tiny_resnet"), {"weight_bits": 4, "act_bits": 4}))
        >>> table["stem.0"], table["layer1.0.conv1"], table["layer1.0.add"]     # first layer: first_last_bits
        ({'weight_bits': 8, 'act_bits': 8}, {'weight_bits': 4, 'act_bits': 4}, {'weight_bits': None, 'act_bits': 4})
    """
    table: dict[str, dict[str, int | None]] = {}
    for name, module in student.named_modules():
        if is_quantized(module):
            table[name] = {"weight_bits": module.weight_bits, "act_bits": module.act_bits}
        elif isinstance(module, (*QUANTIZED_OPS, QuantElementwise)):
            table[name] = {"weight_bits": None, "act_bits": module.act_bits}
    return table
