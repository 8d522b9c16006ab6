"""A quantized transformers BertModel exports with integer attention matmuls; an unused pooler is dropped with a note."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))

from test_hf_attention import MeanEncoder, _batch  # noqa: E402

from qdistill.export.onnx import UNUSED_OUTPUT, export_onnx  # noqa: E402
from qdistill.quant.prepare import prepare  # noqa: E402


@pytest.fixture(scope="module")
def student():
    return prepare(MeanEncoder(pooler=True).eval(), {"weight_bits": 8, "act_bits": 8}, calibration_data=[_batch()])


def test_attention_matmuls_and_linears_run_on_integer_kernels(student, tmp_path):
    info = export_onnx(student, tmp_path / "bert.onnx", _batch(1))
    other = info["integer_ops_other"]
    for block in range(2):
        prefix = f"bert.encoder.layer.{block}."
        assert other[prefix + "attention.self.scores.matmul"] in {"MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul"}
        assert other[prefix + "attention.self.weighted.matmul"] in {"MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul"}
        assert prefix + "intermediate.intermediate_act_fn" not in other  # GELU stays float (prepare lists why)
        for linear in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                       "intermediate.dense", "output.dense"):
            assert info["integer_ops"][prefix + linear] in {"MatMulIntegerToFloat", "QGemm", "MatMulInteger"}


def test_unused_pooler_is_dropped_with_a_note(student, tmp_path):
    info = export_onnx(student, tmp_path / "bert.onnx", _batch(1), verify_on=[_batch()])
    assert info["dropped_layers"] == {"bert.pooler.dense": UNUSED_OUTPUT}
    assert "bert.pooler.dense" not in info["integer_ops"]
    assert info["parity_checked"]


def test_a_layer_never_called_is_still_an_error(tmp_path):
    model = MeanEncoder().eval()
    model.unused = torch.nn.Linear(32, 32)  # never called by forward
    student = prepare(model, {"weight_bits": 8, "act_bits": 8}, calibration_data=[_batch()])
    assert "unused" in student.qdistill_unquantized  # calibration never reached it: float again, with its reason
    info = export_onnx(student, tmp_path / "bert.onnx", _batch(1))
    assert "unused" not in info["dropped_layers"]


def test_embedding_parity_gate_passes_and_is_recorded(student, tmp_path):
    from qdistill.export import export_all

    section = export_all(student, _batch(1), [_batch(), _batch(2)], onnx_path=tmp_path / "bert.onnx",
                         latency_budget_s=0.5, output_kind="embedding")["onnx"]
    assert section["output_kind"] == "embedding" and section["parity_checked"]
    assert section["min_cosine"] >= section["min_cosine_gate"] == 0.99
    assert section["mean_cosine"] >= section["mean_cosine_gate"] == 0.999
    assert "agreement_with_student" not in section and "logit_sqnr_db" not in section
    assert section["dropped_layers"] == {"bert.pooler.dense": UNUSED_OUTPUT}


def test_linear_biases_and_attention_scale_fold_into_integer_matmuls(student, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    path = export_onnx(student, tmp_path / "bert.onnx", _batch(1))["path"]
    graph = onnx.load(path).graph
    fused = [node for node in graph.node if node.op_type == "MatMulIntegerToFloat"]
    biases = {node.input[6] for node in fused if len(node.input) == 7}
    for block in range(2):  # each Linear of the encoder is one MatMulIntegerToFloat that adds its bias
        for linear in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                       "intermediate.dense", "output.dense"):
            assert any(name.endswith(f"encoder.layer.{block}.{linear}.bias") for name in biases), linear
    assert not any(node.op_type == "Add" and set(node.input) & biases for node in graph.node)  # no separate bias Add
    # Q.K^T * scale: no Mul by the scale after the scores matmul (it went into a DequantizeLinear scale)
    scores = {out for node in graph.node if node.op_type == "MatMul" and "scores" in node.name for out in node.output}
    assert len(scores) == 2
    assert not any(node.op_type == "Mul" and set(node.input) & scores for node in graph.node)
    # ONNX Runtime computes what the PyTorch student computes (independent of the exporter's own gate)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")  # exact sums on x86 without VNNI (docs/deploy.md)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    batch = _batch()
    got = session.run(None, {value.name: batch[value.name].numpy() for value in session.get_inputs()})[0]
    with torch.no_grad():
        expected = student(**batch).numpy()
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.9999


def test_smoothed_student_exports_one_mul_per_tensor_and_passes_the_gate(tmp_path):
    import onnx

    from qdistill.export import export_all

    spec = {"weight_bits": 8, "act_bits": 8, "smoothing": 0.8}
    student = prepare(MeanEncoder().eval(), spec, calibration_data=[_batch(), _batch(2)])
    # per block: Q/K/V (one shared input), attention output, feed-forward in (LayerNorm output) and out (GELU output)
    assert len(student.qdistill_smoothed) == 2 * 6
    section = export_all(student, _batch(1), [_batch(), _batch(2)], onnx_path=tmp_path / "bert.onnx",
                         latency_budget_s=0.2, output_kind="embedding")["onnx"]
    assert section["parity_checked"] and section["min_cosine"] >= 0.99
    graph = onnx.load(tmp_path / "bert.onnx").graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    smoothed = [node for node in graph.node if node.op_type == "QuantizeLinear" and producers.get(node.input[0]) == "Mul"]
    assert len(smoothed) == 2 * 4
