"""Residual additions and concatenations made quantized: ``out + identity`` becomes a ``QuantAdd``.

A module whose own forward adds two tensors (or multiplies, matrix-multiplies, concatenates or
average-pools them: ``F.adaptive_avg_pool2d``, ``F.avg_pool2d``, ``x.mean((2, 3), keepdim=True)``) is traced on its own
(``graph.trace_module``); each such op becomes a call to a new child module (``QuantAdd`` /
``QuantCat``, named after the op: ``layer1.0.add``) that fake-quantizes every input. The module
keeps its class (a subclass with the generated forward), attributes, children and parameter names,
so forward hooks, feature distillation and checkpoints see the same model.

Example:
    >>> from qdistill import models
    >>> from qdistill.quant.graph import trace_model
    >>> from qdistill.quant.modules import ActivationQuantizer
    >>> model = models.create("tiny_resnet")
    >>> added, problems = rewrite_functional_ops(model, trace_model(model), lambda: ActivationQuantizer(8))
    >>> problems                         # {module name: why it could not be rewritten}
    {}
    >>> type(model.layer1[0].add).__name__, type(model.layer1[0]).__name__
    ('QuantAdd', 'BasicBlock')
"""

from __future__ import annotations

import importlib
import inspect
import operator
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdistill.quant.graph import ModelTrace, module_graphs, tensor_nodes
from qdistill.quant.modules import INPUT_QUANTIZED_CLASS, QuantAdd, QuantCat, QuantMatMul, QuantMul
from qdistill.quant.quantizer import Quantizer

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "__add__"}  # not add_: an in-place add also changes its first operand
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
MUL_FUNCTIONS = {operator.mul, torch.mul}
MUL_METHODS = {"mul", "__mul__"}  # not mul_: it changes its first operand
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "__matmul__", "bmm"}
POOL_FUNCTIONS = {F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d, F.avg_pool2d: nn.AvgPool2d}  # same arguments, in order
SHAPE_METHODS = {"reshape", "view", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "contiguous", "to"}


def add_operands(node: fx.Node, tensors: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of ``a + b`` / ``torch.add(a, b)`` / ``a.add(b)``; None for other nodes.

    Example:
        >>> graph = fx.symbolic_trace(lambda x, y: x + y).graph
        >>> [add_operands(node, tensor_nodes(graph)) for node in graph.nodes][2]
        (x, y)
    """
    is_add = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS)
    if not is_add or node.kwargs or len(node.args) != 2:
        return None  # alpha=, out= or a scalar operand: not a residual addition
    first, second = node.args
    if isinstance(first, fx.Node) and isinstance(second, fx.Node) and first in tensors and second in tensors:
        return first, second
    return None


def _is_parameter(node: fx.Node) -> bool:
    """A parameter or buffer, possibly reshaped (``self.gamma.reshape(1, -1, 1, 1)``): a constant, not an activation."""
    while node.op == "call_method" and node.target in SHAPE_METHODS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.op == "get_attr"


def _activation_operands(node: fx.Node, tensors: set[fx.Node], functions: set, methods: set) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of a binary op in ``functions``/``methods`` when both are activations (not parameters)."""
    is_op = (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target in methods)
    if not is_op or node.kwargs or len(node.args) != 2:
        return None
    first, second = node.args
    if not all(isinstance(arg, fx.Node) and arg in tensors and not _is_parameter(arg) for arg in (first, second)):
        return None
    return first, second


def mul_operands(node: fx.Node, tensors: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The two activation operands of ``a * b`` (a gate times a feature map); None for other nodes.

    A product with a parameter (a layer scale) or a number is not one: it is a constant factor.

    Example:
        >>> graph = fx.symbolic_trace(lambda x, y: x * y.sigmoid() * 2).graph
        >>> [node.name for node in graph.nodes if mul_operands(node, tensor_nodes(graph))]
        ['mul']
    """
    return _activation_operands(node, tensors, MUL_FUNCTIONS, MUL_METHODS)


def matmul_operands(node: fx.Node, tensors: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The two activation operands of ``a @ b`` / ``torch.matmul`` / ``torch.bmm`` (attention); None otherwise.

    Example:
        >>> graph = fx.symbolic_trace(lambda q, k: (q @ k.transpose(-2, -1)).softmax(-1)).graph
        >>> [node.name for node in graph.nodes if matmul_operands(node, tensor_nodes(graph))]
        ['matmul']
    """
    return _activation_operands(node, tensors, MATMUL_FUNCTIONS, MATMUL_METHODS)


def cat_operands(node: fx.Node, tensors: set[fx.Node]) -> tuple[list[fx.Node], int] | None:
    """The tensors and dimension of ``torch.cat([a, b, ...], dim)``; None for other nodes.

    Example:
        >>> graph = fx.symbolic_trace(lambda x, y: torch.cat([x, y], dim=1)).graph
        >>> [cat_operands(node, tensor_nodes(graph)) for node in graph.nodes][2]
        ([x, y], 1)
    """
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return None
    arguments = dict(zip(("tensors", "dim"), node.args, strict=False)) | dict(node.kwargs)
    inputs, dim = arguments.get("tensors"), arguments.get("dim", 0)
    if set(arguments) - {"tensors", "dim"} or not isinstance(inputs, (list, tuple)) or not isinstance(dim, int):
        return None
    if len(inputs) < 2 or not all(isinstance(arg, fx.Node) and arg in tensors for arg in inputs):
        return None
    return list(inputs), dim


def _is_spatial_mean(node: fx.Node, tensors: set[fx.Node]) -> bool:
    """``x.mean((2, 3), keepdim=True)`` / ``torch.mean(...)``: a global average pool (timm's squeeze-excite)."""
    is_mean = (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean)
    if not is_mean or not node.args or node.args[0] not in tensors:
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    extra = set(node.kwargs) - {"dim", "keepdim"}
    # (2, 3) pools H and W of an (N, C, H, W) map; (-2, -1) of any image batch. Both keep (N, C, 1, 1).
    return keepdim is True and not extra and isinstance(dims, (tuple, list)) and tuple(dims) in ((2, 3), (-2, -1))


def pool_layer(node: fx.Node, tensors: set[fx.Node]) -> nn.Module | None:
    """The ``nn`` pooling layer a functional average pool with constant settings stands for; None otherwise.

    DenseNet ends in ``F.adaptive_avg_pool2d(out, (1, 1))`` and timm's squeeze-excite starts with
    ``x.mean((2, 3), keepdim=True)``: as float ops they leave the layer before them without a
    quantized result (a ConvInteger instead of a fused QLinearConv).

    Example:
        >>> graph = fx.symbolic_trace(lambda x: F.adaptive_avg_pool2d(x, (1, 1))).graph
        >>> [pool_layer(node, tensor_nodes(graph)) for node in graph.nodes][1]
        AdaptiveAvgPool2d(output_size=(1, 1))
    """
    if _is_spatial_mean(node, tensors):
        return nn.AdaptiveAvgPool2d(1)
    if node.op != "call_function" or node.target not in POOL_FUNCTIONS or not node.args or node.args[0] not in tensors:
        return None
    settings = [*node.args[1:], *node.kwargs.values()]
    if any(isinstance(value, fx.Node) for value in settings):
        return None  # a size computed at run time
    return POOL_FUNCTIONS[node.target](*node.args[1:], **node.kwargs)


def _has_functional_ops(graph: fx.Graph) -> bool:
    tensors = tensor_nodes(graph)
    return any(add_operands(node, tensors) or mul_operands(node, tensors) or matmul_operands(node, tensors)
               or cat_operands(node, tensors) or pool_layer(node, tensors) is not None for node in graph.nodes)


def _free_name(module: nn.Module, wanted: str) -> str:
    name, suffix = wanted, 0
    while hasattr(module, name):
        suffix += 1
        name = f"{wanted}_q{suffix}"
    return name


def _replace(graph: fx.Graph, node: fx.Node, module: nn.Module, child: nn.Module, args: tuple,
             tensors: set[fx.Node]) -> str:
    name = _free_name(module, node.name)
    module.add_module(name, child)
    with graph.inserting_before(node):
        call = graph.call_module(name, args=args)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    tensors.add(call)  # a later op may add this result again (x = x + a; x = x + b)
    return name


def rewrite_module(module: nn.Module, graph: fx.Graph, tensors: set[fx.Node],
                   make_quantizer: Callable[[], Quantizer]) -> list[str]:
    """Turn the tensor additions/concatenations of ``module``'s own forward into quantized ops; names added.

    Example:
        >>> from qdistill.quant.graph import trace_module
        >>> from qdistill.quant.modules import ActivationQuantizer
        >>> from qdistill.models.tiny import BasicBlock
        >>> block = BasicBlock(4, 4)
        >>> graph = trace_module(block, {})
        >>> rewrite_module(block, graph, tensor_nodes(graph), lambda: ActivationQuantizer(8))
        ['add']
    """
    added = []
    for node in list(graph.nodes):
        operands = add_operands(node, tensors)
        if operands is not None:
            added.append(_replace(graph, node, module, QuantAdd([make_quantizer(), make_quantizer()]), operands,
                                  tensors))
            continue
        for find, kind in ((mul_operands, QuantMul), (matmul_operands, QuantMatMul)):
            factors = find(node, tensors)
            if factors is not None:
                added.append(_replace(graph, node, module, kind([make_quantizer(), make_quantizer()]), factors, tensors))
                break
        if factors is not None:
            continue
        concatenated = cat_operands(node, tensors)
        if concatenated is not None:
            inputs, dim = concatenated
            child = QuantCat([make_quantizer() for _ in inputs], dim)
            added.append(_replace(graph, node, module, child, tuple(inputs), tensors))
            continue
        pool = pool_layer(node, tensors)
        if pool is not None:
            child = INPUT_QUANTIZED_CLASS[type(pool)].from_float(pool, make_quantizer())
            added.append(_replace(graph, node, module, child, (node.args[0],), tensors))
    if added:
        graph.lint()
        install_forward(module, graph)
    return added


def install_forward(module: nn.Module, graph: fx.Graph) -> None:
    """Give ``module`` the forward generated from ``graph`` (a subclass of its class; nothing else changes).

    The subclass can be pickled and deep-copied with the module (``torch.save(student)``): it is
    rebuilt from ``(original class, generated source, its globals)`` by ``restore_rewritten``.

    Example:
        >>> from qdistill.quant.graph import trace_module
        >>> from qdistill.models.tiny import BasicBlock
        >>> block = BasicBlock(4, 4)
        >>> install_forward(block, trace_module(block, {}))
        >>> isinstance(block, BasicBlock), "add = bn2 + x" in block.qdistill_forward_code
        (True, True)
    """
    original = getattr(type(module), "qdistill_original", type(module))  # a rewritten module rewritten again
    code = graph.python_code(root_module="self")
    module.__class__ = rewritten_class(original, code.src, dict(code.globals))


def rewritten_class(original: type[nn.Module], source: str, namespace: dict[str, Any]) -> type[nn.Module]:
    """The subclass of ``original`` whose forward is the function ``forward`` defined by ``source``.

    ``namespace`` holds the globals ``source`` refers to (``torch``, functions it calls). The class
    keeps ``original``'s name, module and qualified name, so ``repr`` and error messages read as before.

    Example:
        >>> relu6 = rewritten_class(nn.ReLU, "def forward(self, x): return x.clamp(0, 6)", {})
        >>> relu6()(torch.tensor([-1.0, 8.0])), relu6.__mro__[1] is nn.ReLU, relu6.__name__
        (tensor([0., 6.]), True, 'ReLU')
    """
    scope = dict(namespace)
    exec(compile(source, f"<qdistill: {original.__qualname__}.forward with quantized ops>", "exec"), scope)
    forward = _same_signature(scope["forward"], original.forward)
    forward.__doc__ = original.forward.__doc__
    attributes = {"forward": forward, "__module__": original.__module__, "__qualname__": original.__qualname__,
                  "qdistill_forward_code": source, "qdistill_original": original,
                  "qdistill_forward_globals": dict(namespace), "__reduce_ex__": _reduce_rewritten}
    return type(original.__name__, (original,), attributes)


@dataclass(frozen=True)
class ImportedModule:
    """A Python module in a pickled forward's globals, stored by name and imported again on load."""

    name: str


def _reduce_rewritten(module: nn.Module, protocol: int) -> tuple:
    # the generated class is not importable by its name: pickle (and deepcopy) rebuild it instead
    cls = type(module)
    namespace = {name: ImportedModule(value.__name__) if isinstance(value, types.ModuleType) else value
                 for name, value in cls.qdistill_forward_globals.items()}
    return restore_rewritten, (cls.qdistill_original, cls.qdistill_forward_code, namespace), module.__getstate__()


def restore_rewritten(original: type[nn.Module], source: str, namespace: dict[str, Any]) -> nn.Module:
    """An empty instance of the rewritten class (pickle then sets its state); saved files refer to this name.

    ``torch.load(path, weights_only=False)`` calls it for every rewritten module of a saved student.

    Example:
        >>> module = restore_rewritten(nn.ReLU, "def forward(self, x): return x.clamp(0, 6)", {})
        >>> type(module).qdistill_forward_code, type(module).qdistill_original is nn.ReLU
        ('def forward(self, x): return x.clamp(0, 6)', True)
    """
    namespace = {name: importlib.import_module(value.name) if isinstance(value, ImportedModule) else value
                 for name, value in namespace.items()}
    cls = rewritten_class(original, source, namespace)
    return cls.__new__(cls)


def _same_signature(generated, original):
    """A function with ``original``'s parameter names and defaults that calls ``generated`` by position.

    fx renames some parameters (``mask`` -> ``mask_1``); callers (and tracers, which read the
    signature) must keep seeing the original ones.
    """
    parameters = list(inspect.signature(original).parameters.values())
    names = ", ".join(parameter.name for parameter in parameters)
    namespace = {"_generated": generated}
    exec(f"def forward({names}):\n    return _generated({names})\n", namespace)
    forward = namespace["forward"]
    forward.__defaults__ = tuple(p.default for p in parameters if p.default is not inspect.Parameter.empty) or None
    return forward


def rewrite_functional_ops(model: nn.Module, trace: ModelTrace, make_quantizer: Callable[[], Quantizer],
                           skip: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, str]]:
    """Quantize the additions/concatenations of every custom module; returns (ops added, ``{module: reason}``).

    ``reason`` says why a module's forward could not be rewritten (its additions stay float). The modules
    named in ``skip`` keep their forward (``prepare`` lists why).

    Example:
        >>> from qdistill import models
        >>> from qdistill.quant.graph import trace_model
        >>> from qdistill.quant.modules import ActivationQuantizer
        >>> model = models.create("tiny_resnet")
        >>> rewrite_functional_ops(model, trace_model(model), lambda: ActivationQuantizer(8))
        (['layer1.0.add', 'layer2.0.add', 'layer3.0.add'], {})
    """
    graphs, problems = module_graphs(model, trace, matters=_has_functional_ops)
    added = []
    for name, module, graph, tensor_positions in graphs:
        if name in skip:
            continue
        tensors = tensor_nodes(graph, tensor_positions)
        prefix = f"{name}." if name else ""
        added += [prefix + child for child in rewrite_module(module, graph, tensors, make_quantizer)]
    problems = {name: f"{reason}; additions and concatenations in its forward stay float"
                for name, reason in problems.items()}
    return added, problems
