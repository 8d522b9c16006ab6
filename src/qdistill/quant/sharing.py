"""One activation quantizer per tensor: the consumers of a tensor share its quantizer.

Every quantized op fake-quantizes its own inputs. When one tensor feeds several of them (a
residual block's input feeds ``conv1`` and the ``add``; a normalised sequence feeds the q, k
and v projections), each would quantize it with its own scale, and the exported graph would
hold several ``QuantizeLinear`` on that tensor; ONNX Runtime then cannot fuse the op that made
it (``QLinearAdd``, ``QLinearConv`` need their output to feed exactly one ``QuantizeLinear``).
Here all those inputs ("slots") get one shared ``ActivationQuantizer``, at the widest bit
width among them; its memo makes the repeated calls one Q/DQ pair in the exported graph.

Example:
    >>> from qdistill import models
    >>> from qdistill.quant import prepare
    >>> block = prepare(models.create("tiny_resnet")).layer1[0]       # prepare calls share_quantizers
    >>> block.conv1.input_quantizer is block.add.input1_quantizer     # the block's input feeds both
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdistill.quant.attention import DecomposedMultiheadAttention
from qdistill.quant.modules import (
    QUANTIZED_OPS,
    QuantAdaptiveAvgPool2d,
    QuantAdd,
    QuantAvgPool2d,
    QuantLayerMixin,
    QuantMatMul,
    QuantMul,
    input_slots,
)
from qdistill.quant.quantizer import Quantizer

Slot = tuple[nn.Module, str]  # (module holding the quantizer, attribute name)
# modules whose result link_requantizers ties to the one quantizer it feeds (adds and products: _link_add)
REQUANTIZED = (QuantLayerMixin, QuantAvgPool2d, QuantAdaptiveAvgPool2d)
ATTENTION_INPUTS = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
TRANSPARENT_LEADERS = (nn.Dropout, nn.Identity)  # a Sequential starting with these passes its input on
PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
# identity in evaluation, found by name (no zoo import here): torchvision's and timm's stochastic depth
# (torchvision's MBConv ends in ``stochastic_depth``, which its tracer keeps as one call). The export
# drops them, so the conv before one fuses with the residual add's quantizer, and the student must too.
EVAL_IDENTITY_CLASSES = {"StochasticDepth", "DropPath", "DropBlock2d"}
EVAL_IDENTITY_FUNCTIONS = {"stochastic_depth", "drop_path", "drop_block_2d"}
PASS_FUNCTIONS = {torch.flatten, torch.relu, F.relu, F.relu6, F.max_pool2d, torch.permute, torch.transpose, torch.reshape,
                  torch.squeeze, torch.unsqueeze}
PASS_METHODS = {"flatten", "reshape", "view", "permute", "transpose", "contiguous", "relu", "squeeze", "unsqueeze"}




def _attention_slots(attention: DecomposedMultiheadAttention, position: int | str) -> list[Slot]:
    names = list(ATTENTION_INPUTS)
    argument = names[position] if isinstance(position, int) and position < len(names) else position
    projection = getattr(attention, ATTENTION_INPUTS.get(argument, ""), None)
    if isinstance(projection, QuantLayerMixin) and projection.input_quantizer is not None:
        return [(projection, "input_quantizer")]
    return []


def module_input_slots(module: nn.Module, position: int | str) -> list[Slot]:
    """The quantizer slots that receive ``module``'s input at ``position`` (an index or a keyword).

    Example:
        >>> from qdistill.quant.modules import ActivationQuantizer, QuantAdd
        >>> add = QuantAdd([ActivationQuantizer(8), ActivationQuantizer(8)])
        >>> [(owner is add, attribute) for owner, attribute in module_input_slots(add, 1)]
        [(True, 'input1_quantizer')]
    """
    if isinstance(module, DecomposedMultiheadAttention):
        return _attention_slots(module, position)
    if isinstance(module, nn.Sequential) and position == 0:
        for child in module:  # a Sequential's input goes to its first op that is not a pass-through
            if not isinstance(child, TRANSPARENT_LEADERS):
                return module_input_slots(child, 0)
        return []
    slots = input_slots(module)
    if isinstance(position, int) and position < len(slots) and slots[position] is not None:
        return [(module, slots[position])]
    return []


def passes_on(module: nn.Module) -> bool:
    """``module`` moves its input's values or commutes with quantizing them (in evaluation, which is where a
    layer computes on the codes of the quantizer its result ends in).

    Example:
        >>> passes_on(nn.ReLU()), passes_on(nn.Dropout(0.2)), passes_on(nn.GELU())
        (True, True, False)
    """
    return isinstance(module, PASS_MODULES) or type(module).__name__ in EVAL_IDENTITY_CLASSES


def _passes_on(user: fx.Node, node: fx.Node, namespace: nn.Module) -> bool:
    """``user`` moves ``node``'s values or commutes with quantizing them (ReLU, max pool, flatten, permute)."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_module":
        return passes_on(namespace.get_submodule(user.target))
    return _passing_call(user)


def _passing_call(user: fx.Node) -> bool:
    """A function or method call that passes its first argument's values on (see ``passes_on``)."""
    if user.op == "call_function":
        return user.target in PASS_FUNCTIONS or getattr(user.target, "__name__", "") in EVAL_IDENTITY_FUNCTIONS
    return user.op == "call_method" and user.target in PASS_METHODS


def _positions(user: fx.Node, node: fx.Node) -> list[int | str]:
    """Where ``user`` takes ``node``: argument indices and keyword names."""
    return ([index for index, arg in enumerate(user.args) if arg is node]
            + [key for key, arg in user.kwargs.items() if arg is node])


def _uses(node: fx.Node, namespace: nn.Module) -> list[Slot]:
    """The quantizer slots reading ``node``, directly or through ops that pass it on (one Q in the export)."""
    slots: list[Slot] = []
    for user in node.users:
        if _passes_on(user, node, namespace):
            slots += _uses(user, namespace)
            continue
        if user.op != "call_module":
            continue
        module = namespace.get_submodule(user.target)
        positions = _positions(user, node)
        for position in positions:
            slots += module_input_slots(module, position)
    return slots


class _SlotGroups:
    """Union-find over slots: a slot reached from two tensors joins both tensors' groups."""

    def __init__(self) -> None:
        self.parent: dict[tuple[int, str], tuple[int, str]] = {}
        self.slots: dict[tuple[int, str], Slot] = {}

    def _find(self, key: tuple[int, str]) -> tuple[int, str]:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, slots: list[Slot]) -> None:
        keys = [(id(owner), attribute) for owner, attribute in slots]
        for key, slot in zip(keys, slots, strict=True):
            self.parent.setdefault(key, key)
            self.slots[key] = slot
        for key in keys[1:]:
            self.parent[self._find(key)] = self._find(keys[0])

    def groups(self) -> list[list[Slot]]:
        grouped: dict[tuple[int, str], list[Slot]] = {}
        for key, slot in self.slots.items():
            grouped.setdefault(self._find(key), []).append(slot)
        return list(grouped.values())


def share_quantizers(graph: fx.Graph, namespace: nn.Module, make_quantizer: Callable[[int], Quantizer]) -> int:
    """Give the slots of each tensor in ``graph`` one shared quantizer; returns how many groups were merged.

    ``namespace`` is the module the graph's call targets are relative to (the traced module).

    Example:
        >>> from qdistill.quant.graph import trace_model
        >>> from qdistill.quant.modules import ActivationQuantizer, QuantAdd
        >>> class Doubled(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.add = QuantAdd([ActivationQuantizer(8), ActivationQuantizer(4)])
        ...     def forward(self, x):
        ...         return self.add(x, x)      # one tensor feeds both inputs
        >>> model = Doubled()
        >>> share_quantizers(trace_model(model).graph, model, lambda bits: ActivationQuantizer(bits))
        1
        >>> model.add.input0_quantizer is model.add.input1_quantizer, model.add.act_bits
        (True, 8)
    """
    groups = _SlotGroups()
    for node in graph.nodes:
        slots = _uses(node, namespace)
        if slots:
            groups.join(slots)
    merged = 0
    for slots in groups.groups():
        quantizers = [getattr(owner, attribute) for owner, attribute in slots]
        if len({id(quantizer) for quantizer in quantizers}) < 2:
            continue
        shared = make_quantizer(max(quantizer.bits for quantizer in quantizers))
        for owner, attribute in slots:
            setattr(owner, attribute, shared)
        merged += 1
    return merged


def _reaches_only_quantizers(node: fx.Node, namespace: nn.Module) -> bool:
    """Every use of ``node`` (through ops that move values or commute with quantization) is a quantizer slot."""
    for user in node.users:
        if _passes_on(user, node, namespace):
            if not _reaches_only_quantizers(user, namespace):
                return False
            continue
        if user.op != "call_module":
            return False
        module = namespace.get_submodule(user.target)
        positions = _positions(user, node)
        if not positions or not all(module_input_slots(module, position) for position in positions):
            return False
    return True


def quantize_float_reads(graph: fx.Graph, namespace: nn.Module, make_quantizer: Callable[[int], Quantizer]) -> list[str]:
    """Give each quantized op whose result is read by float code an ``output_quantizer``; names given one.

    ONNX Runtime's QLinearAdd/Concat/Mul/AveragePool write integers and need the scale of their
    result; when its readers are float ops (a concatenation qdistill could not rewrite, a reshape
    then a split, the model's output) nothing else provides that scale. Matrix products are left
    alone: ONNX Runtime runs them as ``MatMulIntegerToFloat`` with a float result (before a softmax).

    Example:
        >>> from qdistill.quant.graph import trace_model
        >>> from qdistill.quant.modules import ActivationQuantizer, QuantAdd
        >>> class AddAtTheEnd(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.add = QuantAdd([ActivationQuantizer(8), ActivationQuantizer(8)])
        ...     def forward(self, x, y):
        ...         return self.add(x, y)        # the model's output: no quantizer reads it
        >>> model = AddAtTheEnd()
        >>> quantize_float_reads(trace_model(model).graph, model, lambda bits: ActivationQuantizer(bits))
        ['add']
    """
    named = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = namespace.get_submodule(node.target)
        if not isinstance(module, QUANTIZED_OPS) or isinstance(module, QuantMatMul) or "output_quantizer" in module._modules:
            continue
        if not _reaches_only_quantizers(node, namespace):
            module.output_quantizer = make_quantizer(module.act_bits)
            named.append(node.target)
    return named


def link_requantizers(graph: fx.Graph, namespace: nn.Module) -> int:
    """Tell each quantized conv/linear/op the one quantizer its result ends in; returns how many were linked.

    The export fuses such a layer with that quantizer into one integer kernel (QLinearConv, QGemm)
    that requantizes its int32 sum with ``s_x * s_w / s_y`` in one rounding. With the link the
    student's integer forward (``QuantLayerMixin.integer_forward``) rounds the same way, so the two
    agree code for code; ops in between (ReLU, max pool, flatten) commute with the rounding. The
    link is a plain attribute, not a submodule: the quantizer stays owned (and saved) where it is.

    A residual add whose sum feeds one quantizer, directly or through a ReLU, becomes QLinearAdd
    in the export; its link lets ``QuantAdd`` compute as that kernel does (``qlinear_add``). A
    product (a squeeze-excite gate) likewise becomes QLinearMul (``QuantMul``, ``qlinear_mul``), and an
    average pool QLinearAveragePool or QLinearGlobalAveragePool (``QuantAvgPool2d``,
    ``QuantAdaptiveAvgPool2d``, ``qlinear_average_pool``), linked as a conv is.

    Example:
        >>> from qdistill import models
        >>> from qdistill.quant import prepare
        >>> student = prepare(models.create("tiny_resnet"))                 # prepare links them
        >>> block = student.layer1[0]
        >>> block.conv1.requantizer is block.conv2.input_quantizer        # conv1 -> ReLU -> conv2
        True
        >>> block.add.requantizer is student.layer2[0].conv1.input_quantizer, block.add.requantizer_after_relu
        (True, True)
    """
    linked = 0
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = namespace.get_submodule(node.target)
        if isinstance(module, (QuantAdd, QuantMul)):
            linked += _link_add(node, module, namespace)
            continue
        if not isinstance(module, REQUANTIZED) or module.input_quantizer is None:
            continue
        quantizers = {id(getattr(owner, attribute)): getattr(owner, attribute) for owner, attribute in _uses(node, namespace)}
        if len(quantizers) == 1 and _reaches_only_quantizers(node, namespace):
            module.__dict__["requantizer"] = next(iter(quantizers.values()))
            linked += 1
    return linked


def _is_relu(user: fx.Node, node: fx.Node, namespace: nn.Module) -> bool:
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_module":
        return isinstance(namespace.get_submodule(user.target), nn.ReLU)
    return (user.op == "call_function" and user.target in (torch.relu, F.relu)) or (
        user.op == "call_method" and user.target == "relu")


def _direct_quantizer(node: fx.Node, namespace: nn.Module) -> Quantizer | None:
    """The one quantizer that every use of ``node`` is an input slot of, or None."""
    quantizers: dict[int, Quantizer] = {}
    for user in node.users:
        if user.op != "call_module":
            return None
        module = namespace.get_submodule(user.target)
        positions = _positions(user, node)
        for position in positions:
            slots = module_input_slots(module, position)
            if not slots:
                return None
            quantizers |= {id(getattr(owner, attribute)): getattr(owner, attribute) for owner, attribute in slots}
    return next(iter(quantizers.values())) if len(quantizers) == 1 else None


def _link_add(node: fx.Node, add: QuantAdd | QuantMul, namespace: nn.Module) -> int:
    """Link ``add`` (or a product) to the quantizer its result feeds when the export fuses them into
    ``QLinearAdd`` (``QLinearMul``): directly, or through one ReLU that ONNX Runtime drops before a uint8
    grid starting at 0."""
    users = list(node.users)
    after_relu = len(users) == 1 and _is_relu(users[0], node, namespace)
    quantizer = _direct_quantizer(users[0] if after_relu else node, namespace)
    if quantizer is None:
        return 0
    add.__dict__["requantizer"], add.__dict__["requantizer_after_relu"] = quantizer, after_relu
    return 1
