"""Issue 9 item 3: the parity gate bounds the logits, and top-1 flips on near ties do not fail it."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qdistill import models
from qdistill.errors import ExportError
from qdistill.export import export_all, format_export_summary
from qdistill.export.onnx import LOGIT_SQNR_GATE_DB, export_onnx, parity_gate, verify_onnx
from qdistill.quant import prepare
from qdistill.recipe import TrainSpec
from qdistill.train import Supervised, fit


def _reference_sqnr_db(onnx_logits: np.ndarray, student_logits: np.ndarray, left_out: int) -> float:
    """SQNR of per-sample centred logits over all samples but the ``left_out`` with the largest error, written out plainly."""
    def centred(row):
        row = [float(value) for value in row]
        return [value - sum(row) / len(row) for value in row]

    signals = [sum(v * v for v in centred(row)) for row in student_logits]
    noises = [sum((a - b) ** 2 for a, b in zip(centred(o), centred(s), strict=True))
              for o, s in zip(onnx_logits, student_logits, strict=True)]
    kept = sorted(range(len(noises)), key=noises.__getitem__)[: len(noises) - left_out]
    return 10 * math.log10(sum(signals[i] for i in kept) / sum(noises[i] for i in kept))


def _synthetic(samples: int = 256, classes: int = 10, noise: float = 1e-3, seed: int = 0):
    """Student logits with a clear winner per sample, ONNX logits = student + small noise, labels = student's top-1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    student = rng.normal(0.0, 1.0, (samples, classes)).astype(np.float32)
    student[np.arange(samples), labels] += 6.0
    onnx_logits = (student + rng.normal(0.0, noise, student.shape)).astype(np.float32)
    return onnx_logits, student, labels


def _flip(onnx_logits: np.ndarray, student: np.ndarray, sample: int, margin: float) -> None:
    """Give ``sample`` a student top-2 margin of ``margin`` and let ONNX rank the two the other way round."""
    first, second = np.argsort(student[sample])[::-1][:2]
    student[sample, second] = student[sample, first] - margin
    onnx_logits[sample, first] = student[sample, first] - margin * 0.3
    onnx_logits[sample, second] = student[sample, first] + margin * 0.3


def test_one_near_tie_flip_in_256_samples_passes_the_gate():
    onnx_logits, student, labels = _synthetic()
    _flip(onnx_logits, student, 7, margin=1e-3)  # within the ~3e-3 error the other samples show
    metrics, failure = parity_gate(onnx_logits, student, labels)
    assert failure is None, failure
    assert (metrics["flips"], metrics["near_tie_flips"]) == (1, 1)
    assert metrics["agreement_with_student"] == 255 / 256
    # one flip of 256 moves accuracy by 0.39 pp: the accuracy rule excuses it as well
    assert metrics["student_accuracy"] - metrics["accuracy"] == pytest.approx(1 / 256)


def test_a_flip_with_a_clear_margin_fails_the_gate_even_with_good_logits_elsewhere():
    onnx_logits, student, labels = _synthetic()
    _flip(onnx_logits, student, 7, margin=0.5)
    metrics, failure = parity_gate(onnx_logits, student, labels)
    assert metrics["logit_sqnr_db"] > LOGIT_SQNR_GATE_DB  # the one bad sample is left out of the SQNR ...
    assert failure is not None and "1 of 256 samples change their top-1 class with a clear margin" in failure  # ... not of the flips


def test_the_near_tie_margin_comes_from_the_samples_that_did_not_flip():
    onnx_logits, student, labels = _synthetic(noise=0.0)  # the export is exact everywhere else
    _flip(onnx_logits, student, 3, margin=1e-3)
    metrics, failure = parity_gate(onnx_logits, student, labels)
    assert metrics["near_tie_margin"] == 0.0 and metrics["near_tie_flips"] == 0
    assert failure is not None and "clear margin" in failure


def test_logits_off_by_three_percent_fail_the_sqnr_bound_without_any_flip():
    _, student, labels = _synthetic()
    onnx_logits = student * np.float32(1.03)  # same top-1 everywhere
    metrics, failure = parity_gate(onnx_logits, student, labels)
    assert metrics["flips"] == 0
    assert metrics["logit_sqnr_db"] == pytest.approx(20 * math.log10(1 / 0.03), abs=0.05)
    assert failure is not None and failure.startswith("logit SQNR 30.5 dB < 40 dB")


def test_logit_sqnr_leaves_out_the_worst_one_percent_and_matches_a_plain_computation():
    onnx_logits, student, labels = _synthetic(noise=1e-2)
    onnx_logits[5, np.argmin(student[5])] += 3.0  # one sample far off (a rounding-tie cascade), same top-1
    onnx_logits[6] += 1.0  # a constant on all of a sample's logits changes no softmax: no error
    metrics, failure = parity_gate(onnx_logits, student, labels)
    assert failure is None
    assert metrics["logit_sqnr_left_out_samples"] == 2  # 1% of 256, rounded down
    assert metrics["logit_sqnr_db"] == pytest.approx(_reference_sqnr_db(onnx_logits, student, 2), abs=1e-6)
    assert metrics["logit_sqnr_db_all"] == pytest.approx(_reference_sqnr_db(onnx_logits, student, 0), abs=1e-6)
    assert metrics["logit_sqnr_db_all"] < LOGIT_SQNR_GATE_DB < metrics["logit_sqnr_db"]


def test_equal_logits_have_infinite_sqnr_and_pass():
    _, student, labels = _synthetic()
    metrics, failure = parity_gate(student.copy(), student, labels)
    assert failure is None and metrics["logit_sqnr_db"] == math.inf and metrics["max_abs_logit_diff"] == 0.0


@pytest.fixture(scope="module")
def w4_resnet(digits, tmp_path_factory):
    bundle, train, val = digits
    torch.manual_seed(0)
    teacher = models.create("tiny_resnet", **bundle.model_kwargs(), width=4)
    # trained briefly: an untrained net barely reacts to any one weight (a changed weight moves its logits ~50 dB down)
    fit(Supervised(teacher), train, TrainSpec(epochs=2, lr=3e-3), phase="teacher", show_progress=False)
    student = prepare(teacher, {"weight_bits": 4, "act_bits": 4, "init": "minmax", "calibration_batches": 2},
                      calibration_data=train)
    path = tmp_path_factory.mktemp("w4_resnet") / "model.onnx"
    return student, path, export_onnx(student, path, bundle.train_x[:1], verify_on=val)


def test_an_honest_export_passes_with_room_and_reports_the_figure(w4_resnet):
    _, _, info = w4_resnet
    assert info["parity_checked"] is True and info["logit_sqnr_gate_db"] == LOGIT_SQNR_GATE_DB
    assert info["logit_sqnr_db"] >= LOGIT_SQNR_GATE_DB + 60  # the student's integers, to float precision


def test_an_int8_weight_moved_by_three_grid_steps_fails_the_gate(w4_resnet, digits, tmp_path):
    student, path, _ = w4_resnet
    _, _, val = digits
    model = onnx.load(str(path))
    index, tensor = next((i, t) for i, t in enumerate(model.graph.initializer) if t.name == "layer1.0.conv1.weight_quantized")
    ints = numpy_helper.to_array(tensor).copy()
    step = 127 // 7  # a 4-bit weight grid is stored stretched by weight_int_multiplier = 127 // 7
    flat = ints.reshape(-1)
    position = int(np.argmax(np.abs(flat)))
    flat[position] -= np.sign(flat[position]) * 3 * step  # three grid steps towards zero (measured: 14 dB)
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(ints, tensor.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(ExportError, match=r"parity gate failed: logit SQNR [0-9.]+ dB < 40 dB.*"
                                          r"first diverging layer: 'layer1\.0\.conv1'") as caught:
        verify_onnx(broken, student, val)
    assert caught.value.metrics["logit_sqnr_db"] < LOGIT_SQNR_GATE_DB


def test_without_data_the_export_says_parity_was_not_checked(w4_resnet, digits, tmp_path):
    student, _, _ = w4_resnet
    bundle, _, _ = digits
    info = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])
    assert info["parity_checked"] is False and "agreement_with_student" not in info and "logit_sqnr_db" not in info
    section = export_all(student, bundle.train_x[:4], None, onnx_path=tmp_path / "out" / "model.onnx",
                         latency_budget_s=0.01)
    assert section["onnx"]["parity_checked"] is False and "logit_sqnr_db" not in section["onnx"]
    assert "parity    not checked (no validation data)" in format_export_summary(section)
