"""``search``: the smallest candidate meeting the target is chosen and saved; misses keep the best."""

from __future__ import annotations

import json

import qdistill as qd
from qdistill.runs.search import run_search
from qdistill.runs.stages import prepare_data

BASE = {"model": {"name": "mnist_cnn"}, "data": {"name": "digits", "batch_size": 64},
        "train": {"epochs": 1, "lr": 2e-3}, "teacher_train": {"epochs": 3, "lr": 3e-3},
        "export": {"onnx": False, "packed": False}}


def test_search_picks_smallest_meeting_candidate(tmp_path):
    recipe = qd.Recipe(**BASE, search={"candidates": [[8, 8], [2, 2], [4, 4]], "target_accuracy": 0.5})
    section = run_search(recipe, tmp_path, show_progress=False, echo=lambda *_: None)
    assert section["ladder"] == [[2, 2], [4, 4], [8, 8]]
    assert [(row["weight_bits"], row["act_bits"]) for row in section["candidates"]] == [(2, 2), (4, 4)]
    assert section["target_met"] and section["chosen"]["weight_bits"] == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["search"] == section and report["recipe"]["quant"]["weight_bits"] == 2
    assert report["student"]["weight_bits"]["min"] == 2  # the middle layers; first and last stay at 8 bits
    assert (tmp_path / "candidates" / "w4a4" / "report.json").is_file()
    data = prepare_data(qd.Recipe(**BASE))
    student = qd.load(tmp_path)
    # chosen on validation, reported on test: each figure is what the saved student scores on its split
    assert qd.evaluate(student, data.val)["accuracy"] == section["chosen"]["val_accuracy"]
    assert qd.evaluate(student, data.test)["accuracy"] == section["chosen"]["accuracy"] == report["student"]["accuracy"]


def test_unreachable_target_keeps_most_accurate(tmp_path):
    recipe = qd.Recipe(**BASE, search={"candidates": [[2, 2], [8, 8]], "target_accuracy": 1.0})
    section = run_search(recipe, tmp_path, show_progress=False, echo=lambda *_: None)
    assert not section["target_met"]
    best = max(section["candidates"], key=lambda row: row["val_accuracy"])  # chosen on validation, never on test
    assert section["chosen"] == best
    assert (tmp_path / "student.safetensors").is_file()
