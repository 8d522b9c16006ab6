"""The student's evaluation forward computes quantized conv/linear layers as ONNX Runtime does.

References are independent of the code under test: an int64 numpy accumulation for the sum, and
ONNX Runtime's own QLinearConv / QGemm-free MatMulInteger graph built here node by node (not by
qdistill's exporter) for the requantized codes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qdistill.quant import prepare


def _codes(quantizer, values: torch.Tensor) -> np.ndarray:
    scale = quantizer.scale.detach().reshape(-1, *([1] * (values.dim() - 1))) if quantizer.axis is not None else quantizer.scale.detach()
    return torch.round(values / scale).to(torch.int64).numpy()


def _prepared(model: nn.Module, x: torch.Tensor) -> nn.Module:
    student = prepare(model, {"weight_bits": 8, "act_bits": 8, "first_last_bits": None}, calibration_data=[x])
    return student.eval()


def _qlinearconv_codes(x_codes_u8, x_scale, x_zero, w_codes_i8, w_scale, bias_i32, y_scale, y_zero, padding):
    """ONNX Runtime's QLinearConv on the given integers: the runtime's requantized uint8 codes."""
    names = ["x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero", "bias"]
    arrays = [np.float32(x_scale), np.uint8(x_zero), w_codes_i8.astype(np.int8), w_scale.astype(np.float32),
              np.zeros(len(w_scale), np.int8), np.float32(y_scale), np.uint8(y_zero), bias_i32.astype(np.int32)]
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero", "bias"],
                            ["y"], pads=[padding] * 4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in zip(names, arrays, strict=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")  # exact sums on x86 without VNNI (docs/deploy.md)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x_codes_u8})[0]


def test_conv_followed_by_relu_gives_the_codes_of_onnx_runtimes_qlinearconv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    x = torch.randn(64, 3, 24, 24)
    student = _prepared(model, x)
    conv, requantizer = student[0], student[2].input_quantizer
    assert conv.requantizer is requantizer  # linked through the ReLU
    with torch.no_grad():
        out = conv(x)
        x_q = conv.input_quantizer(x)
    x_zero = int(conv.input_quantizer.zero_point)
    x_codes = (_codes(conv.input_quantizer, x_q) + x_zero).astype(np.uint8)
    w_codes = _codes(conv.weight_quantizer, conv.quantized_weight().detach())
    step = (conv.input_quantizer.scale * conv.weight_quantizer.scale).detach()
    bias = torch.round(conv.bias.detach() / step).to(torch.int64).numpy()
    expected = _qlinearconv_codes(x_codes, conv.input_quantizer.scale.item(), x_zero, w_codes,
                                  conv.weight_quantizer.scale.detach().numpy(), bias,
                                  requantizer.scale.item(), int(requantizer.zero_point), padding=1)
    got = _codes(requantizer, out) + int(requantizer.zero_point)
    assert np.array_equal(got, expected.astype(np.int64)), int((got != expected).sum())
    float_formula = _codes(requantizer, requantizer(torch.relu(conv(x))).detach()) + int(requantizer.zero_point)
    assert (float_formula != expected).sum() > 0  # the training formula does not get them all: the check can fail


def test_a_sum_beyond_float32s_exact_integers_is_accumulated_exactly():
    """4096 inputs with codes near the ends of the grid: partial sums pass 2^24, so float32 would round them."""
    torch.manual_seed(1)
    layer = nn.Linear(4096, 4, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.sign(torch.randn(4, 4096)) * 0.5 + 0.001 * torch.randn(4, 4096))
        layer.weight[:, :2048] = 0.5  # same-sign half: the sum is large
    x = torch.rand(16, 4096) * 0.5 + 0.5
    student = _prepared(nn.Sequential(layer), x)
    linear = student[0]
    assert getattr(linear, "requantizer", None) is None  # the model's output: no requantization, float result
    with torch.no_grad():
        out = linear(x)
        x_codes = _codes(linear.input_quantizer, linear.input_quantizer(x))
    w_codes = _codes(linear.weight_quantizer, linear.quantized_weight().detach())
    step = (linear.input_quantizer.scale * linear.weight_quantizer.scale).detach()
    bias = torch.round(linear.bias.detach() / step).numpy().astype(np.float32)
    exact = x_codes @ w_codes.T  # int64: exact
    assert np.abs(exact).max() > 2**24
    # a float-output kernel (QGemm, MatMulIntegerToFloat): int32 -> float32, scaled, then the bias on its grid
    grid = step.numpy().astype(np.float32)
    expected = exact.astype(np.float32) * grid + bias * grid
    assert np.array_equal(out.numpy(), expected)


def test_training_keeps_the_float_formula_and_its_gradients():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    x = torch.randn(4, 3, 8, 8)
    student = _prepared(model, x).train()
    out = student(x)
    out.sum().backward()
    assert student[0].weight.grad is not None and student[2].input_quantizer.scale.grad is not None
    with torch.no_grad():
        evaluated = student.eval()(x)
    # the two forwards differ only where a rounding tie falls the other way
    assert torch.allclose(out.detach(), evaluated, atol=1e-3 * float(out.detach().abs().max()))
