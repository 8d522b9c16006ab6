"""BatchNorm folding: merge an eval-mode BatchNorm into the convolution or linear layer before it.

Folding happens before QAT, so the weights the student trains (and quantizes) are the weights
that are exported; the folded float model equals the unfolded one in eval mode.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from qdistill.quant.graph import call_counts, module_graphs, trace_model

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


def graph_pairs(graph: fx.Graph, namespace: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """``(layer, norm)`` names where the norm's input is a conv/linear output that nothing else reads.

    Both modules must be called once only: folding changes the layer at every place it is called.

    Example:
        >>> from qdistill import models
        >>> model = models.create("tiny_resnet")
        >>> graph_pairs(trace_model(model).graph, model)[:1]
        [('stem.0', 'stem.1')]
    """
    calls = call_counts(graph)
    pairs = []
    for node in graph.nodes:
        norm = namespace.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(norm, NORMS) or norm.running_var is None:
            continue  # a BatchNorm without running statistics normalises per batch even in eval mode
        producer = node.args[0] if node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module" or len(producer.users) != 1:
            continue
        if isinstance(namespace.get_submodule(producer.target), FOLDABLE) and calls[producer.target] == calls[node.target] == 1:
            pairs.append((prefix + producer.target, prefix + node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:], strict=False):
            if isinstance(a, FOLDABLE) and isinstance(b, NORMS):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + name_a, prefix + name_b))
    return pairs


def find_foldable_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str | None]:
    """``(layer, norm)`` module-name pairs from the model graph, else from each module's own graph.

    Returns the pairs and, when the whole model could not be traced, the reason (for the report).
    Without a model graph, pairs come from the forward of every custom module that traces on its
    own and from ``nn.Sequential`` order.

    Example:
        >>> from qdistill import models
        >>> find_foldable_pairs(models.create("tiny_resnet"))[0][:2]
        [('stem.0', 'stem.1'), ('layer1.0.conv1', 'layer1.0.bn1')]
    """
    trace = trace_model(model)
    if trace.graph is not None:
        return graph_pairs(trace.graph, model), None
    pairs = _sequential_pairs(model)
    graphs, _ = module_graphs(model, trace)
    for name, module, graph, _ in graphs:
        pairs += graph_pairs(graph, module, f"{name}." if name else "")
    return list(dict.fromkeys(pairs)), trace.failure


def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every foldable BatchNorm of ``model`` in place (replaced by Identity); names folded.

    Example:
        >>> from qdistill import models
        >>> fold_batchnorms(models.create("tiny_resnet").eval())[:3]
        ['stem.1', 'layer1.0.bn1', 'layer1.0.bn2']
    """
    pairs, _ = find_foldable_pairs(model)
    modules = dict(model.named_modules())
    for layer_name, norm_name in pairs:
        fold_into(modules[layer_name], modules[norm_name].eval())
        model.set_submodule(norm_name, nn.Identity())
    return [norm_name for _, norm_name in pairs]
