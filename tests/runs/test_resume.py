"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

RECIPE = {
    "model": {"name": "mnist_cnn"},
    "data": {"name": "digits", "batch_size": 64},
    "quant": {"weight_bits": 4, "act_bits": 4},
    "train": {"epochs": 2, "lr": 1.0e-3, "checkpoint_every_steps": 5},
    "teacher_train": {"epochs": 2, "lr": 2.0e-3, "checkpoint_every_steps": 6},
    "export": {"onnx": False, "packed": False},
}
COMMAND = [sys.executable, "-m", "qdistill.cli", "run"]


def _run(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, str(recipe), "--out", str(out), "--no-progress", *extra], capture_output=True,
                          text=True, timeout=600)


def _kill_when(recipe: Path, out: Path, ready) -> None:
    process = subprocess.Popen([*COMMAND, str(recipe), "--out", str(out), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            meta = out / "checkpoint" / "meta.json"
            try:
                if meta.is_file() and ready(json.loads(meta.read_text())):
                    break
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.02)
        assert process.poll() is None, "the run finished before it could be killed"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    done = _run(recipe, folder / "out")
    assert done.returncode == 0, done.stderr
    return recipe, folder / "out"


TIMING_KEYS = {"seconds"}  # wall-clock durations: the only part of a report a resume may change


def _without_timings(value):
    if isinstance(value, dict):
        return {key: _without_timings(item) for key, item in value.items() if key not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(item) for item in value]
    return value


def _assert_same(out: Path, reference_out: Path) -> None:
    assert (out / "student.safetensors").read_bytes() == (reference_out / "student.safetensors").read_bytes()
    report, expected = (json.loads((path / "report.json").read_text()) for path in (out, reference_out))
    assert "history" in expected["teacher"]  # the reference trained its teacher here
    assert _without_timings(report) == _without_timings(expected)  # the whole report, teacher history included


def test_sigkill_mid_student_epoch_then_resume_is_bit_identical(reference, tmp_path):
    recipe, reference_out = reference
    out = tmp_path / "out"
    _kill_when(recipe, out, lambda meta: meta["phase"] == "student" and meta["epoch"] == 1 and meta["step_in_epoch"] > 0)
    assert not (out / "report.json").exists() and not (out / "student.safetensors").exists()
    done = _run(recipe, out, "--resume")
    assert done.returncode == 0, done.stderr
    _assert_same(out, reference_out)


def test_sigkill_during_teacher_training_then_resume(reference, tmp_path):
    recipe, reference_out = reference
    out = tmp_path / "out"
    _kill_when(recipe, out, lambda meta: meta["phase"] == "teacher" and meta["global_step"] >= 6)
    assert not (out / "teacher.safetensors").exists()
    done = _run(recipe, out, "--resume")
    assert done.returncode == 0, done.stderr
    assert (out / "teacher.safetensors").read_bytes() == (reference_out / "teacher.safetensors").read_bytes()
    _assert_same(out, reference_out)


def test_resume_refuses_checkpoint_of_another_recipe(reference, tmp_path):
    recipe, reference_out = reference
    out = tmp_path / "out"
    _kill_when(recipe, out, lambda meta: meta["phase"] == "student")
    done = _run(recipe, out, "--resume", "train.lr=0.01")
    assert done.returncode == 2
    assert "made by a different recipe" in done.stderr and done.stderr.strip().count("\n") == 0
