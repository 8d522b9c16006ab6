"""``search``: the smallest candidate meeting the target is chosen and saved; misses keep the best."""

from __future__ import annotations

import json

import qdistill as qd
from qdistill.search import run_search

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
    assert report["search"] == section and report["student"]["weight_bits"] == 2
    assert (tmp_path / "candidates" / "w4a4" / "report.json").is_file()
    assert qd.evaluate(qd.load(tmp_path), _val())["accuracy"] == section["chosen"]["accuracy"]


def test_unreachable_target_keeps_most_accurate(tmp_path):
    recipe = qd.Recipe(**BASE, search={"candidates": [[2, 2], [8, 8]], "target_accuracy": 1.0})
    section = run_search(recipe, tmp_path, show_progress=False, echo=lambda *_: None)
    assert not section["target_met"]
    best = max(section["candidates"], key=lambda row: row["accuracy"])
    assert section["chosen"] == best
    assert (tmp_path / "student.safetensors").is_file()


def _val():
    from qdistill.pipeline import prepare_data

    return prepare_data(qd.Recipe(**BASE)).val
