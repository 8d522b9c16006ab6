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


def test_attention_matmuls_and_gelu_run_on_integer_kernels(student, tmp_path):
    info = export_onnx(student, tmp_path / "bert.onnx", _batch(1))
    other = info["integer_ops_other"]
    for block in range(2):
        prefix = f"bert.encoder.layer.{block}."
        assert other[prefix + "attention.self.scores.matmul"] in {"MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul"}
        assert other[prefix + "attention.self.weighted.matmul"] in {"MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul"}
        assert other[prefix + "intermediate.intermediate_act_fn"] == "Gather"  # GELU as a table of input codes
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
