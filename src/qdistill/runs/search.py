"""``qdistill search``: the smallest student (fewest bits) that meets an accuracy target.

Candidates are tried as a binary search over the bit-width ladder, smallest first in order, on the
assumption that more bits never lose accuracy. A candidate meets the target on the validation
split; the accuracy each candidate reports is measured on the test split, which no choice saw. Every candidate's outputs are kept under
``DIR/candidates/<name>/``, and the best student so far is saved to ``DIR`` as soon as it is
found, so a search that is stopped - or that never meets its target - still leaves a usable result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdistill.evaluate import evaluate
from qdistill.recipe import Recipe
from qdistill.runs.deploy import export_outputs
from qdistill.runs.recipe_run import run_recipe, write_html_report
from qdistill.runs.rundir import RunDir, output_dir
from qdistill.runs.stages import RunData, obtain_teacher, prepare_data
from qdistill.runs.student import Result


@dataclass
class SearchState:
    """What the search has tried, and the best result so far."""

    target: float
    teacher_accuracy: float
    tried: dict[int, dict[str, Any]] = field(default_factory=dict)
    results: dict[int, Result] = field(default_factory=dict)
    chosen: int | None = None


def candidate_name(weight_bits: int, act_bits: int) -> str:
    """Folder name of one candidate, e.g. ``w4a8``."""
    return f"w{weight_bits}a{act_bits}"


def _try(recipe: Recipe, candidate: list[int], state: SearchState, run: RunDir, data: RunData, teacher,
         show_progress: bool):
    weight_bits, act_bits = candidate
    overrides = [f"quant.weight_bits={weight_bits}", f"quant.act_bits={act_bits}",
                 f"train.target_accuracy={state.target}"]  # stop training once the target is met (on validation)
    started = time.perf_counter()
    result = run_recipe(recipe.with_overrides(overrides), run.candidate(candidate_name(*candidate)).path,
                        data=data, teacher=teacher, show_progress=show_progress, export=False)
    student = result.report["student"]
    val_accuracy = evaluate(result.student, data.val, data.bundle.num_classes)["accuracy"]
    return result, {"weight_bits": weight_bits, "act_bits": act_bits, "val_accuracy": val_accuracy,
                    "accuracy": student["accuracy"], "size_bytes": student["size_bytes"],
                    "met_target": val_accuracy >= state.target, "epochs": len(result.report["history"]),
                    "seconds": round(time.perf_counter() - started, 2)}


def _search_section(state: SearchState, candidates: list[list[int]]) -> dict[str, Any]:
    tried = [state.tried[index] for index in sorted(state.tried)]
    chosen = state.tried[state.chosen] if state.chosen is not None else None
    return {"target_accuracy": state.target, "teacher_accuracy": state.teacher_accuracy,
            "ladder": candidates, "candidates": tried, "chosen": chosen,
            "target_met": bool(chosen and chosen["met_target"])}


def _publish(index: int, state: SearchState, candidates, run: RunDir, data: RunData, teacher) -> None:
    """Save the chosen candidate as the search's result in the run folder (it may be replaced later)."""
    state.chosen = index
    result = state.results[index]
    result.report["search"] = _search_section(state, candidates)
    result.save(run.path)
    write_html_report(result, data, run, teacher)


def run_search(recipe: Recipe, out: str | Path, show_progress: bool = True, echo=print) -> dict[str, Any]:
    """Run the search described by ``recipe.search``; returns report.json's ``search`` section."""
    with output_dir(out) as run:
        return _search(recipe, run, show_progress, echo)


def _search(recipe: Recipe, run: RunDir, show_progress: bool, echo) -> dict[str, Any]:
    data = prepare_data(recipe)
    teacher, _ = obtain_teacher(recipe, data, run, resume=False, show_progress=show_progress, reuse_cached=True)
    teacher_accuracy = evaluate(teacher, data.val, data.bundle.num_classes)["accuracy"]
    target = recipe.search.target_accuracy or teacher_accuracy - recipe.search.max_accuracy_drop / 100.0
    state = SearchState(target=target, teacher_accuracy=teacher_accuracy)
    candidates = sorted(recipe.search.candidates, key=lambda bits: (bits[0], bits[1]))
    echo(f"teacher accuracy {teacher_accuracy:.4f}; target {target:.4f}; ladder {candidates}")
    low, high = 0, len(candidates) - 1
    while low <= high:
        middle = (low + high) // 2
        state.results[middle], state.tried[middle] = _try(recipe, candidates[middle], state, run, data, teacher,
                                                          show_progress)
        row = state.tried[middle]
        echo(f"{candidate_name(*candidates[middle])}: validation accuracy {row['val_accuracy']:.4f} "
             f"{'meets' if row['met_target'] else 'misses'} the target ({row['seconds']} s)")
        if row["met_target"]:
            _publish(middle, state, candidates, run, data, teacher)
            high = middle - 1
        else:
            low = middle + 1
    if state.chosen is None:  # nothing met the target: keep the most accurate student, and say so
        _publish(max(state.tried, key=lambda index: state.tried[index]["val_accuracy"]), state, candidates, run, data,
                 teacher)
    return _finish(state, candidates, run, data, teacher)


def _finish(state: SearchState, candidates, run: RunDir, data: RunData, teacher) -> dict[str, Any]:
    result = state.results[state.chosen]
    if result.recipe.export.onnx or result.recipe.export.packed:
        result.report.update(export_outputs(result.student, result.recipe, data, run))
    result.report["search"] = _search_section(state, candidates)
    result.save(run.path)
    write_html_report(result, data, run, teacher)
    return result.report["search"]
