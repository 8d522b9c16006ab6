"""torch.fx tracing for ``prepare``: the whole model where it traces, each module's own forward where it does not.

Two views of a model are used:

- the *model graph*: ``torch.fx`` traced from the root, stopping at torch.nn layers and at
  qdistill's quantized modules. It shows every tensor and all its consumers, across module
  boundaries, and how each custom module is called (which arguments are tensors, which are fixed
  values such as ``mask=None``).
- a *module graph*: one module's own forward, every child a leaf. Rewriting a module (putting a
  ``QuantAdd`` where it adds two tensors) edits this graph and gives the module the generated
  forward, keeping its class, attributes, children and parameter names.

When the model graph cannot be traced (data-dependent Python, unsupported calls), ``prepare``
falls back to module graphs alone, and reports the reason.

The root's optional forward parameters are fixed at their defaults, except those the model is
called with (``CALLED_WITH``, which ``prepare`` sets from its calibration batches: a dict batch's
keys, a tuple's positions), so ``model(input_ids=..., attention_mask=...)`` keeps its mask an input.

Example:
    >>> from qdistill import models
    >>> model = models.create("tiny_resnet")
    >>> trace = trace_model(model)
    >>> trace.failure is None            # the whole model traced
    True
    >>> trace.calls[id(model.layer1[0])]      # how the block was called
    [{'x': ('tensor', None)}]
"""

from __future__ import annotations

import inspect
import operator
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from qdistill.batch import input_tensors
from qdistill.quant.attention import DecomposedMultiheadAttention
from qdistill.quant.modules import (
    InputQuantizedMixin,
    QuantAdd,
    QuantCat,
    QuantLayerMixin,
    QuantMatMul,
    QuantMul,
    RuntimeGelu,
)
from qdistill.quant.quantizer import Quantizer

# modules whose forward is never traced into: they are the units prepare reasons about
LEAF_TYPES = (QuantLayerMixin, InputQuantizedMixin, QuantAdd, QuantMul, QuantMatMul, QuantCat, Quantizer,
              DecomposedMultiheadAttention, RuntimeGelu)
FIXED_TYPES = (type(None), bool, int, float, str)  # argument values a module graph may be specialised to
UNSPECIALISED = "it is called with arguments torch.fx cannot specialise on (or differently at different places)"
NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "stride", "element_size",
                      "is_contiguous", "get_device", "data_ptr", "__len__"}
TENSOR_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                  "torch._C._linalg", "torch._C._special")

CallPattern = dict[str, tuple[str, Any]]  # parameter -> ("tensor" | "other", None) or ("fixed", value)


def describe_failure(error: BaseException) -> str:
    """One short line for a tracing error (fx raises many exception types).

    Example:
        >>> describe_failure(TypeError("bad\\nmore"))
        'TypeError: bad'
    """
    first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


class PrepareTracer(fx.Tracer):
    """Stops at torch.nn layers and qdistill's quantized modules; records how other modules are called.

    With ``local=True`` every submodule is a leaf, so only the traced module's own forward appears,
    except the modules in ``inline`` (ids): those are traced through, as part of their caller's forward.

    Example:
        >>> from qdistill import models
        >>> tracer = PrepareTracer()
        >>> graph = tracer.trace(models.create("tiny_resnet"))
        >>> [type(module).__name__ for module, _ in tracer.bound_calls][:3]
        ['Sequential', 'Sequential', 'BasicBlock']
    """

    def __init__(self, local: bool = False, inline: frozenset[int] = frozenset()) -> None:
        super().__init__(autowrap_functions=(check_fixed,))  # a rewritten forward's guards stay calls
        self.local = local
        self.inline = inline
        self.inlined: list[nn.Module] = []
        self.bound_calls: list[tuple[nn.Module, inspect.BoundArguments | None]] = []

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if id(module) in self.inline:
            return False
        # BatchNorm subclasses (timm's BatchNormAct2d) stay whole so folding can see them
        if self.local or isinstance(module, (*LEAF_TYPES, nn.modules.batchnorm._BatchNorm)):
            return True
        return super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        if id(module) in self.inline:
            self.inlined.append(module)
        if not self.is_leaf_module(module, ""):
            try:
                bound = inspect.signature(module.forward).bind(*args, **kwargs)
                bound.apply_defaults()
            except TypeError:
                bound = None
            self.bound_calls.append((module, bound))
        return super().call_module(module, forward, args, kwargs)


@dataclass
class ModelTrace:
    """The model graph (None when tracing failed, with the reason) and how each module was called.

    Example:
        >>> class DataDependent(nn.Module):
        ...     def forward(self, x):
        ...         return x * 0 if x.mean() > 10 else x   # Python branching on a value: fx cannot trace it
        >>> trace = trace_model(DataDependent())
        >>> trace.graph is None, trace.failure.startswith("torch.fx could not trace the model (")
        (True, True)
    """

    graph: fx.Graph | None
    failure: str | None
    calls: dict[int, list[CallPattern | None]] = field(default_factory=dict)
    root: nn.Module | None = None


def default_arguments(module: nn.Module) -> dict[str, Any] | None:
    """Defaults of ``module.forward``'s optional parameters; None when it takes ``*args``/``**kwargs``/keyword-only.

    Example:
        >>> default_arguments(nn.MultiheadAttention(8, 2))["need_weights"]
        True
    """
    defaults = {}
    for name, parameter in inspect.signature(module.forward).parameters.items():
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            return None
        if parameter.default is not parameter.empty:
            defaults[name] = parameter.default
    return defaults


CALLED_WITH = "qdistill_called_with"  # attribute of a model: the forward parameters its batches give


def called_arguments(model: nn.Module, inputs: Any) -> tuple[str, ...]:
    """The forward parameters ``qdistill.batch.call_model(model, inputs)`` gives: a dict's keys, a tuple's positions.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        ...         return input_ids
        >>> called_arguments(Net(), {"attention_mask": torch.ones(1, 2), "input_ids": torch.ones(1, 2)})
        ('attention_mask', 'input_ids')
        >>> called_arguments(Net(), (torch.ones(1, 2), torch.ones(1, 2)))
        ('input_ids', 'attention_mask')
    """
    if isinstance(inputs, dict):
        return tuple(str(name) for name in inputs)
    parameters = list(inspect.signature(model.forward).parameters)
    return tuple(parameters[: len(input_tensors(inputs))])


def _root_fixed(model: nn.Module) -> dict[str, Any] | None:
    """The root forward's optional parameters to fix while tracing: their defaults, less those the model is called with."""
    defaults = default_arguments(model)
    if defaults is None:
        return None
    called = set(getattr(model, CALLED_WITH, ()))
    return {name: value for name, value in defaults.items() if name not in called}


def trace_model(model: nn.Module) -> ModelTrace:
    """Trace the whole model (optional forward arguments fixed at their defaults, as ``model(x)`` calls it,
    except those in ``model.qdistill_called_with``).

    Example:
        >>> from qdistill import models
        >>> trace_model(models.create("tiny_resnet")).failure is None
        True
    """
    tracer = PrepareTracer()
    defaults = _root_fixed(model)
    try:
        graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as error:  # fx raises many types for untraceable Python
        return ModelTrace(None, f"torch.fx could not trace the model ({describe_failure(error)})")
    tensors = tensor_nodes(graph)
    calls: dict[int, list[CallPattern | None]] = defaultdict(list)
    for module, bound in tracer.bound_calls:
        calls[id(module)].append(None if bound is None else _pattern(bound, tensors))
    return ModelTrace(graph, None, dict(calls), model)


def _pattern(bound: inspect.BoundArguments, tensors: set[fx.Node]) -> CallPattern | None:
    pattern: CallPattern = {}
    for name, value in bound.arguments.items():
        if isinstance(value, fx.Proxy):
            pattern[name] = ("tensor" if value.node in tensors else "other", None)
        elif isinstance(value, FIXED_TYPES):
            pattern[name] = ("fixed", value)
        else:
            return None  # containers of proxies, constant tensors: not something to specialise on
    return pattern


def module_plan(module: nn.Module, trace: ModelTrace) -> tuple[dict[str, Any], set[int]] | str:
    """How to trace ``module`` on its own: ``(fixed arguments, positions of tensor parameters)``, or why not.

    With a model graph the module's recorded calls decide; without one only modules whose forward
    has no optional parameters are traced (their tensors are the parameters).

    Example:
        >>> from qdistill import models
        >>> model = models.create("tiny_resnet")
        >>> module_plan(model.layer1[0], trace_model(model))
        ({}, {0})
    """
    defaults = default_arguments(module)
    if defaults is None:
        return "its forward takes *args, **kwargs or keyword-only parameters"
    parameters = list(inspect.signature(module.forward).parameters)
    if trace.graph is not None and trace.root is module:  # called as its batches call it: other optional arguments at defaults
        fixed = _root_fixed(module) or {}
        return fixed, {index for index, name in enumerate(parameters) if name not in fixed}
    if trace.graph is None:
        if defaults:
            return f"its forward has optional parameters ({', '.join(defaults)}) and the model could not be traced to see how it is called"
        return {}, set(range(len(parameters)))
    patterns = trace.calls.get(id(module))
    if not patterns:
        return "it is not called in the traced forward pass"
    if any(pattern is None for pattern in patterns) or any(pattern != patterns[0] for pattern in patterns):
        return UNSPECIALISED
    fixed = {name: value for name, (kind, value) in patterns[0].items() if kind == "fixed"}
    return fixed, {parameters.index(name) for name, (kind, _) in patterns[0].items() if kind == "tensor"}


class TrainingDependent(Exception):
    """The forward reads ``self.training``, which a traced graph would freeze at one value.

    Example:
        >>> class Halved(nn.Module):
        ...     def forward(self, x):
        ...         return x / 2 if self.training else x
        >>> try:
        ...     trace_module(Halved(), {})
        ... except TrainingDependent as error:
        ...     print(error, "|", error.graph.python_code("self").src.split("return ")[1].strip())
        its forward reads self.training, which a traced graph would freeze | x
    """

    def __init__(self, message: str, graph: fx.Graph) -> None:
        super().__init__(message)
        self.graph = graph  # the eval-mode graph, to decide whether the module mattered


def check_fixed(value: Any, expected: Any, name: str) -> None:
    """The guard of a forward specialised to ``name=expected``: plain Python, so exporters see no op.

    torch.fx guards a fixed argument with ``torch._assert(value == expected)``, which the
    TorchScript exporter records as ``aten::eq`` on a tensor and a bool, and fails.

    Example:
        >>> check_fixed(None, None, "mask")
        >>> check_fixed(True, False, "is_causal")
        Traceback (most recent call last):
        ValueError: is_causal: this forward was specialised to is_causal=False by qdistill.quant.prepare; got True
    """
    if value is expected or (type(value) is type(expected) and value == expected):
        return
    # the ONNX exporter passes a root forward's defaults as tensors (tensor(False))
    if (isinstance(value, torch.Tensor) and expected is not None and not isinstance(expected, str)
            and value.numel() == 1 and value.item() == expected):
        return
    raise ValueError(f"{name}: this forward was specialised to {name}={expected!r} by qdistill.quant.prepare; got {value!r}")


def _portable_guards(graph: fx.Graph) -> None:
    """Replace fx's guards on fixed arguments (``_assert_is_none``, ``torch._assert(x == v)``) by ``check_fixed``."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if getattr(node.target, "__name__", "") == "_assert_is_none" and node.args and isinstance(node.args[0], fx.Node):
            checked, expected = node.args[0], None
        elif (node.target is torch._assert and node.args and isinstance(node.args[0], fx.Node)
              and node.args[0].target is operator.eq and isinstance(node.args[0].args[0], fx.Node)
              and node.args[0].args[0].op == "placeholder" and len(node.args[0].users) == 1):
            comparison = node.args[0]
            checked, expected = comparison.args
        else:
            continue
        if checked.op != "placeholder":
            continue
        with graph.inserting_before(node):
            graph.call_function(check_fixed, (checked, expected, checked.target.rsplit("_", 1)[0]
                                              if checked.target.endswith("_1") else checked.target))
        comparison = node.args[0] if node.target is torch._assert else None
        graph.erase_node(node)
        if comparison is not None:
            graph.erase_node(comparison)


def trace_module(module: nn.Module, fixed: dict[str, Any], inline: frozenset[int] = frozenset(),
                 inlined: list[nn.Module] | None = None) -> fx.Graph:
    """The module's own forward as a graph (children are leaves, except the modules in ``inline``,
    whose code joins the graph; those met are appended to ``inlined``).

    fx evaluates ``self.training`` while tracing, so the forward is traced in both modes and
    must give the same code; otherwise ``TrainingDependent`` is raised.

    Example:
        >>> from qdistill.models.tiny import BasicBlock
        >>> "add = bn2 + x" in trace_module(BasicBlock(4, 4), {}).python_code("self").src
        True
    """
    own = [module] + [child for child in module.modules() if id(child) in inline]  # whose code is traced
    was_training = [part.training for part in own]
    codes, graphs = [], []
    try:
        for mode in (False, True):
            for part in own:  # these modules' own flags only: other children are leaves here
                part.training = mode
            tracer = PrepareTracer(local=True, inline=inline)
            graphs.append(tracer.trace(module, concrete_args=fixed or None))
            _portable_guards(graphs[-1])
            codes.append(graphs[-1].python_code("self").src)
    finally:
        for part, flag in zip(own, was_training, strict=True):
            part.training = flag
    if inlined is not None:
        inlined.extend(tracer.inlined)
    if codes[0] != codes[1]:
        raise TrainingDependent("its forward reads self.training, which a traced graph would freeze", graphs[0])
    return graphs[0]


def _is_tensor(node: fx.Node, known: dict[fx.Node, bool]) -> bool:
    inputs = node.all_input_nodes
    if node.op in ("get_attr", "call_module"):
        return True
    if node.op == "call_method":
        return node.target not in NON_TENSOR_METHODS and bool(inputs) and known.get(inputs[0], False)
    if node.op != "call_function":
        return False
    if node.target is getattr:  # x.shape, x.dtype, x.device
        return False
    if node.target is operator.getitem:
        return known.get(node.args[0], False) if isinstance(node.args[0], fx.Node) else False
    if getattr(node.target, "__module__", None) in TENSOR_MODULES:
        return True
    return any(known.get(arg, False) for arg in inputs)  # operators: tensor if any operand is


def tensor_nodes(graph: fx.Graph, tensor_positions: set[int] | None = None) -> set[fx.Node]:
    """Nodes whose value is a tensor (by op kind; ``x.size(0) + 1`` is not, ``x + y`` is).

    ``tensor_positions``: the positions of the forward parameters known to be tensors (all when None).

    Example:
        >>> graph = fx.symbolic_trace(lambda x: x + x.size(1)).graph
        >>> sorted(node.name for node in tensor_nodes(graph))
        ['add', 'x']
    """
    known: dict[fx.Node, bool] = {}
    parameter_index = 0  # fx names each forward parameter's node op "placeholder"
    for node in graph.nodes:
        if node.op == "placeholder":
            known[node] = tensor_positions is None or parameter_index in tensor_positions
            parameter_index += 1
        else:
            known[node] = _is_tensor(node, known)
    return {node for node, is_tensor in known.items() if is_tensor}


def call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times each module target is called in ``graph``.

    Example:
        >>> from qdistill import models
        >>> call_counts(trace_model(models.create("tiny_resnet")).graph)["layer1.0.relu"]
        2
    """
    counts: dict[str, int] = defaultdict(int)
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] += 1
    return counts


def module_graphs(model: nn.Module, trace: ModelTrace,
                  matters: Callable[[fx.Graph], bool] = lambda graph: True) -> tuple[list, dict[str, str]]:
    """Every custom module traced on its own: ``[(name, module, graph, tensor positions)]``, ``{name: reason}``.

    torch.nn's own modules and qdistill's quantized modules are not traced into; the model itself
    is named ``<model>`` in the reasons. A module called with arguments fx cannot specialise on (a list
    of tensors, as DenseNet's layers are) is traced through as part of its caller's graph instead. A
    module whose forward depends on ``self.training`` is reported only when ``matters`` says its
    (eval-mode) graph holds something to rewrite.

    Example:
        >>> from qdistill import models
        >>> model = models.create("tiny_resnet")
        >>> graphs, problems = module_graphs(model, trace_model(model))
        >>> [name for name, *_ in graphs], problems
        (['', 'layer1.0', 'layer2.0', 'layer3.0'], {})
    """
    plans = {name: module_plan(module, trace) for name, module in model.named_modules()
             if not (isinstance(module, LEAF_TYPES) or is_torch_layer(module))}
    # called with lists of tensors (DenseNet's layers) or in several ways: traced as part of their caller instead
    inline = frozenset(id(model.get_submodule(name)) for name, plan in plans.items()
                       if plan == UNSPECIALISED and trace.graph is not None)
    graphs, problems, inlined = [], {}, []
    for name, plan in plans.items():
        module = model.get_submodule(name)
        if isinstance(plan, str):
            if trace.graph is None or "not called" not in plan:
                problems[name] = plan
            continue
        fixed, tensor_positions = plan
        try:
            graphs.append((name, module, trace_module(module, fixed, inline, inlined), tensor_positions))
        except TrainingDependent as error:
            if matters(error.graph):
                problems[name] = str(error)
        except Exception as error:  # fx raises many types for untraceable Python
            problems[name] = f"torch.fx could not trace its forward ({describe_failure(error)})"
    met = {id(module) for module in inlined}
    problems = {name or "<model>": reason for name, reason in problems.items()
                if not (reason == UNSPECIALISED and id(model.get_submodule(name)) in met)}
    return graphs, problems


def torch_module_notes(model: nn.Module) -> dict[str, str]:
    """torch.nn modules with their own residual code that ``prepare`` does not trace into.

    Example:
        >>> torch_module_notes(nn.Sequential(nn.TransformerEncoderLayer(16, 2)))["0"]  # doctest: +ELLIPSIS
        'TransformerEncoderLayer is a torch.nn module qdistill does not trace into: ...'
    """
    notes = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            notes[name] = (f"{type(module).__name__} is a torch.nn module qdistill does not trace into: its Linear "
                           "layers are quantized, its residual additions stay float")
    return notes


def is_torch_layer(module: nn.Module) -> bool:
    """A module of torch itself (``nn.Conv2d``, ``nn.Sequential``, ...), never rewritten.

    Example:
        >>> from qdistill.models.tiny import TinyResNet
        >>> is_torch_layer(nn.Sequential()), is_torch_layer(TinyResNet())
        (True, False)
    """
    return type(module).__module__.startswith("torch.")


