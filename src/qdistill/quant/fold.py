"""BatchNorm folding: merge an eval-mode BatchNorm into the convolution or linear layer before it.

Folding happens before QAT, so the weights the student trains (and quantizes) are the weights
that are exported; the folded float model equals the unfolded one in eval mode.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from qdistill.quant.graph import call_counts, module_graphs, module_plan, trace_model, trace_module
from qdistill.quant.rewrite import install_forward

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def is_norm(module: nn.Module) -> bool:
    """A BatchNorm whose forward qdistill knows: torch's own, or timm's norm + activation (``BatchNormAct2d``).

    Example:
        >>> is_norm(nn.BatchNorm2d(4)), is_norm(nn.LayerNorm(4))
        (True, False)
    """
    if type(module) in NORMS:
        return True
    return (isinstance(module, NORMS) and type(module).__module__.startswith("timm.")
            and isinstance(getattr(module, "act", None), nn.Module))


def after_norm(norm: nn.Module) -> nn.Module:
    """What is left of ``norm`` once its affine map is folded away: nothing, or timm's dropout and activation.

    Example:
        >>> after_norm(nn.BatchNorm2d(4))
        Identity()
    """
    rest = [part for part in (getattr(norm, "drop", None), getattr(norm, "act", None))
            if isinstance(part, nn.Module) and not isinstance(part, nn.Identity)]
    return nn.Identity() if not rest else rest[0] if len(rest) == 1 else nn.Sequential(*rest)


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
        if norm is None or not is_norm(norm) or norm.running_var is None:
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
            if isinstance(a, FOLDABLE) and is_norm(b) and b.running_var is not None:
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
        model.set_submodule(norm_name, after_norm(modules[norm_name]))
    return [norm_name for _, norm_name in pairs]


def norm_as_conv(norm: nn.Module) -> nn.Module:
    """A BatchNorm2d with no layer to fold into, as the depthwise 1x1 conv computing the same affine map.

    The conv is then quantized like any other (one weight per channel, exact on a per-channel grid),
    so ONNX Runtime runs it as QLinearConv instead of a float BatchNormalization between integer ops.

    Example:
        >>> norm = nn.BatchNorm2d(3).eval()
        >>> _ = norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(norm_as_conv(norm)(x), norm(x), atol=1e-6)
        True
    """
    channels = norm.num_features
    conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=True).to(norm.running_mean.device)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    fold_into(conv, norm)
    rest = after_norm(norm)
    return conv if isinstance(rest, nn.Identity) else nn.Sequential(conv, rest)


def batchnorms_to_convs(model: nn.Module) -> list[str]:
    """Every BatchNorm2d left after folding (after an add, a concat, an activation) becomes ``norm_as_conv``; names.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
        >>> batchnorms_to_convs(model), type(model[2]).__name__
        (['2'], 'Conv2d')
    """
    names = [name for name, module in model.named_modules()
             if is_norm(module) and isinstance(module, nn.BatchNorm2d) and module.running_var is not None]
    for name in names:
        model.set_submodule(name, norm_as_conv(model.get_submodule(name).eval()))
    return names


LAYOUT_FUNCTIONS = {torch.permute}
LAYOUT_METHODS = {"permute", "contiguous"}
SCALE_MULS = {operator.mul, torch.mul}


def _parameter_chain(node: fx.Node, model: nn.Module) -> tuple[str, torch.Tensor] | None:
    """``(parameter name, value as used)`` for a parameter read directly or reshaped (``gamma.reshape(1, -1, 1, 1)``)."""
    steps = []
    while node.op == "call_method" and node.target in ("reshape", "view", "unsqueeze") and isinstance(node.args[0], fx.Node):
        steps.append(node)
        node = node.args[0]
    if node.op != "get_attr":
        return None
    try:
        value = model.get_parameter(node.target).detach()
    except AttributeError:
        return None
    for step in reversed(steps):
        if not all(isinstance(arg, int) for arg in step.args[1:]) or step.kwargs:
            return None
        value = getattr(value, step.target)(*step.args[1:])
    return node.target, value


def _layer_channel_axis(node: fx.Node, model: nn.Module, calls: dict[str, int]) -> tuple[str, int, int] | None:
    """``(layer, channel axis, rank)`` when ``node`` is a conv/linear output, moved only by permutes; else None."""
    permutes: list[list[int]] = []
    while node.op != "call_module":
        if len(node.users) != 1 or not isinstance(node.args[0], fx.Node):
            return None
        is_permute = (node.op == "call_function" and node.target in LAYOUT_FUNCTIONS) or (
            node.op == "call_method" and node.target in LAYOUT_METHODS)
        if not is_permute:
            return None
        if node.target != "contiguous":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            if not all(isinstance(dim, int) for dim in dims):
                return None
            permutes.append(list(dims))
        node = node.args[0]
    layer = model.get_submodule(node.target)
    if not isinstance(layer, FOLDABLE) or len(node.users) != 1 or calls[node.target] != 1:
        return None
    rank = len(permutes[-1]) if permutes else (2 if isinstance(layer, nn.Linear) else layer.weight.dim())
    axis = rank - 1 if isinstance(layer, nn.Linear) else 1
    for dims in reversed(permutes):  # the permute nearest the layer first
        axis = [dim % rank for dim in dims].index(axis)
    return node.target, axis, rank


def _per_channel_factor(value: torch.Tensor, axis: int, rank: int, channels: int) -> torch.Tensor | None:
    """The factor as a (channels,) vector when it broadcasts along ``axis`` only; else None."""
    if value.dim() > rank:
        return None
    shape = [1] * (rank - value.dim()) + list(value.shape)
    if any(size != 1 for position, size in enumerate(shape) if position != axis) or shape[axis] not in (1, channels):
        return None
    return value.reshape(-1).expand(channels).clone()


def _drop_product(model: nn.Module, parameter: str) -> bool:
    """Remove ``x * <parameter>`` from the forward of the module owning the parameter (the product now lives in the layer)."""
    owner_name, _, attribute = parameter.rpartition(".")
    owner = model.get_submodule(owner_name)
    trace = trace_model(model)
    plan = module_plan(owner, trace)
    if isinstance(plan, str):
        return False
    graph = trace_module(owner, plan[0])
    for node in graph.nodes:
        if not ((node.op == "call_function" and node.target in SCALE_MULS) or (
                node.op == "call_method" and node.target == "mul")) or len(node.args) != 2:
            continue
        chains = [_parameter_chain(arg, owner) if isinstance(arg, fx.Node) else None for arg in node.args]
        hit = [position for position, chain in enumerate(chains) if chain is not None and chain[0] == attribute]
        if len(hit) == 1:
            node.replace_all_uses_with(node.args[1 - hit[0]])
            graph.erase_node(node)
            _erase_unused_reads(graph)
            install_forward(owner, graph)
            delattr(owner, attribute)
            return True
    return False


def _erase_unused_reads(graph: fx.Graph) -> None:
    """Drop parameter reads (and their reshapes) that nothing uses any more."""
    removed = True
    while removed:
        removed = False
        for node in reversed(list(graph.nodes)):
            if not node.users and (node.op == "get_attr" or (node.op == "call_method" and node.target in ("reshape", "view", "unsqueeze"))):
                graph.erase_node(node)
                removed = True


def fold_layer_scales(model: nn.Module) -> list[str]:
    """Fold per-channel multipliers (ConvNeXt's layer scale, ``x * gamma``) into the conv/linear layer before them.

    ``gamma * (W x + b) = (gamma W) x + gamma b``, so the product disappears from the forward and
    the layer's weights carry it; it is exact in float. Returns the parameters folded.

    Example:
        >>> class Scaled(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.gamma = nn.Linear(4, 4), nn.Parameter(torch.full((4,), 0.5))
        ...     def forward(self, x):
        ...         return self.fc(x) * self.gamma + x
        >>> model, x = Scaled(), torch.randn(2, 4)
        >>> before = model(x)
        >>> fold_layer_scales(model), torch.allclose(model(x), before), hasattr(model, "gamma")
        (['gamma'], True, False)
    """
    folded = []
    while True:
        trace = trace_model(model)
        if trace.graph is None:
            return folded
        found = _next_layer_scale(trace.graph, model)
        if found is None:
            return folded
        layer_name, parameter, factor = found
        layer = model.get_submodule(layer_name)
        if not _drop_product(model, parameter):
            return folded
        with torch.no_grad():
            layer.weight.mul_(factor.to(layer.weight).reshape([-1] + [1] * (layer.weight.dim() - 1)))
            if layer.bias is not None:
                layer.bias.mul_(factor.to(layer.bias))
        folded.append(parameter)


def _next_layer_scale(graph: fx.Graph, model: nn.Module) -> tuple[str, str, torch.Tensor] | None:
    calls = call_counts(graph)
    for node in graph.nodes:
        is_mul = (node.op == "call_function" and node.target in SCALE_MULS) or (
            node.op == "call_method" and node.target == "mul")
        if not is_mul or len(node.args) != 2 or node.kwargs or not all(isinstance(arg, fx.Node) for arg in node.args):
            continue
        for position in (0, 1):
            chain = _parameter_chain(node.args[position], model)
            source = _layer_channel_axis(node.args[1 - position], model, calls) if chain is not None else None
            if source is None:
                continue
            layer_name, axis, rank = source
            layer = model.get_submodule(layer_name)
            factor = _per_channel_factor(chain[1], axis, rank, layer.weight.shape[0])
            if factor is not None and sum(1 for _ in _uses(graph, chain[0])) == 1:
                return layer_name, chain[0], factor
    return None


def _uses(graph: fx.Graph, target: str):
    return (node for node in graph.nodes if node.op == "get_attr" and node.target == target)
