"""``mlas_erf``, ``ort_gelu`` and ``refine_near_ties`` against ONNX Runtime itself (the independent reference):
its ``Erf`` op, and the GELU that PyTorch's exporter writes, run at the deploy level where ONNX Runtime fuses it
into its ``Gelu`` kernel."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from qdistill.quant.float_kernels import GELU_BOUND, mlas_erf, ort_gelu
from qdistill.quant.modules import ActivationQuantizer, RuntimeGelu
from support import calibrated


def _values(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    special = [0.0, -0.0, 0.921875, -0.921875, np.nextafter(np.float32(0.921875), 1), 3.725, -3.725, 10.0, -10.0,
               1e-30, -1e-30, 88.0, -88.0]
    return np.concatenate([rng.normal(0, 2, count), rng.uniform(-6, 6, count), special]).astype(np.float32)


def _erf_session() -> ort.InferenceSession:
    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"])], "erf",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _exported_gelu_session(tmp_path) -> ort.InferenceSession:
    """F.gelu as the TorchScript exporter writes it (the erf formula), at ONNX Runtime's deploy level."""
    class Gelu(torch.nn.Module):
        def forward(self, x):
            return F.gelu(x)

    buffer = io.BytesIO()
    torch.onnx.export(Gelu(), torch.zeros(4), buffer, opset_version=14, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    assert [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node] == ["Gelu"]
    return session


def test_mlas_erf_is_onnx_runtimes_erf_bit_for_bit():
    x = _values(500_000, 0)
    reference = _erf_session().run(None, {"x": x})[0]
    np.testing.assert_array_equal(mlas_erf(torch.from_numpy(x)).numpy(), reference)
    assert (torch.erf(torch.from_numpy(x)).numpy() != reference).sum() > 1000  # PyTorch's erf is another one


def test_ort_gelu_is_onnx_runtimes_fused_gelu_bit_for_bit(tmp_path):
    x = _values(500_000, 1)
    reference = _exported_gelu_session(tmp_path).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ort_gelu(torch.from_numpy(x)).numpy(), reference)
    torch_gelu = F.gelu(torch.from_numpy(x)).numpy()
    assert (torch_gelu != reference).sum() > 1000
    # the bound refine_near_ties trusts holds with a wide margin
    assert np.max(np.abs(torch_gelu - reference) / (np.abs(x) + 1)) < GELU_BOUND / 8


@pytest.mark.parametrize("scale", [0.01, 0.0371])
def test_a_quantizer_reading_runtime_gelu_gives_onnx_runtimes_codes(tmp_path, scale):
    # reference: ONNX Runtime's Gelu output, quantized by the same quantizer
    x = _values(400_000, 2)
    runtime = torch.from_numpy(_exported_gelu_session(tmp_path).run(None, {"x": x})[0])
    quantizer = calibrated(ActivationQuantizer(8), scale, 20).eval()  # GELU dips to -0.17: codes below 20
    with torch.no_grad():
        expected = quantizer(runtime)
        refined = quantizer(RuntimeGelu()(torch.from_numpy(x)))
        plain = quantizer(F.gelu(torch.from_numpy(x)))
    torch.testing.assert_close(refined, expected, rtol=0, atol=0)
    assert (plain != expected).sum() > 0  # without the refinement some codes differ: the test can fail
