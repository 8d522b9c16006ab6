"""The Search section of report.html: size against accuracy of every candidate, the Pareto front, the choice.

Example:
    >>> pareto_front([(10, 0.5), (20, 0.9), (30, 0.8)])
    [(10, 0.5), (20, 0.9)]
"""

from __future__ import annotations

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


def _name(row: dict[str, Any]) -> str:
    return f"w{row['weight_bits']}a{row['act_bits']}"


def _chart(search: dict[str, Any]) -> str:
    rows = search["candidates"]
    series = {"validation accuracy (the choice uses it)": [{"x": r["size_bytes"] / KIB, "y": r["val_accuracy"],
                                                            "text": _name(r)} for r in rows],
              "test accuracy": [{"x": r["size_bytes"] / KIB, "y": r["accuracy"], "text": ""} for r in rows]}
    hlines = {"target (validation)": search["target_accuracy"]}
    chosen = search.get("chosen")
    marked = (chosen["size_bytes"] / KIB, chosen["val_accuracy"], f"chosen: {_name(chosen)}") if chosen else None
    front = pareto_front([(r["size_bytes"] / KIB, r["val_accuracy"]) for r in rows])
    return figures.scatter("search: size against accuracy", series, "student size (KiB, theoretical)", "accuracy (%)",
                           hlines=hlines, front=front if len(front) > 1 else None, marked=marked)


def search_section(report: dict[str, Any]) -> Section | None:
    """The Search section for report.json's ``search`` (None when the run was not a search)."""
    search = report.get("search")
    if not search or not search.get("candidates"):
        return None
    chosen = search.get("chosen")
    rows = [[_name(r), r["size_bytes"], percent(r["val_accuracy"]), percent(r["accuracy"]),
             "yes" if r["met_target"] else "no", r.get("epochs"), fmt(r.get("seconds"), 1),
             "chosen" if chosen and _name(r) == _name(chosen) else ""] for r in search["candidates"]]
    verdict = "the smallest candidate that meets the target" if search.get("target_met") else \
        "no candidate met the target; the most accurate was kept"
    text = note(f"Target: {percent(search['target_accuracy'])} validation accuracy (teacher "
                f"{percent(search.get('teacher_accuracy'))} on validation). Chosen: "
                f"{_name(chosen) if chosen else '-'}, {verdict}. Test accuracy was not used for the choice.")
    header = ["candidate", "size (bytes)", "validation accuracy", "test accuracy", "meets target", "epochs", "seconds", ""]
    return "search", "Search", text + _chart(search) + table(header, rows)
