"""``prepare(model, spec)``: copy a float model into a fake-quantized student.

Conv1d, Conv2d (grouped and depthwise too), Linear and Embedding are replaced by their quantized
versions; BatchNorm after a conv/linear is folded first. Anything with parameters that is not
handled stays float and is listed, with the reason, in ``student.qdistill_unquantized``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qdistill.errors import ModelError
from qdistill.quant.fold import fold_batchnorms, find_foldable_pairs
from qdistill.quant.modules import QUANTIZED_CLASS, is_quantized
from qdistill.quant.quantizer import Quantizer
from qdistill.recipe import QuantSpec

FLOAT_BY_DESIGN = {
    nn.LayerNorm: "LayerNorm stays float (its statistics are per sample)",
    nn.GroupNorm: "GroupNorm stays float (its statistics are per sample)",
    nn.BatchNorm1d: "BatchNorm not preceded by a conv/linear layer it could fold into",
    nn.BatchNorm2d: "BatchNorm not preceded by a conv/linear layer it could fold into",
    nn.MultiheadAttention: "nn.MultiheadAttention calls its weights directly; its projections stay float",
    nn.PReLU: "PReLU slope stays float",
}


def _as_spec(spec: QuantSpec | dict | None) -> QuantSpec:
    if spec is None:
        return QuantSpec()
    if isinstance(spec, dict):
        from qdistill.recipe import Recipe

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


def layer_bits(names: list[str], spec: QuantSpec) -> dict[str, tuple[int, int]]:
    """``{name: (weight_bits, act_bits)}``: defaults, then first/last layer, then glob overrides."""
    bits = {name: (spec.weight_bits, spec.act_bits) for name in names}
    if spec.first_last_bits is not None and names:
        for edge in {names[0], names[-1]}:
            bits[edge] = (spec.first_last_bits, spec.first_last_bits)
    for pattern, override in spec.overrides.items():
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ModelError(f"quant.overrides: pattern {pattern!r} matches no quantizable layer; layers: {', '.join(names)}")
        for name in matched:
            weight_bits, act_bits = bits[name]
            bits[name] = (override.weight_bits or weight_bits, override.act_bits or act_bits)
    return bits


def _make_layer(layer: nn.Module, weight_bits: int, act_bits: int, spec: QuantSpec) -> nn.Module:
    per_channel = spec.granularity == "per_channel"
    weight_quantizer = Quantizer(
        weight_bits, signed=True, channels=layer.weight.shape[0] if per_channel else None,
        init=spec.init, percentile=spec.percentile, learn_scale=spec.learn_scale,
    )
    input_quantizer = None
    if not isinstance(layer, nn.Embedding):
        input_quantizer = Quantizer(
            act_bits, signed=False, init=spec.init, percentile=spec.percentile, learn_scale=spec.learn_scale
        )
    quantized = QUANTIZED_CLASS[type(layer) if type(layer) in QUANTIZED_CLASS else nn.Linear]
    student_layer = quantized.from_float(layer, weight_quantizer, input_quantizer)
    student_layer.weight_quantizer.init_from_weight(layer.weight)
    return student_layer


def _unquantized(model: nn.Module, trace_failure: str | None) -> dict[str, str]:
    reasons: dict[str, str] = {}
    quantized_names = {name for name, module in model.named_modules() if is_quantized(module)}
    for name, module in model.named_modules():
        if is_quantized(module) or any(name.startswith(q + ".") for q in quantized_names) or not name:
            continue
        if type(module) in FLOAT_BY_DESIGN:
            reasons[name] = FLOAT_BY_DESIGN[type(module)]
        elif any(True for _ in module.parameters(recurse=False)):
            reasons[name] = f"{type(module).__name__} is not a layer qdistill quantizes (Conv1d/Conv2d/Linear/Embedding)"
    if trace_failure:
        reasons["<graph>"] = trace_failure + "; BatchNorm folded by module order only"
    return reasons


def prepare(
    model: nn.Module, spec: QuantSpec | dict | None = None, calibration_data: Iterable[Any] | None = None
) -> nn.Module:
    """A fake-quantized copy of ``model``; ``model`` itself is never modified.

    Example:
        >>> student = prepare(teacher, {"weight_bits": 4, "act_bits": 4}, calibration_data=train_loader)
        >>> student.qdistill_unquantized     # {layer name: reason it stayed float}
    """
    spec = _as_spec(spec)
    student = copy.deepcopy(model).eval()
    _, trace_failure = find_foldable_pairs(student)
    folded = fold_batchnorms(student)
    layers = quantizable_layers(student)
    if not layers:
        raise ModelError("model: no Conv1d/Conv2d/Linear/Embedding layer to quantize; qdistill needs at least one")
    bits = layer_bits([name for name, _ in layers], spec)
    for name, layer in layers:
        _set_submodule(student, name, _make_layer(layer, *bits[name], spec))
    student.qdistill_unquantized = _unquantized(student, trace_failure)
    student.qdistill_folded = folded
    if calibration_data is not None:
        calibrate(student, calibration_data, spec.calibration_batches)
    return student


def calibrate(student: nn.Module, batches: Iterable[Any], max_batches: int) -> int:
    """Initialise activation ranges from up to ``max_batches`` batches; returns batches used."""
    activation_quantizers = [m.input_quantizer for m in student.modules() if is_quantized(m) and m.input_quantizer]
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    for quantizer in activation_quantizers:
        quantizer.observe()
    used = 0
    with torch.no_grad():
        for batch in batches:
            if used >= max_batches:
                break
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            student(inputs.to(device))
            used += 1
    for quantizer in activation_quantizers:
        quantizer.finish_calibration()
    student.train(was_training)
    return used


def layer_table(student: nn.Module) -> dict[str, dict[str, int | None]]:
    """``{layer name: {weight_bits, act_bits}}`` for every quantized layer (report.json per_layer)."""
    return {
        name: {"weight_bits": module.weight_bits, "act_bits": module.act_bits}
        for name, module in student.named_modules()
        if is_quantized(module)
    }


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
