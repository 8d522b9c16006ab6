"""ONNX export: int8 kernels in ONNX Runtime, parity with the student, the gate naming a broken layer."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from qdistill.errors import ExportError
from qdistill.export import export_all, export_onnx, format_export_summary, verify_onnx
from qdistill.export.latency import make_session
from qdistill.export.onnx import CODE_CONV_KERNEL, LOGIT_SQNR_GATE_DB, check_integer_kernels
from qdistill.export.packed import weight_integers
from qdistill.export.qdq_graph import INTEGER_OPS, toposort
from qdistill.quant import is_quantized, prepare


def _student(teacher, train, bits: int, first_last_bits: int | None = 8):
    spec = {"weight_bits": bits, "act_bits": bits, "first_last_bits": first_last_bits, "init": "minmax"}
    return prepare(teacher, spec, calibration_data=train)


@pytest.fixture(scope="module")
def w4_export(digits, digits_teacher, tmp_path_factory):
    """A W4A4 student (inner layers 4-bit, first/last 8-bit) and its verified ONNX file."""
    bundle, train, val = digits
    student = _student(digits_teacher, train, 4)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    info = export_onnx(student, path, bundle.train_x[:1], verify_on=val)
    return student, path, info


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("bits", [8, 4])
def test_every_layer_runs_an_integer_kernel_and_matches_the_student(digits, digits_teacher, tmp_path, bits):
    bundle, train, val = digits
    student = _student(digits_teacher, train, bits, first_last_bits=None)
    info = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1], verify_on=val)
    layers = [name for name, module in student.named_modules() if is_quantized(module)]
    assert sorted(info["integer_ops"]) == sorted(layers)
    # features.0 (K = 1 * 3 * 3 = 9) is the one deliberate float Conv on integer codes, bit-equal to
    # QLinearConv and faster (test_integer_ops.py::test_a_narrow_first_conv_runs_on_integer_codes_...)
    assert all(op in INTEGER_OPS for name, op in info["integer_ops"].items() if name != "features.0"), info["integer_ops"]
    assert info["integer_ops"]["features.0"] == CODE_CONV_KERNEL and info["integer_ops"]["classifier.5"] == "QGemm"
    assert info["agreement_with_student"] >= 0.999
    assert abs(info["accuracy"] - info["student_accuracy"]) <= 0.001
    assert info["max_abs_logit_diff"] < 0.5
    assert info["parity_checked"] and info["logit_sqnr_db"] >= LOGIT_SQNR_GATE_DB + 20  # honest: far above the bound
    assert info["file_bytes"] == (tmp_path / "model.onnx").stat().st_size


def test_relu_maxpool_flatten_run_on_integers(w4_export):
    _, path, _ = w4_export
    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    assert "Relu" not in ops  # folded into the integer Clip's lower bound (the zero point)
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        if node.op_type in ("MaxPool", "Flatten"):
            producer = producers[node.input[0]]
            if producer.op_type == "Conv":  # the narrow first conv: pooled on its exact integer sums, then requantized
                assert producer.name == "features.0" and producer.input[0] == "features.0.input_codes", node.name
                continue
            if producer.op_type == "Transpose":  # NHWC flatten order for the next Gemm (qdq_graph._channels_last_flattens)
                assert node.op_type == "Flatten" and producer.name.endswith(".input_channels_last"), node.name
                producer = producers[producer.input[0]]
            assert producer.op_type in ("QuantizeLinear", "MaxPool"), node.name


def test_low_bit_grid_is_kept_inside_the_int8_file(w4_export):
    _, path, _ = w4_export
    model = onnx.load(str(path))
    table = {entry["name"]: entry for entry in json.loads(model.metadata_props[0].value)}
    inner = table["features.3"]
    assert (inner["weight_bits"], inner["act_bits"]) == (4, 4)
    ints = _initializer(model, "features.3.weight_quantized").astype(int)
    multiplier = inner["weight_int_multiplier"]
    assert ints.dtype.kind == "i" and multiplier == 63 // 7  # stretched up to 63: u8s8 sums cannot saturate
    assert np.all(ints % multiplier == 0) and np.abs(ints // multiplier).max() <= 7 and np.abs(ints).max() <= 63
    assert int(_initializer(model, "features.3.input_qmax")) == 15
    assert table["features.0"]["weight_int_multiplier"] == 1  # 8-bit first layer: the plain integers


def test_wide_weight_layers_are_the_integer_layers_with_codes_beyond_the_u8s8_safe_range(w4_export, digits,
                                                                                        digits_teacher, tmp_path):
    student, path, info = w4_export
    expected = {}  # from the student's own integer weights: 8-bit layers whose codes leave [-64, 63]
    for name, module in student.named_modules():
        if is_quantized(module) and info["integer_ops"][name] != CODE_CONV_KERNEL:  # features.0 sums in float
            ints = weight_integers(module, name).ints
            if module.weight_quantizer.bits == 8 and (ints.min() < -64 or ints.max() > 63):
                expected[name] = int(ints.abs().max())
    assert expected and info["wide_weight_layers"] == expected  # the 8-bit last layer; stretched 4-bit ones stay in range
    bundle, train, val = digits
    seven = _student(digits_teacher, train, 7, first_last_bits=7)
    seven_info = export_onnx(seven, tmp_path / "w7.onnx", bundle.train_x[:1], verify_on=val)
    model = onnx.load(str(tmp_path / "w7.onnx"))
    codes = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert codes and all(c.min() >= -64 and c.max() <= 63 for c in codes)
    assert seven_info["wide_weight_layers"] == {} and seven_info["agreement_with_student"] >= 0.999


def test_dynamic_batch(w4_export, digits):
    student, path, _ = w4_export
    bundle, _, _ = digits
    session = make_session(path)
    for batch in (1, 7):
        inputs = bundle.val_x[:batch]
        logits = session.run(None, {"input": inputs.numpy()})[0]
        assert logits.shape == (batch, 10)
        with torch.no_grad():
            assert (logits.argmax(1) == student(inputs).argmax(1).numpy()).all()


def _perturbed(path, tmp_path, name: str, change) -> str:
    model = onnx.load(str(path))
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor)), name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    return str(broken)


def test_gate_names_the_layer_whose_int8_weights_were_changed(w4_export, digits, tmp_path):
    student, path, _ = w4_export
    _, _, val = digits
    broken = _perturbed(path, tmp_path, "features.3.weight_quantized", lambda ints: -ints)
    with pytest.raises(ExportError, match=r"parity gate failed.*first diverging layer: 'features\.3'"):
        verify_onnx(broken, student, val)


def test_gate_names_the_layer_whose_scale_was_changed(w4_export, digits, tmp_path):
    student, path, _ = w4_export
    _, _, val = digits

    def blow_up_one_class(scale):
        scale = scale.copy()
        scale[3] *= 50.0
        return scale

    broken = _perturbed(path, tmp_path, "classifier.5.weight_scale", blow_up_one_class)
    with pytest.raises(ExportError, match=r"first diverging layer: 'classifier\.5'"):
        verify_onnx(broken, student, val)


def test_a_layer_left_in_float_is_an_error(w4_export, tmp_path):
    _, path, _ = w4_export
    model = onnx.load(str(path))
    gemm = next(node for node in model.graph.node if node.name == "classifier.2")
    # a float op between the weight's DequantizeLinear and the Gemm blocks the QGemm fusion
    model.graph.initializer.append(numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"))
    model.graph.node.append(helper.make_node("Mul", [gemm.input[1], "two"], ["weight_times_two"]))
    gemm.input[1] = "weight_times_two"
    toposort(model.graph)
    onnx.save(model, str(tmp_path / "float_layer.onnx"))
    with pytest.raises(ExportError, match=r"runs layer 'classifier\.2' in float"):
        check_integer_kernels(tmp_path / "float_layer.onnx")


def test_failed_gate_writes_no_file(digits, digits_teacher, tmp_path):
    bundle, train, val = digits
    student = _student(digits_teacher, train, 8)
    # the int8 file computes the student bit for bit (logit SQNR inf), so the student's logits get noise the
    # exported copy does not see, and the bound is out of reach: the gate must fail
    student.register_forward_hook(
        lambda module, inputs, output: output if torch.onnx.is_in_onnx_export() else output + 0.1 * torch.randn_like(output))
    with pytest.raises(ExportError, match="parity gate failed: logit SQNR"):
        export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1], verify_on=val, sqnr_gate_db=1e9)
    assert not (tmp_path / "model.onnx").exists()


class _ConvHead(nn.Module):
    """Conv1d layers; the last one's output feeds no quantizer (the ConvInteger path)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 10, 64))

    def forward(self, x):  # (B, 1, 8, 8) -> (B, 10)
        return self.body(x.flatten(2)).flatten(1)


def test_conv_without_quantized_output_uses_conv_integer(digits, tmp_path):
    bundle, train, val = digits
    student = prepare(_ConvHead(), {"weight_bits": 4, "act_bits": 8, "first_last_bits": None}, calibration_data=train)
    info = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1], verify_on=val)
    assert info["integer_ops"] == {"body.0": "QLinearConv", "body.2": "ConvInteger"}
    assert info["agreement_with_student"] >= 0.999


def test_export_all_section_and_summary(digits, digits_teacher, tmp_path):
    bundle, train, val = digits
    student = _student(digits_teacher, train, 4)
    section = export_all(student, bundle.train_x[:1], val, onnx_path=tmp_path / "model.onnx",
                         packed_path=tmp_path / "student.qpack.safetensors", latency_budget_s=0.01)
    onnx_section, packed = section["onnx"], section["packed"]
    for key in ("path", "file_bytes", "accuracy", "agreement_with_student", "max_abs_logit_diff", "logit_sqnr_db",
                "logit_sqnr_gate_db", "near_tie_flips"):
        assert key in onnx_section
    assert onnx_section["parity_checked"] is True and onnx_section["logit_sqnr_gate_db"] == LOGIT_SQNR_GATE_DB
    for key in ("latency_us_per_sample", "fp32_latency_us_per_sample"):
        assert set(onnx_section[key]) == {"batch1", "batch64"} and min(onnx_section[key].values()) > 0
    assert set(onnx_section["latency_threads"]["1"]) == {"int8", "fp32", "torch_fp32"}
    method = onnx_section["latency_method"]  # how the numbers were taken: real batches, interleaved rounds
    assert method["samples"] == "distinct" and method["batch_sizes"] == [1, 64] and method["rounds"] >= 3
    assert method["threads"] == {"1": 1, "all": onnx_section["latency_threads"]["all_threads"]}
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "student.qpack.safetensors").is_file()
    assert packed["file_bytes"] == (tmp_path / "student.qpack.safetensors").stat().st_size
    assert packed["file_bytes"] * 3 < packed["fp32_file_bytes"]
    summary = format_export_summary(section)
    assert "agreement 100" in summary or "agreement 99" in summary
    assert "smaller than fp32" in summary and "µs/sample" in summary and "QLinearConv" in summary
    assert f"(bound {LOGIT_SQNR_GATE_DB:g} dB)" in summary
    wide = onnx_section["wide_weight_layers"]  # the 8-bit last layer: named in the section, counted in the summary
    assert "classifier.5" in wide and f"{len(wide)} layers have 8-bit weights beyond [-64, 63]" in summary
    json.dumps(section)  # report.json must be able to hold it
    assert export_all(student, bundle.train_x[:1], val) == {}


def test_bias_of_a_zero_input_window_rounds_as_in_pytorch(digits, digits_teacher):
    from qdistill.export.onnx import build_int8_model
    from qdistill.export.qdq_graph import _prune

    _, train, _ = digits
    student = _student(digits_teacher, train, 8)
    conv, next_quantizer = student.features[0], student.features[3].input_quantizer
    grid = float(np.float32(conv.input_quantizer.scale.item()) * np.float32(conv.weight_quantizer.scale[0].item()))
    step = next_quantizer.scale.item()
    # a bias just below a rounding tie whose nearest int32 grid point lies just above it
    tie = next((n + 0.5) * step for n in range(1000) if -(-(n + 0.5) * step // grid) * grid - (n + 0.5) * step < 0.3 * grid)
    with torch.no_grad():
        conv.bias[0] = -(-tie // grid) * grid - 0.45 * grid
    model = build_int8_model(student, torch.zeros(1, 1, 8, 8))
    codes = next(node for node in model.graph.node if node.name == "features.3.input_quantize").output[0]
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(codes, onnx.TensorProto.UINT8, None))
    _prune(model.graph)
    background = make_session(model.SerializeToString()).run(None, {"input": np.zeros((1, 1, 8, 8), np.float32)})[0]
    with torch.no_grad():
        expected = torch.relu(conv(torch.zeros(1, 1, 8, 8)))
        expected = torch.round(expected * (1 / next_quantizer.scale)).clamp(0, 255)
    np.testing.assert_array_equal(background[0, :, 0, 0], expected[0, :, 0, 0].numpy())
