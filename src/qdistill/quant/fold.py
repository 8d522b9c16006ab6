"""BatchNorm folding: merge an eval-mode BatchNorm into the convolution or linear layer before it.

Folding happens before QAT, so the weights the student trains (and quantizes) are the weights
that are exported; the folded float model equals the unfolded one in eval mode.
"""

from __future__ import annotations

import torch
from torch import fx, nn

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_into(layer: nn.Module, norm: nn.Module) -> None:
    """Fold ``norm`` (running statistics and affine) into ``layer``'s weight and bias, in place.

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8).eval()
        >>> fold_into(conv, bn)   # conv(x) now equals bn(conv(x)) before folding
    """
    with torch.no_grad():
        std = torch.sqrt(norm.running_var + norm.eps)
        gamma = norm.weight if norm.affine else torch.ones_like(std)
        beta = norm.bias if norm.affine else torch.zeros_like(std)
        factor = gamma / std  # (C_out,)
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        layer.weight.mul_(factor.reshape(shape))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
        new_bias = (bias - norm.running_mean) * factor + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)


def _single_user_pairs(graph_module: fx.GraphModule) -> list[tuple[str, str]]:
    modules = dict(graph_module.named_modules())
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), NORMS):
            continue
        producer = node.args[0]
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            continue
        if isinstance(modules.get(producer.target), FOLDABLE) and len(producer.users) == 1:
            pairs.append((producer.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if isinstance(a, FOLDABLE) and isinstance(b, NORMS):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + name_a, prefix + name_b))
    return pairs


def find_foldable_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str | None]:
    """``(layer, norm)`` module-name pairs, by fx tracing, else by nn.Sequential adjacency.

    Returns the pairs and, when tracing failed, the reason (for the report).
    """
    try:
        return _single_user_pairs(fx.symbolic_trace(model)), None
    except Exception as error:  # fx raises many types for untraceable Python
        reason = f"torch.fx could not trace the model ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
        return _sequential_pairs(model), reason


def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every foldable BatchNorm of ``model`` in place (replaced by Identity); names folded."""
    pairs, _ = find_foldable_pairs(model)
    modules = dict(model.named_modules())
    for layer_name, norm_name in pairs:
        fold_into(modules[layer_name], modules[norm_name].eval())
        _replace(model, norm_name, nn.Identity())
    return [norm_name for _, norm_name in pairs]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
