"""The embedding parity gate against cosines computed independently (torch), and its failures."""

import numpy as np
import pytest
import torch

from qdistill.errors import ExportError
from qdistill.export.onnx import embedding_parity_gate, export_onnx
from qdistill.quant.prepare import prepare


def test_cosines_match_torch():
    generator = np.random.default_rng(0)
    student = generator.normal(size=(20, 16))
    onnx_like = student + generator.normal(scale=0.01, size=student.shape)
    metrics, failure = embedding_parity_gate(onnx_like, student)
    reference = torch.nn.functional.cosine_similarity(torch.tensor(onnx_like), torch.tensor(student))
    assert metrics["mean_cosine"] == pytest.approx(reference.mean().item(), abs=1e-9)
    assert metrics["min_cosine"] == pytest.approx(reference.min().item(), abs=1e-9)
    assert metrics["max_abs_diff"] == pytest.approx(np.abs(onnx_like - student).max())
    assert failure is None and metrics["samples"] == 20


def test_one_bad_sample_fails_on_the_min_cosine():
    student = np.eye(4)[:3] + 0.1
    onnx_like = student.copy()
    onnx_like[1] = -onnx_like[1]
    metrics, failure = embedding_parity_gate(onnx_like, student)
    assert metrics["min_cosine"] == pytest.approx(-1.0)
    assert "min cosine -1.0000 < 0.99" in failure


def test_unknown_output_kind_is_a_clear_error(tmp_path):
    student = prepare(torch.nn.Sequential(torch.nn.Linear(4, 3)), {"weight_bits": 8, "act_bits": 8},
                      calibration_data=[torch.rand(8, 4)])
    with pytest.raises(ExportError, match="output_kind: 'pooled' is not allowed; allowed: logits, embedding"):
        export_onnx(student, tmp_path / "m.onnx", torch.rand(1, 4), output_kind="pooled")


def test_embedding_gate_runs_in_export(tmp_path):
    student = prepare(torch.nn.Sequential(torch.nn.Linear(4, 8)), {"weight_bits": 8, "act_bits": 8},
                      calibration_data=[torch.rand(8, 4)])
    info = export_onnx(student, tmp_path / "m.onnx", torch.rand(1, 4), verify_on=[torch.rand(16, 4)],
                       output_kind="embedding")
    assert info["min_cosine"] >= 0.99 and info["samples"] == 16 and "flips" not in info
