"""Issue 9 item 2: every quantized op (residual adds, concatenations, pools) runs as an integer kernel."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from qdistill import models
from qdistill.errors import ExportError
from qdistill.export import export_all, format_export_summary, qdq_graph
from qdistill.export import onnx as export_onnx_module
from qdistill.export.latency import make_session
from qdistill.export.onnx import (
    CODE_CONV_KERNEL,
    DIVERGENCE_SQNR_DB,
    check_integer_kernels,
    diagnose_layers,
    export_onnx,
    verify_onnx,
)
from qdistill.export.qdq_graph import INTEGER_OPS, toposort
from qdistill.quant import prepare
from qdistill.quant.modules import (
    QuantAdaptiveAvgPool2d,
    QuantAdd,
    QuantAvgPool2d,
    QuantCat,
    QuantElementwise,
    QuantMatMul,
    QuantMul,
)

# what ONNX Runtime's CPU provider fuses each quantized op into (independent of the code under test);
# an elementwise activation whose result is quantized is a Gather from a table of integer codes
EXPECTED_KERNEL = {QuantAdd: "QLinearAdd", QuantCat: "QLinearConcat", QuantAvgPool2d: "QLinearAveragePool",
                   QuantAdaptiveAvgPool2d: "QLinearGlobalAveragePool", QuantMul: "QLinearMul", QuantElementwise: "Gather"}
SMALL = {"tiny_resnet": {"width": 4}, "tiny_mobilenetv2": {"width": 8}, "tiny_transformer": {"dim": 16, "heads": 2}}


class CatPoolNet(nn.Module):
    """An average pool, a concatenation of two branches, a residual add and a global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AvgPool2d(2)
        self.left, self.right = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 6, 1)
        self.mix = nn.Conv2d(10, 10, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(10, 10)

    def forward(self, x):  # (B, 1, 8, 8) -> (B, 10)
        x = self.pool(self.stem(x))
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        y = self.mix(y) + y
        return self.head(torch.flatten(self.gap(y), 1))


class CatAtTheEnd(nn.Module):
    """Two linear heads concatenated as the output: the concatenation's result feeds no quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 5), nn.Linear(64, 5)

    def forward(self, x):  # (B, 1, 8, 8) -> (B, 10)
        x = x.flatten(1)
        return torch.cat([self.a(x), self.b(x)], dim=1)


def _student(model: nn.Module, train, bits: int) -> nn.Module:
    return prepare(model, {"weight_bits": bits, "act_bits": bits, "init": "minmax", "calibration_batches": 2},
                   calibration_data=train)


def _model(name: str, bundle) -> nn.Module:
    torch.manual_seed(0)
    return CatPoolNet() if name == "cat_pool" else models.create(name, **bundle.model_kwargs(), **SMALL[name])


@pytest.mark.parametrize("name, bits", [("cat_pool", 8), ("cat_pool", 4), ("tiny_resnet", 8), ("tiny_resnet", 4),
                                        ("tiny_mobilenetv2", 4), ("tiny_transformer", 8), ("tiny_transformer", 4)])
def test_every_quantized_op_runs_its_integer_kernel(name, bits, digits, tmp_path):
    bundle, train, _ = digits
    student = _student(_model(name, bundle), train, bits)
    info = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])
    expected = {op_name: EXPECTED_KERNEL[type(module)] for op_name, module in student.named_modules()
                if type(module) in EXPECTED_KERNEL}
    assert expected, "the model must have quantized ops for this test to mean anything"
    matmuls = {op_name for op_name, module in student.named_modules() if isinstance(module, QuantMatMul)}
    # attention scores feed a float softmax: an integer product with a float result
    assert all(info["integer_ops_other"].pop(op_name) in ("QLinearMatMul", "MatMulIntegerToFloat") for op_name in matmuls)
    assert info["integer_ops_other"] == expected
    # and ONNX Runtime's optimised graph holds exactly that many integer kernels of each kind
    optimized = tmp_path / "optimized.onnx"
    make_session(tmp_path / "model.onnx", level="extended", optimized_path=optimized)
    nodes = onnx.load(str(optimized)).graph.node
    counts = collections.Counter(node.op_type for node in nodes)
    for kernel, count in collections.Counter(expected.values()).items():
        if kernel == "Gather":  # shape arithmetic has Gathers too: the tables are the ones reading integer codes
            int_tables = {tensor.name for tensor in onnx.load(str(optimized)).graph.initializer
                          if tensor.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)}
            assert sum(1 for node in nodes if node.op_type == "Gather" and node.input[0] in int_tables) == count
            continue
        assert counts[kernel] == count, (kernel, counts)


def _insert_float_mul_after(model: onnx.ModelProto, node_name: str) -> None:
    """``op -> Mul(2) -> consumers``: the op's result is scaled in float before it is quantized."""
    node = next(node for node in model.graph.node if node.name == node_name)
    output = node.output[0]
    for other in model.graph.node:
        other.input[:] = [f"{output}_doubled" if name == output else name for name in other.input]
    model.graph.initializer.append(numpy_helper.from_array(np.array(2.0, dtype=np.float32), "float_two"))
    model.graph.node.append(helper.make_node("Mul", [output, "float_two"], [f"{output}_doubled"], name="float_mul"))
    toposort(model.graph)


def test_a_float_mul_before_an_adds_quantizer_fails_naming_the_add(digits, tmp_path):
    bundle, train, _ = digits
    student = _student(_model("tiny_resnet", bundle), train, 8)
    export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])
    model = onnx.load(str(tmp_path / "model.onnx"))
    _insert_float_mul_after(model, "layer2.0.add")
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportError, match=r"runs quantized op 'layer2\.0\.add' \(Add\) in float.*QLinearAdd"):
        check_integer_kernels(tmp_path / "broken.onnx")


@pytest.mark.parametrize("op_name, op_type", [("layer1.0.add", "Add"), ("pool", "GlobalAveragePool")])
def test_export_fails_and_writes_nothing_when_a_quantized_op_runs_in_float(digits, tmp_path, monkeypatch,
                                                                            op_name, op_type):
    bundle, train, val = digits
    student = _student(_model("tiny_resnet", bundle), train, 8)
    rewrite = export_onnx_module.rewrite_for_int8

    def rewrite_then_break(model):
        found = rewrite(model)
        _insert_float_mul_after(model, op_name)  # before export_onnx checks the file
        return found

    monkeypatch.setattr(export_onnx_module, "rewrite_for_int8", rewrite_then_break)
    with pytest.raises(ExportError, match=rf"quantized op '{op_name}' \({op_type}\) in float"):
        export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1], verify_on=val)
    assert not (tmp_path / "model.onnx").exists()


def test_a_quantized_op_read_by_float_code_quantizes_its_own_result(digits, tmp_path):
    bundle, train, val = digits
    student = _student(CatAtTheEnd(), train, 8)
    assert isinstance(student.cat, QuantCat) and student.cat.output_quantizer.bits == 8  # the graph output reads it
    info = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1], verify_on=val)
    assert info["integer_ops_other"] == {"cat": "QLinearConcat"} and info["flips"] == 0


def test_a_quantized_op_whose_result_feeds_no_quantizer_is_refused(digits, tmp_path):
    bundle, train, _ = digits
    student = _student(CatAtTheEnd(), train, 8)
    del student.cat.output_quantizer  # as a model prepared by hand without it would be
    with pytest.raises(ExportError, match=r"quantized op 'cat' \(Concat\) cannot run in integers: its result feeds no quantizer "
                                         r"\(it feeds the graph output in float\)"):
        export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])
    assert not (tmp_path / "model.onnx").exists()


def test_report_section_and_summary_list_the_ops_kernels(digits, tmp_path):
    bundle, train, val = digits
    student = _student(_model("tiny_resnet", bundle), train, 8)
    section = export_all(student, bundle.train_x[:1], val, onnx_path=tmp_path / "model.onnx", latency_budget_s=0.01)
    assert section["onnx"]["integer_ops_other"] == {"layer1.0.add": "QLinearAdd", "layer2.0.add": "QLinearAdd",
                                                    "layer3.0.add": "QLinearAdd", "pool": "QLinearGlobalAveragePool"}
    assert "4 other ops: 3 QLinearAdd, 1 QLinearGlobalAveragePool" in format_export_summary(section)


def _session_outputs(path, inputs: np.ndarray, level: str) -> np.ndarray:
    session = make_session(path, threads=1, level=level)
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_a_narrow_first_conv_runs_on_integer_codes_bit_equal_to_qlinearconv(digits, digits_teacher, tmp_path,
                                                                           monkeypatch, bits):
    # reference: the same student with the narrow form switched off, i.e. ONNX Runtime's own QLinearConv
    bundle, train, _ = digits
    student = _student(digits_teacher, train, bits)
    info = export_onnx(student, tmp_path / "narrow.onnx", bundle.train_x[:1])
    assert info["integer_ops"]["features.0"] == CODE_CONV_KERNEL  # K = 1 * 3 * 3 = 9
    assert all(op in INTEGER_OPS for name, op in info["integer_ops"].items() if name != "features.0"), info["integer_ops"]
    monkeypatch.setattr(qdq_graph, "NARROW_K", 0)
    reference = export_onnx(student, tmp_path / "qlinear.onnx", bundle.train_x[:1])
    assert reference["integer_ops"]["features.0"] == "QLinearConv"
    inputs = bundle.val_x.numpy()
    for level in ("extended", "all"):  # plain Conv, and the NCHWc Conv + MaxPool of the deploy setting
        np.testing.assert_array_equal(_session_outputs(tmp_path / "narrow.onnx", inputs, level),
                                      _session_outputs(tmp_path / "qlinear.onnx", inputs, level))


def test_the_kernel_check_fails_when_the_narrow_conv_does_not_read_integer_codes(digits, digits_teacher, tmp_path):
    bundle, train, _ = digits
    export_onnx(_student(digits_teacher, train, 8), tmp_path / "model.onnx", bundle.train_x[:1])
    model = onnx.load(str(tmp_path / "model.onnx"))
    _insert_float_mul_after(model, "features.0.input_cast")  # the conv now sums doubled codes in float
    onnx.save(model, str(tmp_path / "scaled.onnx"))
    with pytest.raises(ExportError, match=r"rewrote layer 'features\.0'.*no longer be exact"):
        check_integer_kernels(tmp_path / "scaled.onnx")


def test_a_narrow_conv_is_diagnosed_on_its_own_codes(digits, digits_teacher, tmp_path):
    bundle, train, val = digits
    student = _student(digits_teacher, train, 8)
    export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])
    layers = {row["name"]: row for row in diagnose_layers(tmp_path / "model.onnx", student, val)}
    # the student computes the runtime's integer sums and rounding: its layer output is matched exactly
    assert layers["features.0"]["sqnr_db"] > DIVERGENCE_SQNR_DB and layers["features.0"]["max_abs_diff"] == 0.0


def _optimized_ops(path, level: str, folder) -> list[str]:
    make_session(path, threads=1, level=level, optimized_path=folder / f"optimized_{level}.onnx")
    return [node.op_type for node in onnx.load(str(folder / f"optimized_{level}.onnx")).graph.node]


def test_a_gemm_after_flatten_reads_nhwc_order_exactly(digits, digits_teacher, tmp_path, monkeypatch):
    # reference: the same student without the permutation (the Flatten reads NCHW as exported)
    bundle, train, _ = digits
    student = _student(digits_teacher, train, 4)
    export_onnx(student, tmp_path / "nhwc.onnx", bundle.train_x[:1])
    monkeypatch.setattr(qdq_graph, "_channels_last_flattens", lambda model, layers: None)
    export_onnx(student, tmp_path / "nchw.onnx", bundle.train_x[:1])
    nhwc, nchw = _optimized_ops(tmp_path / "nhwc.onnx", "all", tmp_path), _optimized_ops(tmp_path / "nchw.onnx", "all", tmp_path)
    assert nhwc.count("Transpose") == nchw.count("Transpose") - 1 and len(nhwc) == len(nchw) - 1, (nhwc, nchw)
    inputs = bundle.val_x.numpy()
    for level in ("basic", "extended", "all"):
        np.testing.assert_array_equal(_session_outputs(tmp_path / "nhwc.onnx", inputs, level),
                                      _session_outputs(tmp_path / "nchw.onnx", inputs, level))


def test_diagnosis_reads_a_linear_on_3d_inputs_fused_with_its_bias(tmp_path):
    """A Linear on (batch, tokens, features) exports as one MatMulIntegerToFloat that adds its bias; the per-layer
    diagnosis must compare that node's output (the layer's whole result) with the student's layer output."""
    torch.manual_seed(0)
    batches = [torch.randn(16, 5, 8) for _ in range(2)]
    student = prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                      {"weight_bits": 8, "act_bits": 8}, calibration_data=batches)
    info = export_onnx(student, tmp_path / "tokens.onnx", batches[0][:1])
    assert set(info["integer_ops"].values()) == {"MatMulIntegerToFloat"}
    layers = diagnose_layers(info["path"], student, [batches[1]])
    assert [layer["name"] for layer in layers] == ["0", "2"]
    assert all(layer["sqnr_db"] > DIVERGENCE_SQNR_DB for layer in layers), layers


@pytest.mark.parametrize("form", ["tokens", "flat", "conv"])
def test_float_output_layers_equal_the_student_bit_for_bit(form, tmp_path):
    """The last layer has no quantizer after it: MatMulIntegerToFloat with its bias (3-D input), QGemm then a
    bias Add (2-D), ConvInteger then Mul and Add (conv). ONNX Runtime scales the int32 sum, then adds the bias
    in float; the student's evaluation forward does the same steps, so every output value is equal."""
    torch.manual_seed(0)
    model, shape = {"tokens": (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (64, 5, 8)),
                    "flat": (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (64, 8)),
                    "conv": (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), (64, 3, 8, 8))}[form]
    batches = [torch.randn(shape) for _ in range(2)]
    student = prepare(model, {"weight_bits": 8, "act_bits": 8}, calibration_data=batches)
    info = export_onnx(student, tmp_path / "model.onnx", batches[0][:1])
    assert info["integer_ops"]["2"] == {"tokens": "MatMulIntegerToFloat", "flat": "QGemm", "conv": "ConvInteger"}[form]
    session = make_session((tmp_path / "model.onnx").read_bytes())
    runtime = session.run(None, {session.get_inputs()[0].name: batches[1].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_array_equal(runtime, student(batches[1]).numpy())


class PaddedPoolNet(nn.Module):
    """Average pools on signed (non-zero zero point) activations: a padded 3x3 window that leaves the padding
    out of its count, a ceil-mode window that overhangs the map and an adaptive pool to 2x2 (a 2x2 AveragePool)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)  # no activation: its output quantizer has a zero point
        self.pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.ceil = nn.AvgPool2d(3, 2, ceil_mode=True)
        self.adaptive = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # (B, 1, 8, 8) -> (B, 10)
        x = self.mid(self.pool(self.stem(x)))  # 8 -> 4
        return self.head(torch.flatten(torch.cat([self.ceil(x), self.adaptive(x)], dim=1), 1))  # both 4 -> 2


def test_non_global_average_pools_export_bit_for_bit(digits, tmp_path):
    """Every non-global pool runs ONNX Runtime's QLinearAveragePool, and the student computes as it does:
    the ONNX logits equal the student's exactly (the float mean rounds near-ties the other way)."""
    bundle, train, val = digits
    torch.manual_seed(0)
    student = _student(PaddedPoolNet(), train, 8)
    pools = [module for module in student.modules() if isinstance(module, (QuantAvgPool2d, QuantAdaptiveAvgPool2d))]
    assert len(pools) == 3 and all(int(pool.input_quantizer.zero_point) != 0 for pool in pools)
    info = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1], verify_on=val)
    assert collections.Counter(info["integer_ops_other"].values())["QLinearAveragePool"] == 3
    assert info["max_abs_logit_diff"] == 0.0


def test_the_diagnosis_names_a_pool_that_diverges_not_the_next_layer(digits, tmp_path):
    """A pool whose student computes other values than the file's kernel (here: its count made to leave the
    padding out after the export, which divides the overhanging ceil-mode windows by fewer elements) is the
    first diverging row; before ops were diagnosed the error named the head, the next layer with weights."""
    bundle, train, val = digits
    torch.manual_seed(0)
    student = _student(PaddedPoolNet(), train, 8)
    path = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])["path"]
    student.ceil.count_include_pad = False
    with pytest.raises(ExportError, match=r"first diverging layer: 'ceil' \(output SQNR"):
        verify_onnx(path, student, val)
    rows = diagnose_layers(path, student, val)
    assert [row["name"] for row in rows] == ["stem", "pool", "mid", "ceil", "adaptive", "cat", "head"]
    assert all(row["max_abs_diff"] == 0.0 for row in rows[:3]) and rows[3]["sqnr_db"] < DIVERGENCE_SQNR_DB
