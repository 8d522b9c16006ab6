"""``qdistill search``: uniform bit widths, or per-layer widths under a budget; a Pareto front.

``search.mode: uniform`` tries the bit widths of ``search.candidates`` as a binary search over
the ladder, smallest first, on the assumption that more bits never lose accuracy, and keeps the
smallest candidate that meets the accuracy target.

``search.mode: mixed`` (the default once ``search.budget`` is given):

1. **Sensitivity** (``runs/sensitivity.py``): the rise of the KD loss when one layer alone is at
   a narrower weight or activation width, measured on held-out training batches.
2. **Allocation** (``quant/allocate.py``): per-layer widths from ``search.weight_bits`` and
   ``search.act_bits`` minimising the summed sensitivity within a size, solved exactly as an
   integer program, at 24 sizes evenly spaced from the budget's ``size_bytes`` (default: every
   layer at the widest widths) down to the smallest size the widths allow. Of the distinct
   allocations, ``search.points`` are trained, evenly spread, the one at the budget always.
3. **Training** with QAT + KD, like any run; each candidate's ONNX Runtime latency is measured
   (batch 1, one thread) when ``search.latency`` is true.
4. **Choice** on the validation split: with an accuracy target, the smallest candidate that
   meets it (a binary search over the sizes); otherwise the most accurate one within the budget.
   ``latency_us`` is checked on the measured latency (widths below 8 bits run on the same int8
   kernels in ONNX Runtime, so the allocation cannot predict it per layer).

Which widths are allowed where: ONNX export keeps every width from 2 to 8 bits integer (weights
are int8 initializers holding the narrower grid, activations int8 QuantizeLinear with an integer
Clip for narrower grids, and the export checks that each quantized layer and op runs on an integer
kernel), so widths are offered exactly on the layers and ops ``prepare`` quantizes
(``layer_table``) and never on what stays float; a candidate whose export still fails that check
gets no latency, records ``export_error`` and cannot meet a latency budget.

The accuracy each candidate reports as ``accuracy`` is measured on the test split, which no
choice saw. Every candidate's outputs are kept under ``DIR/candidates/<name>/``; after each
candidate the best student so far is saved to ``DIR`` with the whole search section, so a search
that is stopped (Ctrl-C) or that never meets its budget still leaves a usable result.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qdistill.errors import ExportError, RecipeError
from qdistill.evaluate import evaluate, theoretical_size_bytes
from qdistill.export.latency import first_samples, measure_latency
from qdistill.export.onnx import export_onnx
from qdistill.models import build_model
from qdistill.quant import is_quantized, prepare
from qdistill.quant.allocate import allocate
from qdistill.recipe import Recipe
from qdistill.report.search_page import pareto_flags
from qdistill.runs.deploy import export_outputs
from qdistill.runs.recipe_run import run_recipe, write_html_report
from qdistill.runs.rundir import RunDir, output_dir
from qdistill.runs.sensitivity import layer_sensitivity, widest_spec
from qdistill.runs.stages import RunData, build_student, obtain_teacher, prepare_data, run_kind
from qdistill.runs.student import Result

GRID = 24  # size budgets allocated from the top down to the smallest; search.points distinct ones are trained
LATENCY_SAMPLES = 16
LATENCY_BUDGET_S = 0.1  # per number, split over the rounds: enough for a tiny model's median


@dataclass
class Plan:
    """One candidate to train: its folder name, its recipe and what the search knew of it beforehand."""

    name: str
    recipe: Recipe
    info: dict[str, Any]


@dataclass
class SearchState:
    """What the search has tried, and the best result so far."""

    target: float | None
    teacher_accuracy: float
    section: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    chosen: str | None = None


def candidate_name(weight_bits: int, act_bits: int) -> str:
    """Folder name of one uniform candidate, e.g. ``w4a8``."""
    return f"w{weight_bits}a{act_bits}"


def run_search(recipe: Recipe, out: str | Path, show_progress: bool = True, echo=print) -> dict[str, Any]:
    """Run the search described by ``recipe.search``; returns report.json's ``search`` section.

    Example:
        >>> section = run_search(Recipe.from_yaml("recipes/mnist_search_size.yaml"), "out/search")  # doctest: +SKIP
        >>> [row["name"] for row in section["candidates"] if row["pareto"]]                        # doctest: +SKIP
    """
    with output_dir(out) as run:
        return _search(recipe, run, show_progress, echo)


def _search(recipe: Recipe, run: RunDir, show_progress: bool, echo) -> dict[str, Any]:
    data = prepare_data(recipe)
    sizes = size_model(recipe, data) if recipe.search.mode == "mixed" else None  # a budget too small fails here, untrained
    teacher, _ = obtain_teacher(recipe, data, run, resume=False, show_progress=show_progress, reuse_cached=True)
    if run_kind(recipe, teacher) == "embedding":  # every target and choice below is an accuracy
        raise RecipeError("search: the model outputs embeddings, which have no accuracy to target; search works on "
                          "class logits: train embedding students with qdistill run at the bits you want")
    teacher_accuracy = evaluate(teacher, data.val, data.bundle.num_classes)["accuracy"]
    spec = recipe.search
    if spec.mode == "uniform":
        plans, section = _uniform_plans(recipe)
        target = _accuracy_target(recipe, teacher_accuracy)
    else:
        plans, section = _mixed_plans(recipe, data, teacher, sizes, echo)
        target = _accuracy_target(recipe, teacher_accuracy) if _targets_accuracy(recipe) else None
    section = {"mode": spec.mode, "target_accuracy": target, "teacher_accuracy": teacher_accuracy, **section}
    state = SearchState(target=target, teacher_accuracy=teacher_accuracy, section=section)
    echo(f"teacher accuracy {teacher_accuracy:.4f}; " + (f"target {target:.4f}; " if target is not None else "")
         + f"{len(plans)} candidates: {', '.join(plan.name for plan in plans)}")
    try:
        _explore(plans, state, run, data, teacher, show_progress, echo)
    except KeyboardInterrupt:
        state.section["interrupted"] = True
        if state.chosen is not None:
            _save(state, run)  # the best so far stays in place, and says the search did not finish
        raise
    return _finish(state, run, data, teacher)


def _targets_accuracy(recipe: Recipe) -> bool:
    """Whether a mixed search has an accuracy target: given, or implied by giving no size or latency budget."""
    budget = recipe.search.budget
    return budget is None or budget.target_accuracy is not None or recipe.search.target_accuracy is not None


def _accuracy_target(recipe: Recipe, teacher_accuracy: float) -> float:
    budget = recipe.search.budget
    given = budget.target_accuracy if budget is not None and budget.target_accuracy is not None else None
    given = given if given is not None else recipe.search.target_accuracy
    return given if given is not None else teacher_accuracy - recipe.search.max_accuracy_drop / 100.0


def _uniform_plans(recipe: Recipe) -> tuple[list[Plan], dict[str, Any]]:
    ladder = sorted(recipe.search.candidates, key=lambda bits: (bits[0], bits[1]))
    plans = [Plan(candidate_name(w, a), recipe.with_overrides([f"quant.weight_bits={w}", f"quant.act_bits={a}"]),
                  {"weight_bits": w, "act_bits": a}) for w, a in ladder]
    return plans, {"ladder": ladder}


@dataclass
class SizeModel:
    """The theoretical size as a function of the weight widths: ``fixed_bits + sum(params[layer] * bits)``.

    ``fixed_bits`` (biases, scales, float layers) is the widest student's size in bytes times 8 less
    its weights' bits: the size rounds bits up to bytes, so this may count up to 7 bits too many,
    which keeps every allocation within its budget.
    """

    params: dict[str, int]
    fixed_bits: int

    def bytes(self, weight_bits: dict[str, int]) -> int:
        """The size in bytes with ``weight_bits`` per layer."""
        return _bytes(self.fixed_bits + sum(self.params[name] * bits for name, bits in weight_bits.items()))


def size_model(recipe: Recipe, data: RunData) -> SizeModel:
    """The student's ``SizeModel`` (from its architecture only); a size budget below the smallest size is a ``RecipeError``."""
    spec = recipe.search
    float_student = build_student(recipe, data) or build_model(recipe.model, data.model_kwargs)
    reference = prepare(float_student, widest_spec(recipe.quant, spec.weight_bits, spec.act_bits))
    params = {name: module.weight.numel() for name, module in reference.named_modules() if is_quantized(module)}
    sizes = SizeModel(params, 8 * theoretical_size_bytes(reference) - sum(params.values()) * max(spec.weight_bits))
    smallest = sizes.bytes({name: min(spec.weight_bits) for name in params})
    budget = spec.budget.size_bytes if spec.budget is not None else None
    if budget is not None and budget < smallest:
        raise RecipeError(f"search.budget.size_bytes: {budget} is below the smallest size the allowed widths reach "
                          f"({smallest} bytes, every weight at {min(spec.weight_bits)} bits); allowed: at least {smallest}")
    return sizes


def _mixed_plans(recipe: Recipe, data: RunData, teacher: nn.Module, sizes: SizeModel,
                 echo) -> tuple[list[Plan], dict[str, Any]]:
    spec = recipe.search
    float_student = build_student(recipe, data) or copy.deepcopy(teacher)
    sensitivity = layer_sensitivity(teacher, float_student, recipe, data.train, spec.weight_bits, spec.act_bits,
                                    spec.sensitivity_batches)
    echo(f"sensitivity of {len(sensitivity['layers'])} layers and ops measured in {sensitivity['seconds']} s")
    groups = _allocation_groups(sensitivity)
    top = spec.budget.size_bytes if spec.budget is not None and spec.budget.size_bytes is not None else \
        sizes.bytes({name: max(spec.weight_bits) for name in sizes.params})
    grid = _ladder(top, sizes.bytes({name: min(spec.weight_bits) for name in sizes.params}), max(spec.points, GRID))
    distinct: dict[tuple, tuple[int, dict[str, int]]] = {}
    for budget in grid:  # largest first: each allocation is kept at the largest budget that gives it
        chosen = allocate(groups, 8 * budget - sizes.fixed_bits, what="search.budget.size_bytes (allocatable bits)")
        distinct.setdefault(tuple(sorted(chosen.items())), (budget, chosen))
    picked = spread(list(distinct.values()), spec.points)
    budgets = [budget for budget, _ in picked]
    plans = [_mixed_plan(recipe, index, budget, chosen, groups, sizes)
             for index, (budget, chosen) in enumerate(picked, start=1)]
    plans.sort(key=lambda plan: plan.info["predicted_size_bytes"])
    section = {"budget": spec.budget.model_dump() if spec.budget is not None else None,
               "weight_bits_allowed": spec.weight_bits, "act_bits_allowed": spec.act_bits,
               "ladder": budgets, "sensitivity": sensitivity}
    return plans, section


def _bytes(bits: float) -> int:
    return int(math.ceil(bits / 8))


def _ladder(top: int, low: int, steps: int) -> list[int]:
    """``steps`` sizes in bytes, evenly spaced from ``top`` down to ``low``."""
    if steps == 1 or top <= low:
        return [top]
    step = (top - low) / (steps - 1)
    return [int(round(top - index * step)) for index in range(steps)]


def spread(items: list[Any], count: int) -> list[Any]:
    """``count`` of ``items`` evenly spread, the first always among them (all when there are no more).

    Example:
        >>> spread(list("abcdefg"), 3), spread(list("ab"), 3), spread(list("abc"), 1)
        (['a', 'd', 'g'], ['a', 'b'], ['a'])
    """
    if len(items) <= count:
        return items
    if count == 1:
        return items[:1]
    return [items[round(index * (len(items) - 1) / (count - 1))] for index in range(count)]


def _allocation_groups(sensitivity: dict[str, Any]) -> dict[str, dict[int, tuple[float, float]]]:
    """The integer program's groups: ``layer`` (weight widths) and ``layer@act`` (activation widths),
    each width with (sensitivity, bits it stores)."""
    groups: dict[str, dict[int, tuple[float, float]]] = {}
    for name, entry in sensitivity["layers"].items():
        if "weight" in entry:
            groups[name] = {int(bits): (rise, entry["params"] * int(bits)) for bits, rise in entry["weight"].items()}
        if "act" in entry:
            groups[f"{name}@act"] = {int(bits): (rise, 0.0) for bits, rise in entry["act"].items()}
    return groups


def _mixed_plan(recipe: Recipe, index: int, budget: int, chosen: dict[str, int], groups, sizes: SizeModel) -> Plan:
    per_layer: dict[str, dict[str, int | None]] = {}
    for group, bits in chosen.items():
        layer, _, act = group.partition("@")
        per_layer.setdefault(layer, {"weight_bits": None, "act_bits": None})["act_bits" if act else "weight_bits"] = bits
    overrides = {name: {key: value for key, value in row.items() if value is not None} for name, row in per_layer.items()}
    data = recipe.to_dict()
    data["quant"] = widest_spec(recipe.quant, recipe.search.weight_bits, recipe.search.act_bits,
                                overrides).model_dump(mode="json")
    weights = {name: row["weight_bits"] for name, row in per_layer.items() if row["weight_bits"] is not None}
    info = {"allocation_budget_bytes": budget, "predicted_size_bytes": sizes.bytes(weights),
            "predicted_sensitivity": sum(groups[group][option][0] for group, option in chosen.items())}
    return Plan(f"mixed{index}", Recipe.from_dict(data), info)


def _explore(plans: list[Plan], state: SearchState, run: RunDir, data: RunData, teacher, show_progress, echo) -> None:
    """Train the plans: a binary search over sizes with an accuracy target, else every plan, largest first."""
    if state.target is not None:
        low, high = 0, len(plans) - 1
        while low <= high:
            middle = (low + high) // 2
            row = _try(plans[middle], state, run, data, teacher, show_progress, echo)
            low, high = (low, middle - 1) if row["met_target"] else (middle + 1, high)
    else:
        for plan in reversed(plans):
            _try(plan, state, run, data, teacher, show_progress, echo)


def _try(plan: Plan, state: SearchState, run: RunDir, data: RunData, teacher, show_progress, echo) -> dict[str, Any]:
    recipe = plan.recipe
    if state.target is not None:  # stop training once the target is met (on validation)
        recipe = recipe.with_overrides([f"train.target_accuracy={state.target}"])
    started = time.perf_counter()
    result = run_recipe(recipe, run.candidate(plan.name).path, data=data, teacher=teacher,
                        show_progress=show_progress, export=False)
    student = result.report["student"]
    row = {"name": plan.name, **plan.info,
           "val_accuracy": evaluate(result.student, data.val, data.bundle.num_classes)["accuracy"],
           "accuracy": student["accuracy"], "size_bytes": student["size_bytes"],
           "per_layer": {name: {"weight_bits": layer["weight_bits"], "act_bits": layer["act_bits"]}
                         for name, layer in student["per_layer"].items()},
           "epochs": len(result.report["history"])}
    if recipe.search.latency:
        row.update(_latency(result.student, data))
    if state.target is not None:
        row["met_target"] = row["val_accuracy"] >= state.target
    row["within_budget"] = _within_budget(row, recipe)
    row["seconds"] = round(time.perf_counter() - started, 2)
    state.rows.append(row)
    state.results[plan.name] = result
    echo(_progress_line(row, state))
    _choose(state)
    _save(state, run)  # report.html is drawn once, at the end (it takes longer than saving the student)
    return row


def _progress_line(row: dict[str, Any], state: SearchState) -> str:
    latency = f", {row['latency_us']} us" if row.get("latency_us") is not None else ""
    verdict = ("meets" if row["met_target"] else "misses") + " the target" if state.target is not None else \
        ("within" if row["within_budget"] else "outside") + " the budget"
    return (f"{row['name']}: {row['size_bytes']} bytes{latency}, validation accuracy {row['val_accuracy']:.4f} "
            f"{verdict} ({row['seconds']} s)")


def _latency(student: nn.Module, data: RunData) -> dict[str, Any]:
    """The candidate's ONNX Runtime latency per sample (batch 1, one thread), from a temporary int8 export."""
    example = next(iter(data.val))  # a batch: the export takes its first sample's inputs
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "candidate.onnx"
        try:
            export_onnx(student, path, example)
        except ExportError as error:
            return {"latency_us": None, "export_error": str(error)}
        measured = measure_latency({"int8": path}, None, first_samples(data.val, LATENCY_SAMPLES), batches=(1,),
                                   budget_s=LATENCY_BUDGET_S)
    return {"latency_us": measured["1"]["int8"]["batch1"]}


def _within_budget(row: dict[str, Any], recipe: Recipe) -> bool:
    budget = recipe.search.budget
    if budget is None:
        return True
    if budget.size_bytes is not None and row["size_bytes"] > budget.size_bytes:
        return False
    return budget.latency_us is None or (row.get("latency_us") is not None and row["latency_us"] <= budget.latency_us)


def _choose(state: SearchState) -> None:
    """The choice, on validation: the smallest meeting the target (or most accurate within budget); failing that the most accurate."""
    rows = state.rows
    if state.target is not None:
        fitting = [row for row in rows if row["met_target"] and row["within_budget"]]
        best = min(fitting, key=lambda row: (row["size_bytes"], -row["val_accuracy"])) if fitting else None
    else:
        fitting = [row for row in rows if row["within_budget"]]
        best = max(fitting, key=lambda row: (row["val_accuracy"], -row["size_bytes"])) if fitting else None
    if best is None:
        best = max(rows, key=lambda row: (row["val_accuracy"], -row["size_bytes"]))
    state.chosen = best["name"]


def _section(state: SearchState) -> dict[str, Any]:
    rows = sorted(state.rows, key=lambda row: (row["size_bytes"], row["name"]))
    objectives = ["size_bytes"] + (["latency_us"] if rows and all(row.get("latency_us") is not None for row in rows) else [])
    flags = pareto_flags([[row[key] for key in objectives] for row in rows], [row["val_accuracy"] for row in rows])
    rows = [{**row, "pareto": flag} for row, flag in zip(rows, flags, strict=True)]
    chosen = next(row for row in rows if row["name"] == state.chosen)
    met = chosen["within_budget"] and (state.target is None or chosen["met_target"])
    return {**state.section, "pareto_objectives": [*objectives, "val_accuracy"], "candidates": rows,
            "chosen": chosen, "target_met": bool(met), "budget_met": bool(met)}


def _save(state: SearchState, run: RunDir, html: bool = False, data: RunData | None = None, teacher=None) -> None:
    """Save the chosen candidate, with the search so far, as the search's result in the run folder."""
    result = state.results[state.chosen]
    result.report["search"] = _section(state)
    result.save(run.path)
    if html:
        write_html_report(result, data, run, teacher)


def _finish(state: SearchState, run: RunDir, data: RunData, teacher) -> dict[str, Any]:
    result = state.results[state.chosen]
    if result.recipe.export.onnx or result.recipe.export.packed:
        result.report.update(export_outputs(result.student, result.recipe, data, run))
    _save(state, run, html=True, data=data, teacher=teacher)
    return result.report["search"]
