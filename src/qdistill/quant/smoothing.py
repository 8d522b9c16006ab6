"""SmoothQuant-style migration of activation outliers into the weights (recipe ``quant.smoothing``).

A transformer's feed-forward inputs (LayerNorm and GELU outputs) have a few channels far larger
than the rest; one per-tensor step for all of them leaves the others a handful of codes. A smoothed
Linear divides its input per channel by

    s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)        (Xiao et al., SmoothQuant, 2023)

before the input quantizer, and multiplies the weight's input column ``j`` by ``s_j``. The float
function is the same; the activation is flatter, and per-output-channel weight steps absorb the
weight side. The division is a buffer of ``1/s`` on the input quantizer (``quantizer.SMOOTHING_BUFFER``),
which the ONNX export writes as a float ``Mul`` before the QuantizeLinear: ONNX Runtime computes the
same products as PyTorch, so the int8 file still matches the student code for code.

A tensor can be smoothed only where Linear layers alone read it, as floats: every holder of its
quantizer is a Linear (query, key and value share theirs and are smoothed together, with the largest
weight column over the three), and no integer kernel before it writes its codes directly (a linked
requantizer: the export would fuse that kernel's output straight into the layer's codes).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qdistill.batch import forward_batches
from qdistill.errors import ModelError
from qdistill.quant.modules import QuantLinear
from qdistill.quant.quantizer import SMOOTHING_BUFFER, Quantizer

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


def _group(student: nn.Module, name: str, owners: dict[int, list[str]]) -> tuple[list[str] | None, str]:
    """The Linears that share ``name``'s input quantizer (itself included), or None and why it cannot be smoothed."""
    layer = student.get_submodule(name)
    if type(layer) is not QuantLinear or layer.input_quantizer is None:
        return None, "it is not a quantized Linear with a quantized input"
    readers = owners.get(id(layer.input_quantizer), [])
    others = [owner for owner in readers if type(student.get_submodule(owner)) is not QuantLinear
              or student.get_submodule(owner).input_quantizer is not layer.input_quantizer]
    if others:
        return None, (f"its input quantizer is shared with or written by {', '.join(others[:3])}; smoothing needs a "
                      "tensor that only Linear layers read, as floats (e.g. after a LayerNorm or GELU)")
    return readers, ""


def smoothable_layers(student: nn.Module) -> list[str]:
    """The quantized Linear layers of a prepared ``student`` whose input only Linear layers read.

    Layers that share an input quantizer (query, key and value) are smoothed together, with one factor.

    Example:
        >>> from qdistill import models
        >>> from qdistill.quant import prepare
        >>> smoothable_layers(prepare(models.create("tiny_transformer", attention=["manual"])))[:4]
        ['project', 'encoder.0.attention.query', 'encoder.0.attention.key', 'encoder.0.attention.value']
    """
    owners = _quantizer_owners(student)
    return [name for name, module in student.named_modules()
            if type(module) is QuantLinear and _group(student, name, owners)[0] is not None]


def chosen_groups(student: nn.Module, patterns: list[str] | str) -> list[list[str]]:
    """The groups of layers (one per input quantizer) that ``quant.smoothing_layers`` names: ``auto`` (every
    smoothable layer) or globs, checked one by one; a named layer brings the layers that share its input."""
    names = [name for name, module in student.named_modules() if type(module) is QuantLinear]
    owners = _quantizer_owners(student)
    if patterns == "auto":
        matched = smoothable_layers(student)
    else:
        matched = []
        for pattern in patterns:
            hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise ModelError(f"quant.smoothing_layers: pattern {pattern!r} matches no quantized Linear layer; "
                                 f"layers: {', '.join(names)}")
            matched += [name for name in hits if name not in matched]
    groups: dict[int, list[str]] = {}
    for name in matched:
        group, reason = _group(student, name, owners)
        if group is None:
            raise ModelError(f"quant.smoothing_layers: layer {name!r} cannot be smoothed: {reason}")
        groups.setdefault(id(student.get_submodule(name).input_quantizer), group)
    return list(groups.values())


def smooth_layers(student: nn.Module, groups: list[list[str]], maxima: dict[str, torch.Tensor] | None,
                  alpha: float) -> dict[str, float]:
    """Give each group's input quantizer its ``1/s`` buffer and multiply its layers' weight columns by ``s``.

    ``s`` takes the input maxima (``input_channel_maxima`` of the float model) and, for the weight side, the
    largest weight column over the group's layers. Without ``maxima`` the factors are 1, to be filled by a
    state dict (a packed file, a checkpoint). A weight quantizer is initialised again on the smoothed weight
    when it was initialised before. Returns ``{layer: max s / min s}``.
    """
    spread: dict[str, float] = {}
    for names in groups:
        layers = [student.get_submodule(name) for name in names]
        device = layers[0].weight.device
        factors = torch.ones(layers[0].in_features, device=device)
        if maxima is not None and all(name in maxima for name in names):
            activation = torch.stack([maxima[name].to(device) for name in names]).amax(dim=0)
            weights = torch.cat([layer.weight.detach() for layer in layers])  # (sum of out, in)
            factors = smoothing_factors(activation, weights, alpha)
        for layer in layers:
            with torch.no_grad():
                layer.weight.mul_(factors.to(layer.weight.dtype))
            if bool(layer.weight_quantizer.initialized):
                layer.weight_quantizer.init_from_weight(layer.weight)
        layers[0].input_quantizer.register_buffer(SMOOTHING_BUFFER, (1.0 / factors).to(layers[0].weight.dtype))
        spread.update({name: float(factors.max() / factors.min()) for name in names})
    return spread


def add_smoothing_buffers(student: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give the quantizers whose ``input_smoothing`` the state dict ``state`` holds a buffer of ones to load it into.

    Example:
        >>> from qdistill.quant import prepare
        >>> student = prepare(nn.Sequential(nn.Linear(4, 2)))
        >>> add_smoothing_buffers(student, {"0.input_quantizer.input_smoothing": torch.full((4,), 0.5)})
        >>> student[0].input_quantizer.input_smoothing.tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    suffix = f".{SMOOTHING_BUFFER}"
    for key, value in state.items():
        if not key.endswith(suffix):
            continue
        try:
            quantizer = student.get_submodule(key[: -len(suffix)])
        except AttributeError:
            continue  # load_state names the unexpected key
        if isinstance(quantizer, Quantizer) and SMOOTHING_BUFFER not in quantizer._buffers:
            quantizer.register_buffer(SMOOTHING_BUFFER, torch.ones_like(value, device=quantizer.scale.device))
