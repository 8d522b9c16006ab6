"""``search.mode: mixed``: sensitivity per layer, the exact allocation under a budget, the Pareto front,
the choice on validation with test reported, and the best student kept when the search is interrupted."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import qdistill as qd
from qdistill.cli import main
from qdistill.errors import RecipeError
from qdistill.runs import search as search_module
from qdistill.runs.search import run_search
from qdistill.runs.stages import prepare_data

BASE = {"model": {"name": "mnist_cnn"}, "data": {"name": "digits", "batch_size": 64},
        "train": {"epochs": 1, "lr": 2e-3}, "teacher_train": {"epochs": 3, "lr": 3e-3},
        "export": {"onnx": False, "packed": False}}
BUDGET = 40000  # bytes; every layer at 8 bits is 54672 bytes on digits, every weight at 2 bits about 13.9 KB
LATENCY = 1.0e6  # microseconds: every candidate fits (the choice under a latency nothing meets is tested on rows)


def _quiet(*_):
    return None


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "search"
    recipe = qd.Recipe(**BASE, search={"budget": {"size_bytes": BUDGET, "latency_us": LATENCY}, "points": 2})
    return out, run_search(recipe, out, show_progress=False, echo=_quiet)


def _min_sensitivity(section, budget_bytes):
    """The least summed sensitivity of any per-layer widths within ``budget_bytes``, by enumeration."""
    layers = section["sensitivity"]["layers"]
    fixed = section["candidates"][0]["size_bytes"] * 8 - sum(
        layers[name]["params"] * widths["weight_bits"] for name, widths in section["candidates"][0]["per_layer"].items())
    names = list(layers)
    best = None
    for weights in itertools.product(*(layers[name]["weight"].items() for name in names)):
        bits = fixed + sum(layers[name]["params"] * int(w) for name, (w, _) in zip(names, weights, strict=True))
        if bits > 8 * budget_bytes:
            continue
        cost = sum(rise for _, rise in weights) + sum(min(layers[name]["act"].values()) for name in names)
        best = cost if best is None else min(best, cost)
    return best


def test_every_candidate_fits_and_the_allocation_is_the_optimum(mixed):
    _, section = mixed
    assert section["mode"] == "mixed" and section["budget"]["size_bytes"] == BUDGET
    assert section["pareto_objectives"] == ["size_bytes", "latency_us", "val_accuracy"]
    assert len(section["candidates"]) == 2
    for row in section["candidates"]:
        assert row["size_bytes"] <= row["allocation_budget_bytes"] <= BUDGET
        assert 0 < row["latency_us"] <= LATENCY and row["within_budget"]
        assert row["size_bytes"] == row["predicted_size_bytes"]  # the allocation's size model is the measured size
        assert {w["weight_bits"] for w in row["per_layer"].values()} <= {2, 4, 8}
        assert {w["act_bits"] for w in row["per_layer"].values()} <= {4, 8}
        # every layer's weight count is a multiple of 8, so bytes round alike for every width and the optimum is exact
        assert row["predicted_sensitivity"] == pytest.approx(_min_sensitivity(section, row["allocation_budget_bytes"]),
                                                             abs=1e-9)
    assert len({json.dumps(row["per_layer"], sort_keys=True) for row in section["candidates"]}) == 2


def test_sensitivity_is_reported_per_layer_and_grows_as_widths_shrink(mixed):
    _, section = mixed
    layers = section["sensitivity"]["layers"]
    assert set(layers) == {"features.0", "features.3", "classifier.2", "classifier.5"}
    for entry in layers.values():
        assert entry["weight"]["8"] == 0.0 and entry["act"]["8"] == 0.0
        assert entry["weight"]["2"] > entry["weight"]["4"]


def test_choice_on_validation_report_on_test_and_pareto_marks(mixed):
    out, section = mixed
    rows = section["candidates"]
    best = max(rows, key=lambda row: row["val_accuracy"])
    assert section["chosen"]["name"] == best["name"] and section["budget_met"]
    for row in rows:  # optimal unless another is no larger, no slower, no less accurate, and better in one
        costs = [(o["size_bytes"], o["latency_us"], -o["val_accuracy"]) for o in rows]
        mine = (row["size_bytes"], row["latency_us"], -row["val_accuracy"])
        beaten = any(c != mine and all(a <= b for a, b in zip(c, mine, strict=True)) for c in costs)
        assert row["pareto"] is not beaten
    report = json.loads((out / "report.json").read_text())
    assert report["search"] == section
    assert {name: {"weight_bits": r["weight_bits"], "act_bits": r["act_bits"]}
            for name, r in report["student"]["per_layer"].items()} == section["chosen"]["per_layer"]
    data = prepare_data(qd.Recipe(**BASE))
    student = qd.load(out)
    assert qd.evaluate(student, data.val)["accuracy"] == section["chosen"]["val_accuracy"]
    assert qd.evaluate(student, data.test)["accuracy"] == section["chosen"]["accuracy"] == report["student"]["accuracy"]
    html = (out / "report.html").read_text()
    assert "Per-layer widths of the chosen student" in html and "KD-loss rise by weight bits" in html
    for row in rows:
        assert (out / "candidates" / row["name"] / "report.json").is_file()


def test_interrupt_leaves_the_best_student_so_far(tmp_path, monkeypatch):
    real = search_module.run_recipe
    calls = []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search_module, "run_recipe", interrupted_second)
    recipe = qd.Recipe(**BASE, search={"budget": {"size_bytes": BUDGET}, "points": 2, "latency": False})
    with pytest.raises(KeyboardInterrupt):
        run_search(recipe, tmp_path, show_progress=False, echo=_quiet)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["search"]["interrupted"] is True and len(report["search"]["candidates"]) == 1
    first = report["search"]["candidates"][0]
    data = prepare_data(qd.Recipe(**BASE))
    assert qd.evaluate(qd.load(tmp_path), data.val)["accuracy"] == first["val_accuracy"] == report["search"]["chosen"]["val_accuracy"]


def test_latency_budget_nothing_meets_keeps_the_most_accurate():
    recipe = qd.Recipe(search={"budget": {"latency_us": 10.0}})
    rows = [{"name": "a", "size_bytes": 10, "latency_us": 12.0, "val_accuracy": 0.8},
            {"name": "b", "size_bytes": 20, "latency_us": 11.0, "val_accuracy": 0.9},
            {"name": "c", "size_bytes": 30, "latency_us": None, "val_accuracy": 0.95, "export_error": "float layer"}]
    for row in rows:
        row["within_budget"] = search_module._within_budget(row, recipe)
    assert [row["within_budget"] for row in rows] == [False, False, False]
    state = search_module.SearchState(target=None, teacher_accuracy=0.97, section={}, rows=rows)
    search_module._choose(state)
    assert state.chosen == "c"  # nothing fits: the most accurate on validation is kept (and budget_met says so)
    rows[0]["latency_us"] = 9.5
    rows[0]["within_budget"] = search_module._within_budget(rows[0], recipe)
    search_module._choose(state)
    assert state.chosen == "a"


def test_budget_below_the_smallest_size_is_a_one_line_error(tmp_path):
    recipe = qd.Recipe(**BASE, search={"budget": {"size_bytes": 1000}})
    with pytest.raises(RecipeError, match=r"^search.budget.size_bytes: 1000 is below the smallest size the allowed widths reach \(\d+ bytes, every weight at 2 bits\); allowed: at least \d+$"):
        run_search(recipe, tmp_path / "run", show_progress=False, echo=_quiet)


def test_cli_prints_the_front(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(qd.Recipe(**BASE, search={"budget": {"target_accuracy": 0.5}, "points": 2,
                                                  "latency": False}).to_yaml())
    assert main(["search", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "mixed" in printed and "meets the target" in printed
    section = json.loads((tmp_path / "out" / "report.json").read_text())["search"]
    meeting = [row for row in section["candidates"] if row["met_target"]]
    assert section["chosen"] == min(meeting, key=lambda row: row["size_bytes"])


@pytest.mark.parametrize("search", [{"mode": "uniform", "budget": {"size_bytes": 5}}, {"budget": {}},
                                    {"weight_bits": [1, 4]}, {"act_bits": [4, 4]},
                                    {"budget": {"latency_us": 5.0}, "latency": False},
                                    {"budget": {"target_accuracy": 0.9}, "target_accuracy": 0.9}])
def test_bad_search_sections_are_one_line_errors(search):
    with pytest.raises(RecipeError, match=r"^recipe field search"):
        qd.Recipe(search=search)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_search_size", "resnet_search_latency"])
def test_shipped_search_recipes_run_end_to_end(name, tmp_path, capsys):
    path = Path(__file__).parents[2] / "recipes" / f"{name}.yaml"
    out = tmp_path / "out"
    code = main(["search", str(path), "--out", str(out), "--no-progress", "train.epochs=1", "teacher_train.epochs=1",
                 "search.points=2"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    budget = report["search"]["budget"]
    for row in report["search"]["candidates"]:
        assert row["latency_us"] > 0 and (budget["size_bytes"] is None or row["size_bytes"] <= budget["size_bytes"])
    assert report["export"]["onnx"]["agreement_with_student"] >= 0.999  # the chosen mixed student exports integer
    assert (out / "model.onnx").is_file() and (out / "report.html").is_file()
