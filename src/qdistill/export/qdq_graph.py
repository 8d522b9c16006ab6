"""Rewrite a TorchScript QDQ export into the form ONNX Runtime's CPU provider runs with int8 kernels.

The exporter writes each quantized layer as ``Q -> [Clip] -> DQ -> Conv/Gemm`` on its input, with
the quantizer *inside* the layer, i.e. after the previous layer's ReLU, MaxPool and Flatten.
ONNX Runtime fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` only when the Q sits directly on the
Conv output, and its own Q propagation stops at Flatten, so a layer followed by
``ReLU -> MaxPool -> Flatten`` would run in float. This module moves the Q up to the producing
layer and runs the ops in between on integers, which is exact, not an approximation:

- ``Q`` is monotone, so ``Q(maxpool(y)) == maxpool(Q(y))``; Flatten/Reshape only move values.
- ``Q(relu(y)) == max(Q(y), zero_point)`` and ``Q(clip(y, a, b)) == clamp(Q(y), Q(a), Q(b))``,
  so ReLU (and ReLU6-style Clip) fold into the integer Clip that already holds the low-bit grid.
- That integer Clip goes *after* MaxPool/Flatten (clamping commutes with both): it touches a
  quarter of the values, and it sits between Q and DQ, where it does not block fusion.

Layers whose output feeds no quantizer (the classifier head, a final conv) get an explicit integer
form: ``Gemm`` without its bias (ONNX Runtime's ``QGemm`` with float output) plus a float ``Add``,
and ``ConvInteger -> Cast -> Mul(s_x * s_w) -> Add(bias)`` for convolutions (exact, but ORT's
ConvInteger is several times slower than QLinearConv, so it is only the fallback).
A first conv with ``C_in * kH * kW <= NARROW_K`` (a 3x3 conv on one channel) runs as a float Conv
on its integer codes, bit for bit QLinearConv's result and faster (``_float_code_conv``, docs/deploy.md).
An embedding (``QuantEmbedding``) gathers its int8 rows and dequantizes only those
(``Gather -> Cast -> Mul`` by the gathered row steps), not its whole table on every run
(``_gather_rows_then_dequantize``; the same values bit for bit).
Weights are int8 initializers ``<layer>.weight_quantized``: the trained integers times the
layer's ``weight_int_multiplier`` (see ``qdistill.export.onnx.weight_multiplier``).

Quantized ops without weights (``QuantAdd``, ``QuantCat``, ``QuantAvgPool2d``,
``QuantAdaptiveAvgPool2d``) reach the graph as ``Add``/``Concat``/``AveragePool``/
``GlobalAveragePool`` followed by an ``Identity`` that carries their module name
(``OP_MARKER``); the rewrite removes it, names the op's node after the module and records, in an
``OpInfo``, the integer tensor the op must produce: the output of the one ``QuantizeLinear`` its
result feeds. ONNX Runtime fuses ``DQ -> op -> Q`` into the kernel of ``OP_KERNELS``, which then
writes that tensor.

Example (``qdistill.export.onnx.build_int8_model`` runs the rewrite; its layer table says what was done):
    >>> import json, torch
    >>> from qdistill import models, quant
    >>> from qdistill.export.onnx import build_int8_model
    >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4),
    ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
    >>> table = json.loads(build_int8_model(student, torch.rand(1, 1, 4, 4)).metadata_props[0].value)
    >>> [(layer["name"], layer["form"]) for layer in table]
    [('net.1', "fused with the next layer's QuantizeLinear"), ('net.4', "fused with the next layer's QuantizeLinear"), ('net.7', 'QGemm with float output + bias Add')]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qdistill.export.latency import make_session

LAYER_MARKER = "qdistill_layer"  # attribute our weight DequantizeLinear carries through the exporter
OP_MARKER = "qdistill_op"  # attribute of the Identity written after each quantized op without weights
LOOKUP_MARKER = "qdistill_lookup"  # attributes (name, table) of the Identity an elementwise activation writes
LOOKUP_PREFIX = "qdistill_lookup:"  # node name of a lookup marker until it becomes a Gather (never moved across)
MOVE_PASSES = 4
# a dense first conv with C_in * kH * kW at most this runs as a float Conv on integer codes (_float_code_conv):
# MLAS's int8 GEMM gains nothing at such K (demo CNN's K = 9 first layer: 2136 us int8 vs 342 us float)
NARROW_K = 16
FLOAT_CODE_FORM = "float Conv on integer codes (exact; first layer, K <= 16, faster than QLinearConv) + requantize Mul, QuantizeLinear"
MOVABLE_OPS = {"Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze"}
INTEGER_OPS = {
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "NhwcQLinearConv",
}
# the integer kernels ONNX Runtime (CPU) runs a quantized op without weights as, by ONNX op type
OP_KERNELS = {
    "Add": ("QLinearAdd",),
    "Mul": ("QLinearMul",),
    "Concat": ("QLinearConcat",),
    "AveragePool": ("QLinearAveragePool",),
    "GlobalAveragePool": ("QLinearGlobalAveragePool",),
    "MatMul": ("QLinearMatMul", "MatMulInteger"),
    "Lookup": ("Gather",),
}
# what writes a lookup's codes when it runs as exact float ops (``_float_lookups``): the QuantizeLinear
# after them, or ONNX Runtime's own table kernel for DequantizeLinear -> Sigmoid -> QuantizeLinear
FLOAT_LOOKUP_KERNELS = ("QuantizeLinear", "QLinearSigmoid")


@dataclass
class LayerInfo:
    """Where one quantized layer lives in the rewritten graph.

    Example (``rewrite_for_int8`` fills ``form`` and ``act_input``):
        >>> LayerInfo("net.7", "Gemm", "net.7.weight_quantized", "logits").as_dict()
        {'name': 'net.7', 'op': 'Gemm', 'weight': 'net.7.weight_quantized', 'output': 'logits', 'form': 'float', 'act_input': None}
    """

    name: str
    op: str
    weight: str
    output: str
    form: str = "float"
    act_input: str | None = None  # the integer tensor the layer's input DequantizeLinear reads

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class OpInfo:
    """Where one quantized op without weights (a residual add, a concat, a pool) lives in the graph.

    ``quantized_output`` is the integer tensor the op's integer kernel must write (the output of
    the ``QuantizeLinear`` its result feeds), or None when its result feeds no quantizer.

    Example (``rewrite_for_int8`` fills ``quantized_output``, or ``feeds`` when there is no such tensor):
        >>> OpInfo("layer1.0.add", "Add", "/layer1/layer1.0/add/Add_output_0").as_dict()
        {'name': 'layer1.0.add', 'op': 'Add', 'output': '/layer1/layer1.0/add/Add_output_0', 'quantized_output': None, 'feeds': '', 'form': ''}
    """

    name: str
    op: str
    output: str
    quantized_output: str | None = None
    feeds: str = ""  # what its result feeds when that is not one QuantizeLinear (for the error message)
    form: str = ""  # a lookup computed by exact float ops instead of its Gather: those ops (``_float_lookups``)

    def as_dict(self) -> dict:
        return asdict(self)


class _Index:
    """Producer and consumer maps of a graph: rebuilt after structural changes, or kept current by a
    rewrite that tells it what it added and removed (``add``, ``forget``, ``_bypass``). Building one
    walks every node, so a rewrite that makes one per layer or op is quadratic: 9 of EfficientNet-B4's
    32 export seconds went to that before the lookup and naming passes kept theirs."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            self.add(node)
        self.outputs = {value.name for value in graph.output}

    def add(self, node: onnx.NodeProto) -> None:
        """Index ``node``: the graph's own copy (``graph.node[-1]`` after an append), not the appended one."""
        for name in node.output:
            self.producer[name] = node
        for name in node.input:
            if name:
                self.consumers[name].append(node)

    def forget(self, node: onnx.NodeProto) -> None:
        """Drop a node that left the graph (its readers' entries stay until they are rewired)."""
        for name in node.output:
            if self.producer.get(name) is node:
                del self.producer[name]
        for name in set(node.input):
            if name in self.consumers:
                self.consumers[name] = [user for user in self.consumers[name] if user is not node]


_NAMES: dict[int, tuple[int, str, dict[str, onnx.TensorProto]]] = {}  # id(graph) -> (count, last name, by name)


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers by name; kept between calls (a big graph has thousands) while count and last name stay."""
    count = len(graph.initializer)
    last = graph.initializer[count - 1].name if count else ""
    cached = _NAMES.get(id(graph))
    if cached is None or cached[0] != count or cached[1] != last:
        cached = (count, last, {tensor.name: tensor for tensor in graph.initializer})
        _NAMES.clear()  # one graph is rewritten at a time
        _NAMES[id(graph)] = cached
    return cached[2]


def _array(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_initializers(graph)[name])


def _set_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    tensor = numpy_helper.from_array(np.array(array, order="C"), name)  # keeps 0-d scalars 0-d
    existing = _initializers(graph).get(name)
    if existing is not None:
        existing.CopyFrom(tensor)  # in place: the count, the order and the cache stay valid
        return name
    graph.initializer.append(tensor)
    _NAMES[id(graph)][2][name] = graph.initializer[-1]
    _NAMES[id(graph)] = (len(graph.initializer), name, _NAMES[id(graph)][2])
    return name


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes become named initializers, which the rewrite and ORT both read directly."""
    for node in list(graph.node):
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = numpy_helper.to_array(node.attribute[0].t)
            _set_initializer(graph, node.output[0], tensor)
            graph.node.remove(node)


def _identities_to_initializers(graph: onnx.GraphProto) -> None:
    """Unmarked Identity nodes over initializers become initializers of their own.

    The TorchScript exporter stores identical constants once (all-zero biases, equal scales) and
    reads the copies through ``Identity`` nodes; the rewrite edits constants by name, per layer.
    """
    constants = _initializers(graph)
    for node in list(graph.node):
        if node.op_type == "Identity" and not node.attribute and node.input[0] in constants:
            _set_initializer(graph, node.output[0], numpy_helper.to_array(constants[node.input[0]]))
            graph.node.remove(node)


def _bypass(graph: onnx.GraphProto, node: onnx.NodeProto, replacement: str, index: _Index | None = None) -> None:
    """Remove a single-input node, pointing its consumers at ``replacement``; a current ``index`` names
    the consumers (no walk over the graph) and is kept current."""
    readers = [user for user in index.consumers[node.output[0]] if user is not node] if index is not None else graph.node
    for other in readers:
        for position, name in enumerate(other.input):
            if name == node.output[0]:
                other.input[position] = replacement
    graph.node.remove(node)
    if index is not None:
        index.forget(node)
        index.consumers.pop(node.output[0], None)
        index.consumers[replacement].extend(readers)


def _collect_layers(graph: onnx.GraphProto) -> dict[str, LayerInfo]:
    layers: dict[str, LayerInfo] = {}
    index = _Index(graph)  # kept current by _name_weight
    for node in list(graph.node):
        marker = next((a for a in node.attribute if a.name == LAYER_MARKER), None)
        if node.op_type != "DequantizeLinear" or marker is None:
            continue
        name = marker.s.decode()
        node.attribute.remove(marker)
        layers[name] = _name_weight(graph, node, name, index)
    return layers


def _collect_ops(graph: onnx.GraphProto) -> dict[str, OpInfo]:
    """Remove the op markers; name each marked op's node after its module. Repeated calls get ``#2``, ``#3``."""
    ops: dict[str, OpInfo] = {}
    index = _Index(graph)  # kept current: _bypass updates it, a rename rebuilds it
    for marker in [node for node in graph.node if node.op_type == "Identity"]:
        attribute = next((a for a in marker.attribute if a.name == OP_MARKER), None)
        if attribute is None:
            continue
        name = attribute.s.decode()
        calls = sum(1 for key in ops if key == name or key.startswith(f"{name}#"))
        key = name if not calls else f"{name}#{calls + 1}"
        producer = index.producer.get(marker.input[0])
        if marker.output[0] in index.outputs:  # the op's result is the graph output: it keeps that name
            _rename_tensor(graph, marker.input[0], marker.output[0])
            graph.node.remove(marker)
            index = _Index(graph)  # the rename touched every reader (once: only a graph output)
        else:
            _bypass(graph, marker, marker.input[0], index)
        if producer is not None:
            producer.name = key
        ops[key] = OpInfo(key, producer.op_type if producer is not None else "Identity",
                          producer.output[0] if producer is not None else marker.input[0])
    return ops


def _collect_lookups(graph: onnx.GraphProto) -> dict[str, tuple[onnx.NodeProto, np.ndarray]]:
    """The lookup markers (``QuantElementwise``), their tables read and removed from the attributes."""
    lookups: dict[str, tuple[onnx.NodeProto, np.ndarray]] = {}
    for node in graph.node:
        attributes = {a.name: a for a in node.attribute}
        if node.op_type != "Identity" or f"{LOOKUP_MARKER}_name" not in attributes:
            continue
        name = attributes[f"{LOOKUP_MARKER}_name"].s.decode()
        calls = sum(1 for key in lookups if key == name or key.startswith(f"{name}#"))
        key = name if not calls else f"{name}#{calls + 1}"
        table = numpy_helper.to_array(attributes[f"{LOOKUP_MARKER}_table"].t).astype(np.float32)
        del node.attribute[:]
        node.name = LOOKUP_PREFIX + key
        lookups[key] = (node, table)
    return lookups


def _install_lookups(graph: onnx.GraphProto, lookups: dict[str, tuple[onnx.NodeProto, np.ndarray]],
                     sources: dict[str, list[str]] | None = None) -> dict[str, OpInfo]:
    """Each marker becomes ``Cast(int32) -> Gather(table)`` on the integer input codes (the DQ removed).

    The table is indexed by the code modulo 256 (Gather counts negative indices from the end), so
    signed and unsigned codes need no offset. Its output is float here; ``_integer_lookups`` turns
    it into codes where one QuantizeLinear reads it. ``sources`` receives, per lookup, the input
    DequantizeLinear's inputs (codes, scale, zero point), which ``_float_lookups`` reads.
    """
    infos: dict[str, OpInfo] = {}
    index = _Index(graph)  # kept current below
    for key, (marker, table) in lookups.items():
        dequantize = index.producer.get(marker.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            marker.name = key  # no integer input: it stays an Identity after the float op
            continue
        table_name, codes = f"{key}.lookup_table", f"{key}.lookup_index"
        _set_initializer(graph, table_name, table)
        if sources is not None:
            sources[key] = list(dequantize.input)
        graph.node.append(helper.make_node("Cast", [dequantize.input[0]], [codes], name=f"{key}.lookup_cast",
                                           to=onnx.TensorProto.INT32))
        index.add(graph.node[-1])
        graph.node.append(helper.make_node("Gather", [table_name, codes], [marker.output[0]], name=key, axis=0))
        graph.node.remove(marker)
        index.forget(marker)
        index.add(graph.node[-1])
        if not index.consumers[dequantize.output[0]]:
            graph.node.remove(dequantize)
            index.forget(dequantize)
        infos[key] = OpInfo(key, "Lookup", marker.output[0])
    return infos


def _integer_lookups(graph: onnx.GraphProto, lookups: dict[str, OpInfo], sources: dict[str, list[str]] | None = None) -> None:
    """A table whose output one QuantizeLinear reads holds that quantizer's codes instead (the Q removed).

    The codes are computed as the student's fake quantization computes them: ``round(v * (1 / s)) + z``
    in float32, rounding half to even, clamped to the integer type. ``sources`` (``_install_lookups``)
    gets the removed quantizer's scale and zero point appended.
    """
    index = _Index(graph)  # each lookup's edits touch only its own Gather and QuantizeLinear (kept current)
    for info in lookups.values():
        users = [user for user in index.consumers[info.output] if user.op_type != "Shape"]
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or info.output in index.outputs:
            info.feeds = ", ".join([user.op_type for user in users]) or "the graph output"
            continue
        quantize = users[0]
        scale = np.float32(_array(graph, quantize.input[1]).reshape(()))
        zero_point = _array(graph, quantize.input[2]).reshape(())
        limits = np.iinfo(zero_point.dtype)
        table = _array(graph, f"{info.name}.lookup_table")
        codes = np.rint(table * (np.float32(1.0) / scale)) + np.float32(zero_point)
        _set_initializer(graph, f"{info.name}.lookup_table", np.clip(codes, limits.min, limits.max).astype(zero_point.dtype))
        gather = index.producer[info.output]
        _repoint_shapes(graph, info.output, quantize.output[0], index)
        graph.node.remove(quantize)
        index.forget(quantize)
        index.forget(gather)
        gather.output[0] = quantize.output[0]
        index.add(gather)
        if sources is not None and info.name in sources:
            sources[info.name] += list(quantize.input[1:3])
        info.output = info.quantized_output = quantize.output[0]


# Float forms an integer lookup may take instead of its Gather, fastest first: (name, steps). A step is
# (op, attributes, operands); an operand is "x" (the dequantized input), "v" (the previous step's
# result) or a float constant. ONNX Runtime's Gather copies one byte per index (~11 ns a value); these
# run vectorised, and DequantizeLinear -> Sigmoid -> QuantizeLinear even fuses into QLinearSigmoid.
_HARD = {"alpha": 1.0 / 6.0, "beta": 0.5}
FLOAT_LOOKUP_FORMS = (
    ("HardSigmoid", (("HardSigmoid", _HARD, ("v",)),)),
    ("Sigmoid", (("Sigmoid", {}, ("v",)),)),
    # one node with one DequantizeLinear before it; the two-node form below gets a DequantizeLinear per reader
    # (ONNX Runtime duplicates it for the Mul): 19 nodes fewer on MobileNetV3-Small (needs opset 14, FORM_OPSETS)
    ("HardSwish", (("HardSwish", {}, ("v",)),)),
    ("HardSigmoid, Mul (hardswish)", (("HardSigmoid", _HARD, ("v",)), ("Mul", {}, ("x", "v")))),
    ("Sigmoid, Mul (SiLU)", (("Sigmoid", {}, ("v",)), ("Mul", {}, ("x", "v")))),
    # PyTorch's own formulas, op for op: min(max(x + 3, 0), 6) / 6 and x * min(max(x + 3, 0), 6) / 6
    ("Add, Clip, Div (hardsigmoid as PyTorch computes it)",
     (("Add", {}, ("v", 3.0)), ("Clip", {}, ("v", 0.0, 6.0)), ("Div", {}, ("v", 6.0)))),
    ("Add, Clip, Mul, Div (hardswish as PyTorch computes it)",
     (("Add", {}, ("v", 3.0)), ("Clip", {}, ("v", 0.0, 6.0)), ("Mul", {}, ("x", "v")), ("Div", {}, ("v", 6.0)))),
)
FORM_OPSETS = {"HardSwish": 14}  # ops newer than the export's opset 13: a model that uses one gets opset 14
FLOAT_LOOKUP_LEVELS = ("basic", "extended", "all")  # float ops, QDQ fusions, NHWC layout: each must give the table
FLOAT_LOOKUP_CHUNK = 7  # the codes are also run in pieces this short, so that the ops' scalar tail code is checked


def _form_nodes(form: tuple, x: str, prefix: str) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], str]:
    """The nodes of one ``FLOAT_LOOKUP_FORMS`` entry on float ``x``, their constants, and the result's name."""
    nodes, constants, value = [], {}, x
    for position, (op, attributes, operands) in enumerate(form):
        inputs = []
        for slot, operand in enumerate(operands):
            if isinstance(operand, float):
                name = f"{prefix}.constant_{position}_{slot}"
                constants[name] = np.array(operand, np.float32)
                inputs.append(name)
            else:
                inputs.append(x if operand == "x" else value)
        output = f"{prefix}.float_{position}"
        nodes.append(helper.make_node(op, inputs, [output], name=f"{prefix}.{op.lower()}_{position}", **attributes))
        value = output
    return nodes, constants, value


def _lookup_codes(graph: onnx.GraphProto, codes: str, dtype: np.dtype, index: _Index | None = None) -> np.ndarray:
    """The input codes a lookup can see: the integer type, narrowed by an integer Clip that writes them."""
    limits = np.iinfo(dtype)
    low, high = int(limits.min), int(limits.max)
    producer = (index or _Index(graph)).producer.get(codes)
    if producer is not None and producer.op_type == "Clip" and all(name in _initializers(graph) for name in producer.input[1:3]):
        low = max(low, int(_array(graph, producer.input[1])))
        high = min(high, int(_array(graph, producer.input[2])))
    return np.arange(low, high + 1).astype(dtype)


def _exact_forms(graph: onnx.GraphProto, lookups: dict[str, tuple[list[str], np.ndarray, np.ndarray]],
                 form: tuple) -> set[str]:
    """The lookups for which ``DequantizeLinear -> form -> QuantizeLinear`` in ONNX Runtime gives the table's
    codes on every input code, at every level of ``FLOAT_LOOKUP_LEVELS``, whole and in short pieces."""
    inputs, outputs, nodes, initializers = [], [], [], []
    for position, (source, codes, _) in enumerate(lookups.values()):
        names = [f"k{position}.{part}" for part in ("codes", "scale", "zero", "out_scale", "out_zero")]
        for name, original in zip(names[1:], source[1:], strict=True):
            initializers.append(numpy_helper.from_array(_array(graph, original).reshape(()), name))
        inputs.append(helper.make_tensor_value_info(names[0], helper.np_dtype_to_tensor_dtype(codes.dtype), ["n"]))
        nodes.append(helper.make_node("DequantizeLinear", names[:3], [f"k{position}.x"]))
        form_nodes, constants, value = _form_nodes(form, f"k{position}.x", f"k{position}")
        nodes += form_nodes
        initializers += [numpy_helper.from_array(array, name) for name, array in constants.items()]
        nodes.append(helper.make_node("QuantizeLinear", [value, *names[3:]], [f"k{position}.y"]))
        out_type = helper.np_dtype_to_tensor_dtype(_array(graph, source[4]).dtype)
        outputs.append(helper.make_tensor_value_info(f"k{position}.y", out_type, ["n"]))
    model = helper.make_model(helper.make_graph(nodes, "lookup_check", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", _form_opset(form))])
    exact = set(lookups)
    for level in FLOAT_LOOKUP_LEVELS:
        session = make_session(model.SerializeToString(), threads=1, level=level)
        count = max(len(codes) for _, codes, _ in lookups.values())
        for start, stop in [(0, count)] + [(s, s + FLOAT_LOOKUP_CHUNK) for s in range(0, count, FLOAT_LOOKUP_CHUNK)]:
            feed = {f"k{p}.codes": codes[start % len(codes):stop] if start < len(codes) else codes[:1]
                    for p, (_, codes, _) in enumerate(lookups.values())}
            results = session.run(None, feed)
            for position, (key, (_, _, table)) in enumerate(lookups.items()):
                piece = feed[f"k{position}.codes"]
                if not np.array_equal(results[position].astype(np.int64), table[piece.astype(np.int64) % 256].astype(np.int64)):
                    exact.discard(key)
    return exact


def _form_opset(form: tuple, opset: int = 13) -> int:
    """The opset a ``FLOAT_LOOKUP_FORMS`` entry's ops need (at least ``opset``)."""
    return max([opset] + [FORM_OPSETS.get(op, opset) for op, _, _ in form])


def _float_lookups(graph: onnx.GraphProto, lookups: dict[str, OpInfo], sources: dict[str, list[str]]) -> int:
    """An integer lookup that ONNX Runtime's own float ops reproduce exactly runs as those ops.

    ``Cast -> Gather(table)`` becomes ``DequantizeLinear -> form -> QuantizeLinear`` with the first
    ``FLOAT_LOOKUP_FORMS`` entry that gives the table's codes on every input code the lookup can
    see (checked here in ONNX Runtime, ``_exact_forms``). Same values, so the student's outputs stay
    exact; the Gather stays where no form is exact. Why: the Gathers took half of MobileNetV3-Small's
    int8 time (docs/deploy.md). Returns the opset the forms used need (13 when none needs more).
    """
    opset = 13
    pending = {}
    index = _Index(graph)  # built once: each lookup's edits below touch only its own Cast and Gather
    for key, info in lookups.items():
        source = sources.get(key, [])
        if info.quantized_output is None or len(source) != 5:
            continue
        table = _array(graph, f"{key}.lookup_table")
        pending[key] = (source, _lookup_codes(graph, source[0], _array(graph, source[2]).dtype, index), table)
    for name, form in FLOAT_LOOKUP_FORMS:
        if not pending:
            break
        for key in _exact_forms(graph, pending, form):
            opset = _form_opset(form, opset)
            source = pending.pop(key)[0]
            gather = index.producer[lookups[key].output]
            graph.node.remove(index.producer[gather.input[1]])  # the Cast to indices
            graph.node.remove(gather)
            nodes, constants, value = _form_nodes(form, f"{key}.dequantized", key)
            for constant, array in constants.items():
                _set_initializer(graph, constant, array)
            graph.node.append(helper.make_node("DequantizeLinear", source[:3], [f"{key}.dequantized"], name=f"{key}.dequantize"))
            graph.node.extend(nodes)
            graph.node.append(helper.make_node("QuantizeLinear", [value, *source[3:]], [lookups[key].output], name=key))
            lookups[key].form = f"exact float {name}"
    return opset


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]


def _op_quantized_outputs(graph: onnx.GraphProto, ops: dict[str, OpInfo]) -> None:
    """After the Qs moved: the integer tensor each op's result is quantized to, if one Q reads it."""
    index = _Index(graph)
    for info in ops.values():
        users = [user for user in index.consumers[info.output] if user.op_type != "Shape"]
        if len(users) == 1 and users[0].op_type == "QuantizeLinear" and info.output not in index.outputs:
            info.quantized_output = users[0].output[0]
        else:
            graph_output = ["the graph output"] if info.output in index.outputs else []
            info.feeds = ", ".join([user.op_type for user in users] + graph_output)


def _name_weight(graph: onnx.GraphProto, dequantize: onnx.NodeProto, name: str, index: _Index | None = None) -> LayerInfo:
    """Give the weight's initializers the layer's name, folding a Transpose (MatMul form of Linear).

    ``index``, when given, is current and stays so (each weight's edits touch only its own nodes)."""
    index = index or _Index(graph)
    ints, scale, zero_point = (_array(graph, value) for value in dequantize.input)
    axis = _attribute(dequantize, "axis", 1) if scale.ndim else None
    users = list(index.consumers[dequantize.output[0]])
    if len(users) == 1 and users[0].op_type == "Transpose":
        perm = list(_attribute(users[0], "perm", range(ints.ndim)[::-1]))
        ints = ints.transpose(perm)
        axis = perm.index(axis) if axis is not None else None
        _bypass(graph, users[0], dequantize.output[0], index)
        users = list(index.consumers[dequantize.output[0]])
    inputs = [f"{name}.weight_quantized", f"{name}.weight_scale", f"{name}.weight_zero_point"]
    for value_name, array in zip(inputs, (ints, scale, zero_point), strict=True):
        _set_initializer(graph, value_name, array)
    dequantize.input[:] = inputs
    dequantize.name = f"{name}.weight_dequantize"
    del dequantize.attribute[:]
    if axis is not None:
        dequantize.attribute.append(helper.make_attribute("axis", axis))
    layer_node = users[0] if len(users) == 1 else None
    op = layer_node.op_type if layer_node is not None else "shared"
    output = layer_node.output[0] if layer_node is not None else dequantize.output[0]
    if layer_node is not None:
        layer_node.name = name
    return LayerInfo(name, op, inputs[0], output)


def _layer_input_dequantize(graph: onnx.GraphProto, info: LayerInfo, index: _Index | None = None) -> onnx.NodeProto | None:
    """The DequantizeLinear on a Conv/Gemm/MatMul layer's data input, or None."""
    index = index or _Index(graph)
    layer_node = index.producer.get(info.output)
    if layer_node is None or info.op not in ("Conv", "Gemm", "MatMul"):
        return None
    dequantize = index.producer.get(layer_node.input[0])
    return dequantize if dequantize is not None and dequantize.op_type == "DequantizeLinear" else None


def _activation_quantizes(graph: onnx.GraphProto) -> list[str]:
    """Output names of the QuantizeLinear nodes on activations (not on constants)."""
    constants = set(_initializers(graph))
    return [node.output[0] for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in constants]


def _group(graph: onnx.GraphProto, quantized: str, index: _Index | None = None):
    """``(Q, Clip or None, [DQ, ...])`` of one activation quantizer, or None for other patterns."""
    index = index or _Index(graph)
    quantize = index.producer.get(quantized)
    if quantize is None:  # removed: a twin took over its readers
        return None
    users = index.consumers[quantized]
    clip = users[0] if len(users) == 1 and users[0].op_type == "Clip" else None
    if clip is not None:
        users = index.consumers[clip.output[0]]
    # readers: DequantizeLinear, or an integer copy of a max pool/reshape a twin Q handed over
    if not users or not all(_reads_integers(user) for user in users) or quantized in index.outputs:
        return None
    return quantize, clip, users


def _reads_integers(node: onnx.NodeProto) -> bool:
    return node.op_type == "DequantizeLinear" or (node.op_type in MOVABLE_OPS and node.name.endswith("_quantized"))


def _grid_bounds(graph: onnx.GraphProto, clip: onnx.NodeProto | None, dtype: np.dtype) -> tuple[int, int]:
    if clip is not None:
        return int(_array(graph, clip.input[1]).reshape(())), int(_array(graph, clip.input[2]).reshape(()))
    limits = np.iinfo(dtype)
    return int(limits.min), int(limits.max)


def _name_activation(graph: onnx.GraphProto, prefix: str, group) -> tuple[float, int, int, int, np.dtype]:
    """Names under ``prefix`` for the quantizer's constants; returns scale, zero point, bounds, dtype."""
    quantize, clip, dequantizes = group
    # per-tensor parameters as true scalars (the exporter writes some as 1-element vectors)
    scale = _array(graph, quantize.input[1]).reshape(())
    zero_point = _array(graph, quantize.input[2]).reshape(())
    low, high = _grid_bounds(graph, clip, zero_point.dtype)
    _set_initializer(graph, f"{prefix}_scale", scale)
    _set_initializer(graph, f"{prefix}_zero_point", zero_point)
    dequantizes = [node for node in dequantizes if node.op_type == "DequantizeLinear"]
    for node in (quantize, *dequantizes):
        node.input[1:3] = [f"{prefix}_scale", f"{prefix}_zero_point"]
    quantize.name = f"{prefix}_quantize"
    for position, node in enumerate(dequantizes):
        node.name = f"{prefix}_dequantize" + (f"_{position}" if position else "")
    if clip is not None:
        _bypass(graph, clip, quantize.output[0])  # re-added after the moved ops by _move_quantize_up
    return float(scale), int(zero_point), low, high, zero_point.dtype


def _quantize_value(value: float, scale: float, zero_point: int, dtype: np.dtype) -> int:
    """QuantizeLinear of one float (round half to even, saturate), as ONNX Runtime computes it."""
    limits = np.iinfo(dtype)
    code = np.rint(np.float32(value) / np.float32(scale)) + zero_point
    return int(np.clip(code, limits.min, limits.max))


def _movable_chain(graph: onnx.GraphProto, start: str, index: _Index | None = None) -> list[onnx.NodeProto]:
    """Ops between a producer and ``start`` that commute with quantization, nearest first."""
    index = index or _Index(graph)
    chain: list[onnx.NodeProto] = []
    tensor = start
    while True:
        node = index.producer.get(tensor)
        users = [user for user in index.consumers[tensor] if user.op_type != "Shape"]
        if (node is None or node.op_type not in MOVABLE_OPS or node.name.startswith(LOOKUP_PREFIX)
                or len(users) != 1 or tensor in index.outputs):
            return chain
        if node.op_type == "Clip" and not all(name in _initializers(graph) for name in node.input[1:3]):
            return chain
        if node.op_type == "MaxPool" and len(node.output) > 1 and index.consumers[node.output[1]]:
            return chain
        chain.append(node)
        tensor = node.input[0]


def _twin(graph: onnx.GraphProto, quantize: onnx.NodeProto, tensor: str, index: _Index) -> onnx.NodeProto | None:
    """Another QuantizeLinear reading ``tensor`` with the same scale and zero point as ``quantize``."""
    constants = _initializers(graph)

    def values(node):
        return [numpy_helper.to_array(constants[name]).tobytes() if name in constants else name for name in node.input[1:]]

    for user in index.consumers[tensor]:
        if user is not quantize and user.op_type == "QuantizeLinear" and values(user) == values(quantize):
            return user
    return None


def _move_quantize_up(graph: onnx.GraphProto, quantized: str, prefix: str) -> bool:
    """Put a Q right after the op producing its input and run the ops in between on integers; True if it moved.

    Where the ops in between start at a tensor that an identical Q already reads (one shared
    quantizer, reached directly and through a max pool), they run on that Q's integers instead.
    """
    index = _Index(graph)  # built once: the edits below do not change what the lookups read
    group = _group(graph, quantized, index)
    if group is None:
        return False
    quantize, _, dequantizes = group
    scale, zero_point, low, high, dtype = _name_activation(graph, prefix, group)
    chain = _movable_chain(graph, quantize.input[0], index)
    top = chain[-1].input[0] if chain else quantize.input[0]
    twin = _twin(graph, quantize, top, index) if chain else None
    integer = quantize.output[0]
    if twin is not None:
        integer = twin.output[0]
        graph.node.remove(quantize)
    elif chain:
        quantize.input[0] = top
    for node in reversed(chain):  # farthest first, so the integer ops keep the original order
        if node.op_type == "Relu":
            low = max(low, zero_point)
        elif node.op_type == "Clip":
            bounds = [float(_array(graph, name).reshape(())) for name in node.input[1:3]]
            low = max(low, _quantize_value(bounds[0], scale, zero_point, dtype))
            high = min(high, _quantize_value(bounds[1], scale, zero_point, dtype))
        if node.op_type in ("Relu", "Clip"):
            _repoint_shapes(graph, node.output[0], integer, index)  # absorbed: nothing to copy
        else:
            integer = _integer_copy(graph, node, integer, index)
        graph.node.remove(node)
    limits = np.iinfo(dtype)
    if (low, high) != (limits.min, limits.max):
        bound_names = [f"{prefix}_qmin", f"{prefix}_qmax"]
        _set_initializer(graph, bound_names[0], np.array(low, dtype=dtype))
        _set_initializer(graph, bound_names[1], np.array(high, dtype=dtype))
        graph.node.append(helper.make_node("Clip", [integer, *bound_names], [f"{prefix}_clipped"], name=f"{prefix}_clip"))
        integer = f"{prefix}_clipped"
    for node in dequantizes:
        node.input[0] = integer
    return twin is not None


def _move_all_quantizes(graph: onnx.GraphProto, layers: dict[str, LayerInfo]) -> None:
    """Every activation Q moves up; a layer's input quantizer is named ``<layer>.input``."""
    prefixes: dict[str, str] = {}
    index = _Index(graph)
    for info in layers.values():
        dequantize = _layer_input_dequantize(graph, info, index)
        producer = index.producer.get(dequantize.input[0]) if dequantize is not None else None
        if producer is not None and producer.op_type == "Clip":
            producer = index.producer.get(producer.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            prefixes.setdefault(producer.output[0], f"{info.name}.input")
    quantizes = {node.output[0]: node for node in graph.node if node.op_type == "QuantizeLinear"}
    twins = False
    for quantized in _activation_quantizes(graph):
        node = quantizes[quantized]
        fallback = node.name.strip("/").replace("/", ".").removesuffix(".QuantizeLinear") or quantized
        twins |= _move_quantize_up(graph, quantized, prefixes.get(quantized, fallback))
    # a Q whose twin took over its max pool may now move further up (MOVE_PASSES bounds the rounds)
    for _ in range(MOVE_PASSES if twins else 0):
        quantizes = {node.output[0]: node for node in graph.node if node.op_type == "QuantizeLinear"}
        for quantized in _activation_quantizes(graph):
            if quantized in quantizes:
                _move_quantize_up(graph, quantized, quantizes[quantized].input[1].removesuffix("_scale"))
    _merge_twin_quantizes(graph)
    index = _Index(graph)
    for info in layers.values():
        dequantize = _layer_input_dequantize(graph, info, index)
        info.act_input = dequantize.input[0] if dequantize is not None else None


def _merge_twin_quantizes(graph: onnx.GraphProto) -> bool:
    """QuantizeLinear nodes reading one tensor with the same scale and zero point become one.

    A quantizer shared by a tensor's readers and by the readers of its max-pooled copy moves up to
    the same tensor twice; its producer fuses with one QuantizeLinear only.
    """
    seen: dict[tuple, str] = {}
    merged = False
    constants = _initializers(graph)
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        key = (node.input[0], *(numpy_helper.to_array(constants[name]).tobytes() if name in constants else name
                                for name in node.input[1:]))
        if key not in seen:
            seen[key] = node.output[0]
            continue
        _rename_tensor(graph, node.output[0], seen[key])
        graph.node.remove(node)
        merged = True
    return merged


def _repoint_shapes(graph: onnx.GraphProto, float_tensor: str, integer_tensor: str, index: _Index | None = None) -> None:
    """Shape ops (``x.view(x.size(0), -1)``) read the integer twin, which has the same shape."""
    for user in (index or _Index(graph)).consumers[float_tensor]:
        if user.op_type == "Shape":
            user.input[0] = integer_tensor


def _integer_copy(graph: onnx.GraphProto, node: onnx.NodeProto, integer_input: str, index: _Index | None = None) -> str:
    """The same op (MaxPool, Flatten, Reshape, Identity) on the integer tensor."""
    output = f"{node.output[0]}_quantized"
    copy = helper.make_node(node.op_type, [integer_input, *node.input[1:]], [output], name=f"{node.name}_quantized")
    copy.attribute.extend(node.attribute)
    graph.node.append(copy)
    _repoint_shapes(graph, node.output[0], output, index)
    return output


def _integer_output_form(graph: onnx.GraphProto, info: LayerInfo, index: _Index | None = None) -> None:
    """Choose how ORT runs the layer in integers: fused with the next Q, or an explicit integer op.

    ``index`` may be shared by the calls for all layers: each edits only its own layer's nodes."""
    index = index or _Index(graph)
    node = index.producer.get(info.output)
    if node is None or info.op not in ("Conv", "Gemm") or info.act_input is None:
        info.form = "lookup" if info.op == "Gather" else "float"
        if info.op == "Gather" and node is not None:
            _gather_rows_then_dequantize(graph, node, info, index)
        return
    users = index.consumers[info.output]
    if len(users) == 1 and users[0].op_type == "QuantizeLinear" and info.output not in index.outputs:
        info.form = "fused with the next layer's QuantizeLinear"
        if info.op == "Conv":
            _quantize_conv_bias(graph, node, info, index)
            if _narrow_conv(graph, node, info, index):
                _float_code_conv(graph, node, users[0], info, index)
        return
    if info.op == "Gemm":
        _split_gemm_bias(graph, node, info)
    else:
        _conv_integer(graph, node, info, index)


def _gather_rows_then_dequantize(graph: onnx.GraphProto, node: onnx.NodeProto, info: LayerInfo, index: _Index) -> bool:
    """An embedding lookup reads its int8 rows first and dequantizes only those, not the whole table per run.

    ``DequantizeLinear(W_q, s, 0, axis=0) -> Gather(ids)`` becomes ``Gather(W_q, ids) -> Cast(float) ->
    Mul(Gather(s[:, None], ids))``: the same product ``float(q) * s`` per value as DequantizeLinear's
    (symmetric codes, so no zero point to subtract), so bit for bit the same rows. Why: the exported form
    dequantized all of all-MiniLM-L6-v2's 30522 x 384 word table on every run, 5.3 ms of a 288 ms run at
    batch 32 x 128 tokens on one thread and 11.1 ms on two (ONNX Runtime profiler), and most of a
    batch-1 run. Only the plain form is rewritten: per-row or per-tensor scales, zero points all zero,
    the table read by this one Gather on axis 0; any other stays as exported.
    """
    dequantize = index.producer.get(node.input[0])
    constants = _initializers(graph)
    if (dequantize is None or dequantize.op_type != "DequantizeLinear" or _attribute(node, "axis", 0) != 0
            or len(index.consumers[dequantize.output[0]]) != 1 or dequantize.output[0] in index.outputs
            or any(name not in constants for name in dequantize.input if name)):
        return False
    table, scale = _array(graph, dequantize.input[0]), _array(graph, dequantize.input[1]).astype(np.float32)
    zero = _array(graph, dequantize.input[2]) if len(dequantize.input) > 2 and dequantize.input[2] else np.zeros(1)
    per_row = scale.ndim == 1 and _attribute(dequantize, "axis", 1) in (0, -table.ndim) and len(scale) == len(table)
    if table.ndim != 2 or np.any(zero) or not (scale.size == 1 or per_row):
        return False
    name, ids = info.name, node.input[1]
    rows = helper.make_node("Gather", [dequantize.input[0], ids], [f"{name}.rows_quantized"], name=name, axis=0)
    cast = helper.make_node("Cast", [rows.output[0]], [f"{name}.rows_float"], name=f"{name}.rows_cast",
                            to=onnx.TensorProto.FLOAT)
    if per_row:  # each row's own step, gathered beside it: shape (..., 1) broadcasts over the row
        scales = _set_initializer(graph, f"{name}.weight_scale_rows", scale.reshape(-1, 1))
        steps = [helper.make_node("Gather", [scales, ids], [f"{name}.row_steps"], name=f"{name}.row_steps", axis=0)]
        step = steps[0].output[0]
    else:
        steps, step = [], _set_initializer(graph, f"{name}.weight_step", scale.reshape(()))
    mul = helper.make_node("Mul", [cast.output[0], step], [node.output[0]], name=f"{name}.rows_dequantize")
    nodes = list(graph.node)  # the new nodes take the table's place: graph order is the diagnosis' order
    position = min(nodes.index(node), nodes.index(dequantize))
    for old in (node, dequantize):
        index.forget(old)
        graph.node.remove(old)
    for offset, new in enumerate((rows, cast, *steps, mul)):
        graph.node.insert(position + offset, new)
        index.add(graph.node[position + offset])
    return True


def _quantize_conv_bias(graph: onnx.GraphProto, node: onnx.NodeProto,
                        info: LayerInfo, index: _Index) -> None:
    """Give QLinearConv the student's int32 bias: ``round(bias / (s_x * s_w))`` in float32, per channel.

    ORT adds the bias as an integer in units of ``s_x * s_w`` and requantizes ``acc * M`` with
    ``M = s_x * s_w / s_y``; the student's evaluation forward (``QuantLayerMixin.integer_forward``)
    adds exactly these codes, computed with the same float32 division, so the two agree code for
    code. (Choosing the integer by how a float forward would round an all-zero window instead
    disagreed with the integer forward wherever the two roundings differ: DenseNet-201, one channel.)
    """
    if len(node.input) < 3 or node.input[2] not in _initializers(graph):
        return
    chosen, grid = _bias_codes(graph, node, info, index)
    names = [f"{info.name}.bias_quantized", f"{info.name}.bias_scale", f"{info.name}.bias_zero_point"]
    for name, array in zip(names, (chosen, grid, np.zeros(len(chosen), np.int32)), strict=True):
        _set_initializer(graph, name, array)
    output = f"{info.name}.bias_dequantized"
    graph.node.append(helper.make_node("DequantizeLinear", names, [output], name=f"{info.name}.bias_dequantize", axis=0))
    node.input[2] = output


def _bias_codes(graph: onnx.GraphProto, node: onnx.NodeProto, info: LayerInfo, index: _Index
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(int32 codes, grid)`` of a layer's float bias on its grid ``s_x * s_w``, as the student's integer
    forward rounds it: ``torch.round(bias / step)``, a float32 division rounded half to even."""
    input_scale = np.float32(_array(graph, index.producer[node.input[0]].input[1]).reshape(()))
    bias = _array(graph, node.input[2]).astype(np.float32)
    grid = (input_scale * _array(graph, f"{info.name}.weight_scale").astype(np.float32)) * np.ones_like(bias)
    return np.rint(bias / grid).astype(np.int32), grid


def _narrow_conv(graph: onnx.GraphProto, node: onnx.NodeProto, info: LayerInfo, index: _Index) -> bool:
    """A dense first conv (on the graph input) with ``K = C_in * kH * kW <= NARROW_K`` whose integer sums float32 holds exactly.

    ``|sum| <= max|x_q - z_x| * max_c sum|w_c| + max|bias|`` must stay below 2^24, the integers
    float32 represents exactly; then a float Conv on the codes gives QLinearConv's int32 sums.
    """
    weight = _array(graph, info.weight)
    dequantize = index.producer.get(node.input[0])
    constants = _initializers(graph)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if (_attribute(node, "group", 1) != 1 or int(np.prod(weight.shape[1:])) > NARROW_K or dequantize is None
            or dequantize.op_type != "DequantizeLinear" or len(dequantize.input) < 3
            or not _reads_graph_input(graph, dequantize.input[0], index)
            or any(name not in constants or _array(graph, name).size != 1 for name in dequantize.input[1:])
            or f"{info.name}.weight_zero_point" not in constants or np.any(_array(graph, f"{info.name}.weight_zero_point"))
            or (has_bias and node.input[2] != f"{info.name}.bias_dequantized")):  # set by _quantize_conv_bias
        return False  # only the plain form: per-tensor input codes, symmetric weights, an int32 bias (or none)
    return _sum_bound(graph, dequantize, info, has_bias) < 2**24


def _sum_bound(graph: onnx.GraphProto, dequantize: onnx.NodeProto, info: LayerInfo, has_bias: bool) -> int:
    """The largest ``|int32 sum|`` a conv on the codes ``dequantize`` reads can reach (any input)."""
    weight = _array(graph, info.weight).astype(np.int64)
    zero = int(_array(graph, dequantize.input[2]))
    grid = np.iinfo(_array(graph, dequantize.input[2]).dtype)
    bias = np.abs(_array(graph, f"{info.name}.bias_quantized").astype(np.int64)).max() if has_bias else 0
    return int(max(abs(grid.min - zero), abs(grid.max - zero)) * np.abs(weight).reshape(len(weight), -1).sum(1).max() + bias)


def _reads_graph_input(graph: onnx.GraphProto, codes: str, index: _Index) -> bool:
    """Whether ``codes`` are the graph input's, quantized (and clipped) at the edge: the first layer.

    Only there was the float form measured faster; inside the NHWC chain of QLinearConv it would add
    a layout change on each side.
    """
    node = index.producer.get(codes)
    if node is not None and node.op_type == "Clip":
        node = index.producer.get(node.input[0])
    inputs = {value.name for value in graph.input}
    return node is not None and node.op_type == "QuantizeLinear" and node.input[0] in inputs


def _float_code_conv(graph: onnx.GraphProto, node: onnx.NodeProto, quantize: onnx.NodeProto,
                     info: LayerInfo, index: _Index) -> None:
    """Run a narrow conv (``_narrow_conv``) as a float Conv on integer codes, requantized exactly.

    ``Cast(x_q) [- z_x] -> Conv(w_q, bias_q) -> [MaxPool] -> Mul(M) -> QuantizeLinear(1, z_y)``
    gives QLinearConv's codes bit for bit: the Conv sums integers exactly in float32 (checked),
    ``M = s_x * s_w / s_y`` is QLinearConv's requantization multiplier in float32, and
    ``QuantizeLinear`` with scale 1 rounds half to even and saturates as QLinearConv does. A
    MaxPool the codes fed moves before the Mul (``max`` commutes with a positive scale and with
    rounding), so the requantization touches a quarter of the values. The multiplier is ``Mul``'s
    first input so that ONNX Runtime does not fold it into the conv weights (which would round).
    Why: with K = 9 (a 3x3 conv on one channel) MLAS's int8 GEMM gains nothing and QLinearConv
    took 2136 us against the float Conv's 342 us on the demo CNN at batch 64 (ORT 1.32, one thread).
    Why a ``Mul`` and a per-tensor QuantizeLinear, not one per-channel QuantizeLinear with scales
    ``1 / M`` (tried, exact where checked): ONNX Runtime runs a per-channel QuantizeLinear one H*W
    block at a time on one thread, and the demo CNN's file at batch 64 with 2 threads ran at
    1.09-1.58x fp32 with it against 1.51-1.71x without (1 thread: 1.91x against 1.84x).
    """
    dequantize = index.producer[node.input[0]]
    name = info.name
    input_scale = np.float32(_array(graph, dequantize.input[1]).reshape(()))
    output_scale = np.float32(_array(graph, quantize.input[1]).reshape(()))
    weight_scale = _array(graph, f"{name}.weight_scale").astype(np.float32)
    multiplier = ((input_scale * weight_scale) / output_scale).astype(np.float32)  # as QLinearConv computes it
    spatial = [1] * (_array(graph, info.weight).ndim - 2)
    codes = f"{name}.input_codes"
    new_nodes = [helper.make_node("Cast", [dequantize.input[0]], [codes if not _array(graph, dequantize.input[2]) else f"{name}.input_cast"],
                                  name=f"{name}.input_cast", to=onnx.TensorProto.FLOAT)]
    if _array(graph, dequantize.input[2]):
        zero = _set_initializer(graph, f"{name}.input_zero_float", _array(graph, dequantize.input[2]).astype(np.float32))
        new_nodes.append(helper.make_node("Sub", [f"{name}.input_cast", zero], [codes], name=f"{name}.input_codes"))
    inputs = [codes, _set_initializer(graph, f"{name}.weight_codes", _array(graph, info.weight).astype(np.float32))]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(_set_initializer(graph, f"{name}.bias_codes", _array(graph, f"{name}.bias_quantized").astype(np.float32)))
    accumulator = f"{name}.accumulator"
    conv = helper.make_node("Conv", inputs, [accumulator], name=name)
    conv.attribute.extend(node.attribute)
    new_nodes.append(conv)
    scaled = accumulator
    users = index.consumers[quantize.output[0]]
    if len(users) == 1 and users[0].op_type == "MaxPool" and len(users[0].output) == 1 and quantize.output[0] not in index.outputs:
        pool = users[0]
        old_codes = quantize.output[0]
        quantize.output[0], pool.input[0], pool.output[0] = pool.output[0], accumulator, f"{name}.pooled"
        for value in [value for value in graph.value_info if value.name == old_codes]:
            graph.value_info.remove(value)
        scaled = pool.output[0]
    multiplier_name = _set_initializer(graph, f"{name}.requantize_multiplier", multiplier.reshape([1, -1, *spatial]))
    new_nodes.append(helper.make_node("Mul", [multiplier_name, scaled], [f"{name}.requantized"], name=f"{name}.requantize"))
    quantize.input[0] = f"{name}.requantized"
    quantize.input[1] = _set_initializer(graph, f"{name}.unit_scale", np.array(1.0, np.float32))
    graph.node.remove(node)
    graph.node.extend(new_nodes)
    info.output, info.weight, info.form = accumulator, f"{name}.weight_codes", FLOAT_CODE_FORM


def float_code_codes(graph: onnx.GraphProto, accumulator: str) -> tuple[str, tuple[np.ndarray, np.ndarray]] | None:
    """For a layer in ``FLOAT_CODE_FORM``: add to ``graph`` the layer's own output codes (its
    requantization applied before the MaxPool that the runtime graph runs first) and return
    ``(tensor, (scale, zero point))``; None for any other layer. For the per-layer diagnosis,
    which compares each layer's codes with the student's; the runtime graph does not need them.
    """
    index = _Index(graph)
    pool = index.consumers.get(accumulator, [None])[0]
    mul = index.consumers.get(pool.output[0], [None])[0] if pool is not None and pool.op_type == "MaxPool" else pool
    if mul is None or mul.op_type != "Mul" or not mul.name.endswith(".requantize"):
        return None
    quantize = index.consumers[mul.output[0]][0]
    after = index.consumers.get(quantize.output[0], [])
    clip = after[0] if len(after) == 1 and after[0].op_type == "Clip" else None
    readers = index.consumers.get(clip.output[0] if clip else quantize.output[0], [])
    scales = [reader.input[1] for reader in readers if reader.op_type == "DequantizeLinear"]
    if not scales:
        return None
    prefix = mul.name[: -len(".requantize")] + ".diagnosis"
    graph.node.append(helper.make_node("Mul", [mul.input[0], accumulator], [f"{prefix}_scaled"], name=f"{prefix}_mul"))
    graph.node.append(helper.make_node("QuantizeLinear", [f"{prefix}_scaled", *quantize.input[1:]], [f"{prefix}_codes"],
                                       name=f"{prefix}_quantize"))
    codes = f"{prefix}_codes"
    if clip is not None:
        graph.node.append(helper.make_node("Clip", [codes, *clip.input[1:]], [f"{prefix}_clipped"], name=f"{prefix}_clip"))
        codes = f"{prefix}_clipped"
    return codes, (_array(graph, scales[0]), _array(graph, quantize.input[2]))


def _split_gemm_bias(graph: onnx.GraphProto, node: onnx.NodeProto, info: LayerInfo) -> None:
    # ORT fuses DQ -> Gemm without a Q into QGemm (float output) only when the bias is absent or
    # int32; a float Add keeps the bias exactly as the student adds it.
    info.form = "QGemm with float output + bias Add"
    if len(node.input) < 3 or not node.input[2]:
        return
    if _attribute(node, "alpha", 1.0) != 1.0 or _attribute(node, "beta", 1.0) != 1.0:
        return
    bias = node.input[2]
    del node.input[2]
    product = f"{info.name}.product"
    output = node.output[0]
    node.output[0] = product
    graph.node.append(helper.make_node("Add", [product, bias], [output], name=f"{info.name}.bias_add"))


def _conv_integer(graph: onnx.GraphProto, node: onnx.NodeProto, info: LayerInfo, index: _Index) -> None:
    # QLinearConv needs a quantized output; without one ORT would run DQ -> Conv in float, so the
    # layer becomes ConvInteger (int32 accumulator), a float rescale by s_x * s_w per channel and the
    # bias (on its int32 grid, as the export copy holds it) added in float: the order of ORT's other
    # float-output kernels (QGemm, MatMulIntegerToFloat), which the student's integer forward follows.
    info.form = "ConvInteger + float rescale"
    dequantize = index.producer[node.input[0]]
    input_scale, input_zero = dequantize.input[1], dequantize.input[2]
    weight_scale = _array(graph, f"{info.name}.weight_scale").astype(np.float32)
    multiplier = (np.float32(_array(graph, input_scale)) * weight_scale).astype(np.float32)
    spatial = _array(graph, info.weight).ndim - 2
    if multiplier.ndim:
        multiplier = multiplier.reshape([1, -1] + [1] * spatial)
    names = {key: f"{info.name}.{key}" for key in ("accumulator", "accumulator_float", "rescaled", "multiplier")}
    _set_initializer(graph, names["multiplier"], multiplier)
    output = node.output[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    integer_conv = helper.make_node("ConvInteger", [dequantize.input[0], info.weight, input_zero],
                                    [names["accumulator"]], name=f"{info.name}.conv_integer")
    integer_conv.attribute.extend(node.attribute)
    new_nodes = [integer_conv,
                 helper.make_node("Cast", [names["accumulator"]], [names["accumulator_float"]], to=onnx.TensorProto.FLOAT),
                 helper.make_node("Mul", [names["accumulator_float"], names["multiplier"]],
                                  [names["rescaled"] if bias else output], name=f"{info.name}.rescale")]
    if bias:
        bias_name = f"{info.name}.bias_channels"
        _set_initializer(graph, bias_name, _array(graph, bias).reshape([1, -1] + [1] * spatial))
        new_nodes.append(helper.make_node("Add", [names["rescaled"], bias_name], [output], name=f"{info.name}.bias_add"))
    graph.node.remove(node)
    graph.node.extend(new_nodes)


def _channels_last_flattens(model: onnx.ModelProto, layers: dict[str, LayerInfo]) -> None:
    """A Gemm layer that reads ``Flatten`` of a 4-D integer tensor reads it flattened in NHWC order.

    ``X -> Flatten -> [Clip] -> DQ -> Gemm`` becomes ``X -> Transpose(0,2,3,1) -> Flatten -> ...``
    with the Gemm's weight columns permuted the same way: the same products summed in another
    order, and integer sums do not depend on the order, so the result is exact. Why: ONNX
    Runtime runs the QLinearConv chain in NHWC and ends it with a Transpose back to NCHW before the
    Flatten; that Transpose and this one cancel, so the graph has one node (a single-threaded one)
    fewer (demo CNN; docs/deploy.md).
    """
    graph = model.graph
    index = _Index(graph)
    shapes = None
    for info in layers.values():
        node = index.producer.get(info.output)
        if info.op != "Gemm" or node is None or node.op_type != "Gemm" or info.act_input is None:
            continue
        dequantize = _layer_input_dequantize(graph, info, index)
        flatten = index.producer.get(info.act_input)
        if flatten is not None and flatten.op_type == "Clip":
            flatten = index.producer.get(flatten.input[0])
        if (dequantize is None or flatten is None or flatten.op_type != "Flatten" or _attribute(flatten, "axis", 1) != 1
                or len(index.consumers[flatten.output[0]]) != 1 or len(index.consumers[dequantize.output[0]]) != 1):
            continue
        if shapes is None:  # inferred afresh, in node order: value_info the rewrite carried along may lack shapes
            bare = onnx.ModelProto.FromString(model.SerializeToString())
            del bare.graph.value_info[:]
            toposort(bare.graph)
            inferred = onnx.shape_inference.infer_shapes(bare)
            shapes = {value.name: value.type.tensor_type.shape for value in inferred.graph.value_info}
        shape = shapes.get(flatten.input[0])
        dims = [dim.dim_value if dim.HasField("dim_value") else 0 for dim in shape.dim] if shape is not None else []
        weight = _array(graph, info.weight)
        transposed = _attribute(node, "transB", 0) == 1
        if len(dims) != 4 or not all(dims[1:]) or weight.shape[1 if transposed else 0] != int(np.prod(dims[1:])):
            continue
        order = np.arange(int(np.prod(dims[1:]))).reshape(dims[1:]).transpose(1, 2, 0).reshape(-1)
        _set_initializer(graph, info.weight, weight[:, order] if transposed else weight[order])
        channels_last = f"{flatten.input[0]}_channels_last"
        graph.node.append(helper.make_node("Transpose", [flatten.input[0]], [channels_last], name=f"{info.name}.input_channels_last",
                                           perm=[0, 2, 3, 1]))
        flatten.input[0] = channels_last


MATMUL_BIAS_FORM = "MatMulIntegerToFloat with its bias (float output)"


def _matmul_integer_to_float(graph: onnx.GraphProto, info: LayerInfo, index: _Index) -> bool:
    """A Linear on a 3-D input (``DQ(codes) -> MatMul <- DQ(weight)`` then ``Add(bias)``) as one
    ``com.microsoft.MatMulIntegerToFloat`` that takes the bias; True when rewritten.

    ONNX Runtime fuses the two DequantizeLinear and the MatMul into MatMulIntegerToFloat itself, but leaves
    the bias Add: a separate pass over the whole float result (about a sixth of a transformer's
    time in MatMulIntegerToFloat and Add, measured on MiniLM). The same integer product, scales and bias,
    so the result is the one ONNX Runtime computed before.
    """
    node = index.producer.get(info.output)
    users = index.consumers.get(info.output, [])
    if node is None or node.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "Add" \
            or info.output in index.outputs:
        return False
    add = users[0]
    bias = next((name for name in add.input if name != info.output), None)
    weights = _initializers(graph)
    act, weight = (index.producer.get(name) for name in node.input)
    if bias not in weights or len(weights[bias].dims) != 1 or act is None or weight is None \
            or act.op_type != "DequantizeLinear" or weight.op_type != "DequantizeLinear" or len(act.input) < 3 \
            or len(weight.input) < 3 or not all(name in weights for name in (*act.input[1:3], *weight.input)):
        return False
    if weights[act.input[1]].dims or (weights[weight.input[1]].dims and _attribute(weight, "axis", 1) not in (1, -1)):
        return False  # per-tensor activations; per-column (output channel) weights
    fused = helper.make_node("MatMulIntegerToFloat", [act.input[0], weight.input[0], act.input[1], weight.input[1],
                                                      act.input[2], weight.input[2], bias],
                             [add.output[0]], name=f"{info.name}.matmul_integer", domain="com.microsoft")
    graph.node.remove(node)
    graph.node.remove(add)
    graph.node.append(fused)
    info.form = MATMUL_BIAS_FORM
    info.output = add.output[0]  # the MatMul's own output is gone; this one is the layer's whole result, bias included
    return True


def _fuse_matmul_biases(model_or_graph: onnx.GraphProto, layers: dict[str, LayerInfo]) -> int:
    """``_matmul_integer_to_float`` on every float-output MatMul layer; how many were rewritten."""
    index = _Index(model_or_graph)  # each rewrite removes and adds only its own layer's nodes
    return sum(_matmul_integer_to_float(model_or_graph, info, index) for info in layers.values()
               if info.op == "MatMul" and info.form == "float" and info.act_input is not None)


def _fold_matmul_scale(graph: onnx.GraphProto, op: OpInfo, index: _Index) -> bool:
    """A quantized matmul op followed by a product with a constant (attention's ``Q.K^T * scale``): the constant
    moves into the scale of one input's DequantizeLinear and the Mul goes; True when folded.

    ONNX Runtime then runs ``Q.K^T`` and the scaling in one MatMulIntegerToFloat instead of a second pass
    over the (batch, heads, tokens, tokens) scores. The integer product is the same; only the float
    rounding of ``codes * (scale * constant)`` against ``(codes * scale) * constant`` differs.
    """
    node, users = index.producer.get(op.output), index.consumers.get(op.output, [])
    if node is None or node.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "Mul" or op.output in index.outputs:
        return False
    mul = users[0]
    weights = _initializers(graph)
    factor = next((name for name in mul.input if name != op.output), None)
    if factor not in weights or np.prod(weights[factor].dims, dtype=np.int64) != 1 or mul.output[0] in index.outputs:
        return False
    for name in reversed(node.input):
        dequantize = index.producer.get(name)
        if dequantize is not None and dequantize.op_type == "DequantizeLinear" and len(index.consumers[name]) == 1 \
                and dequantize.input[1] in weights and not weights[dequantize.input[1]].dims:
            break
    else:
        return False
    scale = _array(graph, dequantize.input[1]).astype(np.float32) * _array(graph, factor).astype(np.float32).reshape(())
    dequantize.input[1] = _set_initializer(graph, f"{dequantize.name or name}.scale_times_{factor}", scale)
    for user in index.consumers.get(mul.output[0], []):
        for position, value in enumerate(user.input):
            if value == mul.output[0]:
                user.input[position] = op.output
    graph.node.remove(mul)
    return True


def _fold_matmul_scales(graph: onnx.GraphProto, ops: dict[str, OpInfo]) -> int:
    """``_fold_matmul_scale`` on every quantized matmul op; how many were folded."""
    index = _Index(graph)  # each fold edits only its own op's nodes
    return sum(_fold_matmul_scale(graph, op, index) for op in ops.values() if op.op == "MatMul")


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    index = _Index(graph)
    needed = {value.name for value in graph.output}
    keep: list[onnx.NodeProto] = []
    pending = list(needed)
    seen_nodes: set[int] = set()
    while pending:
        node = index.producer.get(pending.pop())
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        keep.append(node)
        for name in node.input:
            if name and name not in needed:
                needed.add(name)
                pending.append(name)
    for node in [node for node in graph.node if id(node) not in seen_nodes]:
        graph.node.remove(node)
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in needed]:
        graph.initializer.remove(tensor)


def toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each runs after its inputs exist (added nodes were appended at the end).

    Example:
        >>> x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        >>> graph = helper.make_graph([helper.make_node("Relu", ["h"], ["y"]), helper.make_node("Neg", ["x"], ["h"])], "g", [x], [])
        >>> toposort(graph)
        >>> [node.op_type for node in graph.node]
        ['Neg', 'Relu']
    """
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    remaining = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while remaining:
        ready = [node for node in remaining if all(name in available for name in node.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a missing input near node {remaining[0].name!r}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        remaining = [node for node in remaining if all(node is not other for other in ready)]
    copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def rewrite_for_int8(model: onnx.ModelProto) -> tuple[dict[str, LayerInfo], dict[str, OpInfo]]:
    """Rewrite ``model`` in place (see the module docstring); returns the layers and the ops, in graph order.

    Example (the raw export that ``build_int8_model`` writes and then rewrites; a small ResNet):
        >>> import tempfile, torch
        >>> from qdistill import models, quant
        >>> from qdistill.export.onnx import _export_copy, _torchscript_export
        >>> student = quant.prepare(models.create("tiny_resnet", width=4), {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 8, 8)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _torchscript_export(_export_copy(student)[0], torch.rand(1, 1, 8, 8), f"{folder}/raw.onnx", 13)
        ...     layers, ops = rewrite_for_int8(onnx.load(f"{folder}/raw.onnx"))
        >>> layers["stem.0"].form == FLOAT_CODE_FORM, layers["layer1.0.conv1"].form, layers["fc"].form
        (True, "fused with the next layer's QuantizeLinear", 'QGemm with float output + bias Add')
        >>> {name: op.op for name, op in ops.items()}
        {'layer1.0.add': 'Add', 'layer2.0.add': 'Add', 'layer3.0.add': 'Add', 'pool': 'GlobalAveragePool'}
    """
    graph = model.graph
    _constants_to_initializers(graph)
    _identities_to_initializers(graph)
    layers = _collect_layers(graph)
    ops = _collect_ops(graph)
    lookups = _collect_lookups(graph)
    _move_all_quantizes(graph, layers)
    _op_quantized_outputs(graph, ops)
    sources: dict[str, list[str]] = {}
    lookup_ops = _install_lookups(graph, lookups, sources)
    _integer_lookups(graph, lookup_ops, sources)
    needed = _float_lookups(graph, lookup_ops, sources)
    # opset 14 changes none of the ops these graphs hold (Add/Mul/Relu gain types, Reshape's allowzero defaults to 0)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < needed:
            opset.version = needed
    ops.update(lookup_ops)
    index = _Index(graph)
    for info in layers.values():
        _integer_output_form(graph, info, index)
    _channels_last_flattens(model, layers)
    if _fuse_matmul_biases(graph, layers) and not any(entry.domain == "com.microsoft" for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _fold_matmul_scales(graph, ops)
    _prune(graph)
    toposort(graph)
    position = {output: order for order, node in enumerate(graph.node) for output in node.output}

    def in_graph_order(table: dict) -> dict:
        return dict(sorted(table.items(), key=lambda item: position.get(item[1].output, len(position))))

    return in_graph_order(layers), in_graph_order(ops)
