"""SmoothQuant-style migration of activation outliers into the weights (recipe ``quant.smoothing``).

A transformer's feed-forward inputs (LayerNorm and GELU outputs) have a few channels far larger
than the rest; one per-tensor step for all of them leaves the others a handful of codes. A smoothed
Linear divides its input per channel by

    s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)        (Xiao et al., SmoothQuant, 2023)

before the input quantizer, and multiplies the weight's input column ``j`` by ``s_j``. The float
function is the same; the activation is flatter, and per-output-channel weight steps absorb the
weight side. The division is a buffer of ``1/s`` on the layer (``modules.SMOOTHING_BUFFER``), which
the ONNX export writes as a float ``Mul`` before the QuantizeLinear: ONNX Runtime computes the same
products as PyTorch, so the int8 file still matches the student code for code.

A layer can be smoothed only where its input quantizer is its own: not shared with another
consumer (query, key and value share the LayerNorm's), and not the requantizer of an integer
kernel before it (the export would fuse that kernel's output straight into the layer's codes).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qdistill.batch import forward_batches
from qdistill.errors import ModelError
from qdistill.quant.modules import SMOOTHING_BUFFER, QuantLinear
from qdistill.quant.quantizer import Quantizer

MIN_FACTOR = 1e-5  # the smallest factor (a channel of tiny activations and large weights)


def input_channel_maxima(model: nn.Module, batches: Iterable[Any], max_batches: int) -> dict[str, torch.Tensor]:
    """``{name: max |x_j|}`` over the last dimension of each ``nn.Linear``'s input, from up to ``max_batches`` batches.

    Example:
        >>> layer = nn.Sequential(nn.Linear(3, 2))
        >>> input_channel_maxima(layer, [torch.tensor([[1.0, -4.0, 0.5]]), torch.tensor([[-2.0, 1.0, 0.0]])], 8)["0"].tolist()
        [2.0, 4.0, 0.5]
    """
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        current = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        maxima[name] = current if name not in maxima else torch.maximum(maxima[name], current)

    hooks = [module.register_forward_pre_hook(lambda _, inputs, name=name: record(name, inputs))
             for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:
        forward_batches(model, batches, max_batches)
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def smoothing_factors(activation_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)`` for a ``(out, in)`` weight.

    A channel that calibration never saw non-zero, or whose weight column is zero, keeps ``s_j = 1``:
    a tiny ``s_j`` would multiply whatever that channel carries later by its inverse.

    Example:
        >>> smoothing_factors(torch.tensor([16.0, 1.0, 0.0]), torch.tensor([[1.0, 4.0, 2.0]]), 0.5).tolist()
        [4.0, 0.5, 1.0]
    """
    weight_max = weight.detach().abs().amax(dim=0).float()
    factors = activation_max.clamp_min(MIN_FACTOR) ** alpha / weight_max.clamp_min(MIN_FACTOR) ** (1.0 - alpha)
    seen = (activation_max > 0) & (weight_max > 0)
    return torch.where(seen, factors.clamp_min(MIN_FACTOR), torch.ones_like(factors))


def _quantizer_owners(student: nn.Module) -> dict[int, list[str]]:
    """For each quantizer, the modules that hold it: as a child, or as a ``requantizer`` link (``sharing.py``)."""
    owners: dict[int, list[str]] = {}
    for name, module in student.named_modules():
        held = [child for child in module._modules.values() if isinstance(child, Quantizer)]
        held += [value for value in module.__dict__.values() if isinstance(value, Quantizer)]
        for quantizer in held:
            owners.setdefault(id(quantizer), []).append(name)
    return owners


def _why_not_smoothable(name: str, layer: nn.Module, owners: dict[int, list[str]]) -> str | None:
    if type(layer) is not QuantLinear or layer.input_quantizer is None:
        return "it is not a quantized Linear with a quantized input"
    others = [owner for owner in owners.get(id(layer.input_quantizer), []) if owner != name]
    if others:
        return (f"its input quantizer is shared with or written by {', '.join(others[:3])}; smoothing needs a Linear "
                "that reads a float tensor alone (e.g. after a LayerNorm or GELU)")
    return None


def smoothable_layers(student: nn.Module) -> list[str]:
    """The quantized Linear layers of a prepared ``student`` whose input quantizer is their own.

    Example:
        >>> from qdistill import models
        >>> from qdistill.quant import prepare
        >>> smoothable_layers(prepare(models.create("tiny_transformer", attention=["manual"])))
        ['project', 'encoder.0.attention.output', 'encoder.0.mlp.0', 'encoder.0.mlp.3', 'head']
    """
    owners = _quantizer_owners(student)
    return [name for name, module in student.named_modules()
            if type(module) is QuantLinear and _why_not_smoothable(name, module, owners) is None]


def chosen_layers(student: nn.Module, patterns: list[str] | str) -> list[str]:
    """The layers ``quant.smoothing_layers`` names: ``auto`` (every smoothable layer) or globs, checked one by one."""
    if patterns == "auto":
        return smoothable_layers(student)
    owners = _quantizer_owners(student)
    names = [name for name, module in student.named_modules() if type(module) is QuantLinear]
    chosen: list[str] = []
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ModelError(f"quant.smoothing_layers: pattern {pattern!r} matches no quantized Linear layer; "
                             f"layers: {', '.join(names)}")
        for name in matched:
            reason = _why_not_smoothable(name, student.get_submodule(name), owners)
            if reason is not None:
                raise ModelError(f"quant.smoothing_layers: layer {name!r} cannot be smoothed: {reason}")
            chosen += [] if name in chosen else [name]
    return chosen


def smooth_layers(student: nn.Module, names: list[str], maxima: dict[str, torch.Tensor] | None,
                  alpha: float) -> dict[str, float]:
    """Give each named layer its ``1/s`` buffer and multiply its weight columns by ``s``; returns ``{name: max s / min s}``.

    ``maxima`` (``input_channel_maxima`` of the float model) gives ``s``; without it the factors are
    1, to be filled by a state dict (a packed file, a checkpoint). A layer's weight quantizer is
    initialised again on the smoothed weight when it was initialised before.
    """
    spread: dict[str, float] = {}
    for name in names:
        layer = student.get_submodule(name)
        factors = torch.ones(layer.in_features, device=layer.weight.device)
        if maxima is not None and name in maxima:
            factors = smoothing_factors(maxima[name].to(layer.weight.device), layer.weight, alpha)
        with torch.no_grad():
            layer.weight.mul_(factors.to(layer.weight.dtype))
        layer.register_buffer(SMOOTHING_BUFFER, (1.0 / factors).to(layer.weight.dtype))
        if bool(layer.weight_quantizer.initialized):
            layer.weight_quantizer.init_from_weight(layer.weight)
        spread[name] = float(factors.max() / factors.min())
    return spread


def add_smoothing_buffers(student: nn.Module, state_keys: Iterable[str]) -> None:
    """Give the layers whose ``input_smoothing`` a state dict holds a buffer of ones to load it into.

    Example:
        >>> from qdistill.quant import prepare
        >>> student = prepare(nn.Sequential(nn.Linear(4, 2)))
        >>> add_smoothing_buffers(student, ["0.weight", "0.input_smoothing"])
        >>> student[0].input_smoothing.tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    suffix = f".{SMOOTHING_BUFFER}"
    for key in state_keys:
        if not key.endswith(suffix):
            continue
        name = key[: -len(suffix)]
        try:
            layer = student.get_submodule(name)
        except AttributeError:
            continue  # load_state names the unexpected key
        if isinstance(layer, QuantLinear) and SMOOTHING_BUFFER not in layer._buffers:
            layer.register_buffer(SMOOTHING_BUFFER, torch.ones(layer.in_features, device=layer.weight.device))
