"""The real ``qdistill`` command end to end on digits, and its errors (exit 2, one line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qdistill as qd
from qdistill.runs.stages import prepare_data

TINY = {
    "model": {"name": "mnist_cnn"},
    "data": {"name": "digits", "batch_size": 32},
    "quant": {"weight_bits": 4, "act_bits": 4},
    "train": {"epochs": 2, "lr": 1.0e-3},
    "teacher_train": {"epochs": 3, "lr": 2.0e-3},
    "export": {"onnx": False, "packed": False},
}


def qdistill(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdistill.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_then_eval(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    done = qdistill("run", str(recipe), "--out", str(out), "--no-progress", "train.epochs=1")
    assert done.returncode == 0, done.stderr
    assert {"report.json", "student.safetensors", "recipe.yaml", "teacher.safetensors"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["train"]["epochs"] == 1  # the override was applied and recorded
    assert qd.Recipe.from_yaml(out / "recipe.yaml").train.epochs == 1
    assert report["student"]["accuracy"] > 0.7 and report["teacher"]["accuracy"] > 0.7
    assert len(report["teacher"]["history"]) == 3
    # metrics come from the held-out test split; validation numbers stay in the history
    assert report["evaluated_on"] == "test"
    assert report["data"] == {"train_samples": 1150, "val_samples": 288, "test_samples": 359, "labelled_samples": 1150,
                              "unlabeled_samples": 0}
    assert all(0 < record["val_accuracy"] <= 1 for record in report["history"])
    evaluated = qdistill("eval", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{report['student']['accuracy']:.4f}" in evaluated.stdout
    assert qd.evaluate(qd.load(out), _test_loader())["accuracy"] == report["student"]["accuracy"]


def _test_loader():
    return prepare_data(qd.Recipe(**TINY)).test


@pytest.mark.parametrize("change, message", [
    ({"quant": {"weight_bits": 9}}, "recipe field quant.weight_bits: 9 is not allowed"),
    ({"quant": {"bits": 4}}, "unknown key 'quant.bits'; allowed keys in quant: weight_bits, act_bits"),
    ({"train": {"epochs": "five"}}, "recipe field train.epochs: 'five' is not allowed"),
    ({"data": {"name": "cifar"}}, "recipe field data.name: 'cifar' is not allowed"),
])
def test_bad_recipe_exit_2_one_line(tmp_path, change, message):
    recipe = write_recipe(tmp_path / "bad.yaml", {**TINY, **change})
    done = qdistill("run", str(recipe), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_bad_override_and_missing_file(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    done = qdistill("run", str(recipe), "train.epochs")
    assert done.returncode == 2 and "expected key.sub=value" in done.stderr
    done = qdistill("run", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_debug_shows_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", {**TINY, "quant": {"weight_bits": 9}})
    done = qdistill("--debug", "run", str(recipe))
    assert done.returncode == 2 and "Traceback" in done.stderr


def test_help_lists_defaults():
    for command in ("demo", "run", "eval", "export"):
        done = qdistill(command, "--help")
        assert done.returncode == 0 and "usage: qdistill" in done.stdout
    assert "out/demo" in qdistill("demo", "--help").stdout


@pytest.mark.slow
def test_demo_quick(tmp_path):
    done = qdistill("demo", "--quick", "--no-progress", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "demo.json").read_text())
    keys = {"run", "weight_bits", "act_bits", "kd", "labelled", "unlabeled", "params", "size_bytes", "accuracy",
            "kd_gain_pp", "f1_macro", "agreement_with_teacher", "seconds"}
    assert [row["run"] for row in rows][0] == "teacher" and len(rows) == 13
    assert all(set(row) == keys for row in rows)
    for row in rows[1:]:
        assert (tmp_path / row["run"] / "report.json").is_file()
        assert row["accuracy"] > 0.85
    # the 10% rows keep labels on 10% of the 3200 training images per class (320); only KD uses the rest
    counts = {row["run"]: (row["labelled"], row["unlabeled"]) for row in rows}
    assert counts["w4a4_kd"] == (3200, 0) and counts["w4a4_10pct_qat"] == (320, 0)
    assert counts["w4a4_10pct_kd"] == counts["small_w4a4_10pct_kd"] == (320, 2880)
