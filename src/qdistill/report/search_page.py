"""The Search section of report.html: size against accuracy of every candidate, the Pareto front, the
choice, and (mixed precision) the chosen student's per-layer widths with each layer's sensitivity.

Example:
    >>> pareto_front([(10, 0.5), (20, 0.9), (30, 0.8)])
    [(10, 0.5), (20, 0.9)]
    >>> pareto_flags([[10], [20], [30]], [0.5, 0.9, 0.8])
    [True, True, False]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qdistill.report import figures
from qdistill.report.html import Section, fmt, note, percent, table

KIB = 1024


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (size, accuracy) that no other point beats on both (smaller or equal size, higher accuracy)."""
    front, best = [], float("-inf")
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def pareto_flags(costs: Sequence[Sequence[float]], accuracies: Sequence[float]) -> list[bool]:
    """For each candidate, whether it is Pareto-optimal: no other candidate has every cost (size,
    latency, ...) smaller or equal and accuracy higher or equal, and is strictly better in one of them.
    Two candidates equal in every figure are both optimal."""
    def dominates(j: int, i: int) -> bool:
        no_worse = all(a <= b for a, b in zip(costs[j], costs[i], strict=True)) and accuracies[j] >= accuracies[i]
        better = any(a < b for a, b in zip(costs[j], costs[i], strict=True)) or accuracies[j] > accuracies[i]
        return no_worse and better
    return [not any(dominates(j, i) for j in range(len(costs)) if j != i) for i in range(len(costs))]


def row_name(row: dict[str, Any]) -> str:
    """A candidate's name (older reports: ``w<bits>a<bits>`` from its uniform widths)."""
    return row.get("name") or f"w{row['weight_bits']}a{row['act_bits']}"


def _chart(search: dict[str, Any]) -> str:
    rows = search["candidates"]
    series = {"validation accuracy (the choice uses it)": [{"x": r["size_bytes"] / KIB, "y": r["val_accuracy"],
                                                            "text": row_name(r)} for r in rows],
              "test accuracy": [{"x": r["size_bytes"] / KIB, "y": r["accuracy"], "text": ""} for r in rows]}
    hlines = {"target (validation)": search["target_accuracy"]} if search.get("target_accuracy") is not None else {}
    chosen = search.get("chosen")
    marked = (chosen["size_bytes"] / KIB, chosen["val_accuracy"], f"chosen: {row_name(chosen)}") if chosen else None
    front = pareto_front([(r["size_bytes"] / KIB, r["val_accuracy"]) for r in rows])
    return figures.scatter("search: size against accuracy", series, "student size (KiB, theoretical)", "accuracy (%)",
                           hlines=hlines, front=front if len(front) > 1 else None, marked=marked)


def _verdict(search: dict[str, Any]) -> str:
    budget = search.get("budget") or {}
    limits = []
    if budget.get("size_bytes") is not None:
        limits.append(f"size {budget['size_bytes']} bytes")
    if budget.get("latency_us") is not None:
        limits.append(f"latency {budget['latency_us']} us")
    target = search.get("target_accuracy")
    goal = f"the smallest candidate reaching {percent(target)} validation accuracy" if target is not None else \
        "the most accurate candidate on validation"
    goal += f" within {' and '.join(limits)}" if limits else ""
    if search.get("target_met"):
        return goal
    return f"no candidate met the {'target' if target is not None else 'budget'}; the most accurate on validation was kept"


def _widths_table(search: dict[str, Any]) -> str:
    """The chosen student's per-layer widths, with each layer's measured sensitivity (mixed precision)."""
    chosen = search.get("chosen") or {}
    layers = (search.get("sensitivity") or {}).get("layers", {})
    if not chosen.get("per_layer"):
        return ""
    rows = []
    for name, widths in chosen["per_layer"].items():
        entry = layers.get(name, {})
        rows.append([name, entry.get("params"), widths.get("weight_bits"), widths.get("act_bits"),
                     ", ".join(f"{bits}: {fmt(rise)}" for bits, rise in entry.get("weight", {}).items()),
                     ", ".join(f"{bits}: {fmt(rise)}" for bits, rise in entry.get("act", {}).items())])
    header = ["layer", "weights", "weight bits", "act bits", "KD-loss rise by weight bits", "by act bits"]
    return note(f"Per-layer widths of the chosen student, {row_name(chosen)}. Sensitivity: the rise of the KD loss "
                "when only that layer is at that width (others at the widest), measured before training.") + \
        table(header, rows)


def search_section(report: dict[str, Any]) -> Section | None:
    """The Search section for report.json's ``search`` (None when the run was not a search)."""
    search = report.get("search")
    if not search or not search.get("candidates"):
        return None
    chosen = search.get("chosen")
    rows = [[row_name(r), r["size_bytes"], fmt(r.get("latency_us"), 1), percent(r["val_accuracy"]),
             percent(r["accuracy"]), "yes" if r.get("pareto") else "", r.get("epochs"), fmt(r.get("seconds"), 1),
             "chosen" if chosen and row_name(r) == row_name(chosen) else ""] for r in search["candidates"]]
    teacher = f" (teacher {percent(search.get('teacher_accuracy'))} on validation)"
    interrupted = " The search was interrupted; this is the best candidate so far." if search.get("interrupted") else ""
    text = note(f"Mode: {search.get('mode', 'uniform')}{teacher}. Chosen: {row_name(chosen) if chosen else '-'}, "
                f"{_verdict(search)}. Test accuracy was not used for the choice.{interrupted}")
    header = ["candidate", "size (bytes)", "latency (us, batch 1)", "validation accuracy", "test accuracy",
              "Pareto-optimal", "epochs", "seconds", ""]
    return "search", "Search", text + _chart(search) + table(header, rows) + _widths_table(search)
