"""Pages over several runs: the demo's index.html and ``qdistill compare``'s compare.html.

Each run is one row read from its report.json (``run_row``); ``runs_page`` shows which runs kept
the teacher's accuracy and at what size, accuracy against size with and without KD, what KD
changed at equal bits, and links to each run's report.html.

Example:
    >>> report = {"teacher": {"accuracy": 0.98, "size_bytes": 4000},
    ...           "student": {"accuracy": 0.978, "size_bytes": 1000, "weight_bits": {"min": 8, "max": 8},
    ...                       "act_bits": {"min": 8, "max": 8}}, "teacher_logits": "cached"}
    >>> row = run_row("w8a8_kd", report)
    >>> row["kd"], row["kept_teacher_accuracy"]
    (True, True)
"""

from __future__ import annotations

from typing import Any

from qdistill.recipe import SearchSpec
from qdistill.report import figures
from qdistill.report.html import Html, cards, escape, fmt, note, page, percent, points, size, table
from qdistill.report.page import bits_range

KIB = 1024
TOLERANCE = SearchSpec().max_accuracy_drop / 100.0  # "kept the teacher's accuracy": within search's default drop
COLUMNS = {"run": "run", "weight_bits": "weight bits", "act_bits": "act bits", "kd": "KD", "params": "params",
           "size_bytes": "size bytes", "accuracy": "accuracy", "f1_macro": "F1 macro",
           "agreement_with_teacher": "agreement", "latency_us": "int8 µs/sample"}  # row key -> terminal column


def uses_kd(report: dict[str, Any]) -> bool:
    """Whether the student learned from the teacher (logit KD or feature hints) rather than from labels alone."""
    if "teacher_logits" in report:
        return report["teacher_logits"] != "unused"
    distill = report.get("recipe", {}).get("distill", {})
    return bool(distill.get("alpha", 0) > 0 or distill.get("features"))


def run_row(name: str, report: dict[str, Any], href: str | None = None) -> dict[str, Any]:
    """One run's row: bits, KD, size, accuracy, F1, agreement, latency and its teacher's accuracy and size."""
    student, teacher = report.get("student", {}), report.get("teacher", {})
    onnx = (report.get("export") or {}).get("onnx") or {}
    accuracy, teacher_accuracy = student.get("accuracy"), teacher.get("accuracy")
    kept = None if accuracy is None or teacher_accuracy is None else accuracy >= teacher_accuracy - TOLERANCE
    quant = report.get("recipe", {}).get("quant", {})
    nominal = f"W{quant['weight_bits']}A{quant['act_bits']}" if {"weight_bits", "act_bits"} <= set(quant) else None
    return {"run": name, "href": href, "bits": nominal or f"W{bits_range(student.get('weight_bits'))}"
                                                          f"A{bits_range(student.get('act_bits'))}",
            "weight_bits": bits_range(student.get("weight_bits")),
            "act_bits": bits_range(student.get("act_bits")), "kd": uses_kd(report), "params": student.get("params"),
            "size_bytes": student.get("size_bytes"), "accuracy": accuracy, "f1_macro": student.get("f1_macro"),
            "agreement_with_teacher": student.get("agreement_with_teacher"),
            "latency_us": (onnx.get("latency_us_per_sample") or {}).get("batch1"),
            "teacher_accuracy": teacher_accuracy, "teacher_size_bytes": teacher.get("size_bytes"),
            "kept_teacher_accuracy": kept, "labelled_samples": (report.get("data") or {}).get("labelled_samples"),
            "unlabeled_samples": (report.get("data") or {}).get("unlabeled_samples")}


def teachers(rows: list[dict[str, Any]]) -> dict[tuple[float, int], list[str]]:
    """Distinct teachers (accuracy, size) and the runs that used each."""
    found: dict[tuple[float, int], list[str]] = {}
    for row in rows:
        if row["teacher_accuracy"] is not None:
            found.setdefault((row["teacher_accuracy"], row["teacher_size_bytes"]), []).append(row["run"])
    return found


def kd_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(no-KD row, KD row) of runs with the same bits, parameters, teacher and labelled samples: what KD alone changed
    (the KD run may have learned from unlabeled samples too: that is what KD can use and QAT cannot)."""
    def key(row: dict[str, Any]) -> tuple:
        return (row["bits"], row["weight_bits"], row["act_bits"], row["params"], row["teacher_accuracy"],
                row.get("labelled_samples"))
    plain = {key(row): row for row in rows if not row["kd"]}
    return [(plain[key(row)], row) for row in rows if row["kd"] and key(row) in plain]


def _names(runs: list[str], most: int = 3) -> str:
    return ", ".join(runs[:most]) + (f" and {len(runs) - most} more" if len(runs) > most else "")


def _headline(rows: list[dict[str, Any]]) -> str:
    found = teachers(rows)
    items = [(f"teacher{'' if len(found) == 1 else ' of ' + _names(runs)}", percent(accuracy),
              f"test accuracy, fp32, {size(size_bytes)}") for (accuracy, size_bytes), runs in found.items()]
    kept = [row for row in rows if row["kept_teacher_accuracy"]]
    smallest = min(kept, key=lambda row: row["size_bytes"] or 0, default=None)
    items.append(("kept the teacher's accuracy", f"{len(kept)} of {len(rows)} runs",
                  f"within {100 * TOLERANCE:.1f} pp on the test split"))
    if smallest is not None:
        ratio = (smallest["teacher_size_bytes"] or 0) / (smallest["size_bytes"] or 1)
        items.append(("smallest that kept it", escape(smallest["run"]),
                      f"{percent(smallest['accuracy'])} at {smallest['size_bytes'] / KIB:.1f} KiB ({ratio:.1f}x smaller)"))
    return cards(items)


def _summary_text(rows: list[dict[str, Any]]) -> str:
    kept = [row for row in rows if row["kept_teacher_accuracy"]]
    lost = [row for row in rows if row["kept_teacher_accuracy"] is False]
    lines = [f"<b>Kept the teacher's accuracy</b> (within {100 * TOLERANCE:.1f} percentage points): "
             + (", ".join(_run_text(row) for row in kept) or "none") + ".",
             "<b>Lost more</b>: " + (", ".join(_run_text(row) for row in lost) or "none") + "."]
    pairs = kd_pairs(rows)
    if pairs:
        lines.append("<b>What KD changed</b> (KD run minus the same student trained without KD): " + ", ".join(
            f"{escape(kd['run'])}: {kd['bits']}{_labels_text(kd)} {points(kd['accuracy'] - plain['accuracy'])} accuracy"
            for plain, kd in pairs) + ".")
    return "".join(f"<p>{line}</p>" for line in lines)


def _run_text(row: dict[str, Any]) -> str:
    delta = row["accuracy"] - row["teacher_accuracy"]
    return f"{escape(row['run'])} ({percent(row['accuracy'])}, {points(delta)}, {row['size_bytes'] / KIB:.1f} KiB)"


def _runs_table(rows: list[dict[str, Any]]) -> str:
    header = ["run", "weight bits", "act bits", "KD", "parameters", "size", "smaller than teacher", "accuracy",
              "vs teacher", "F1 (macro)", "agreement with teacher", "int8 µs/sample"]
    body = []
    for row in rows:
        name = Html(f'<a href="{escape(row["href"])}">{escape(row["run"])}</a>') if row["href"] else row["run"]
        ratio = f"{row['teacher_size_bytes'] / row['size_bytes']:.1f}x" if row["size_bytes"] and row["teacher_size_bytes"] else None
        delta = None if row["teacher_accuracy"] is None else row["accuracy"] - row["teacher_accuracy"]
        kib = None if row["size_bytes"] is None else f"{row['size_bytes'] / KIB:.1f} KiB"
        body.append([name, row["weight_bits"], row["act_bits"], row["kd"], row["params"], kib,
                     ratio, percent(row["accuracy"]), points(delta), row["f1_macro"],
                     percent(row["agreement_with_teacher"]), row["latency_us"]])
    return table(header, body, ["kept" if row["kept_teacher_accuracy"] else "" for row in rows])


def _accuracy_chart(rows: list[dict[str, Any]]) -> str:
    series = {label: [{"x": row["size_bytes"] / KIB, "y": row["accuracy"], "text": row["run"]}
                      for row in rows if row["kd"] is kd and row["size_bytes"]]
              for label, kd in (("with KD", True), ("without KD (QAT only)", False))}
    found = teachers(rows)
    hlines = {(f"teacher ({size_bytes / KIB:.0f} KiB fp32)" if len(found) == 1 else f"teacher of {_names(runs)}"):
              accuracy for (accuracy, size_bytes), runs in found.items()}
    sizes = [row["size_bytes"] for row in rows if row["size_bytes"]]
    logx = bool(sizes) and max(sizes) > 8 * min(sizes)
    zoom = _zoom(rows)
    return figures.scatter("test accuracy against size", series, "student size (KiB, theoretical; log scale)" if logx
                           else "student size (KiB, theoretical)", "test accuracy (%)", hlines=hlines, logx=logx,
                           zoom=zoom, band=_band(found), size=(10.5, 4.2) if zoom else (7.5, 4.2))


def _band(found: dict[tuple[float, int], list[str]]) -> tuple[float, str] | None:
    """The shaded "kept the teacher's accuracy" band (one teacher only)."""
    if len(found) != 1:
        return None
    return next(iter(found))[0] - TOLERANCE, f"within {100 * TOLERANCE:.1f} pp of the teacher"


def _zoom(rows: list[dict[str, Any]], near: float = 0.05) -> tuple[float, float] | None:
    """The accuracy range of the runs within ``near`` of their teacher, when other runs are further away
    (a second panel then shows those close runs apart)."""
    close = [row for row in rows if row["teacher_accuracy"] is not None and row["accuracy"] is not None
             and row["accuracy"] >= row["teacher_accuracy"] - near]
    if not close or len(close) == len(rows):
        return None
    values = [row["accuracy"] for row in close] + [row["teacher_accuracy"] for row in close]
    margin = max(0.25 * (max(values) - min(values)), 0.002)
    return min(values) - margin, max(values) + margin


def _kd_section(rows: list[dict[str, Any]]) -> str:
    pairs = kd_pairs(rows)
    if not pairs:
        return ""
    labels = [f"{kd['bits']}{_labels_text(kd)}: {kd['run']} vs {plain['run']}" for plain, kd in pairs]
    series = {"accuracy": [100 * (kd["accuracy"] - plain["accuracy"]) for plain, kd in pairs],
              "agreement with teacher": [100 * ((kd["agreement_with_teacher"] or 0) - (plain["agreement_with_teacher"] or 0))
                                         for plain, kd in pairs]}
    chart = figures.hbars("what KD changed", labels, series, "KD minus no KD (percentage points; right is better)")
    body = [[kd["bits"], kd["params"], kd.get("labelled_samples"), kd.get("unlabeled_samples"), percent(plain["accuracy"]),
             percent(kd["accuracy"]), points(kd["accuracy"] - plain["accuracy"]),
             percent(plain["agreement_with_teacher"]), percent(kd["agreement_with_teacher"])] for plain, kd in pairs]
    return chart + table(["bits", "parameters", "labelled samples", "unlabeled samples (KD only)", "accuracy without KD",
                          "with KD", "KD changed", "agreement without KD", "with KD"], body)


def _labels_text(row: dict[str, Any]) -> str:
    """`` (N labels + M unlabeled)`` when the run learned from unlabeled samples, else nothing."""
    if not row.get("unlabeled_samples"):
        return ""
    return f" ({row['labelled_samples']} labels + {row['unlabeled_samples']} unlabeled)"


def _chart_note(rows: list[dict[str, Any]]) -> str:
    where = ("The dashed line is the teacher's accuracy; points in the green band kept it (at most "
             f"{100 * TOLERANCE:.1f} percentage points below)") if len(teachers(rows)) == 1 else \
        "The dashed lines are the teachers' accuracies (these runs had different teachers)"
    return f"Each point is one student (test split). {where}; the further left, the smaller the student."


def runs_page(title: str, rows: list[dict[str, Any]], intro: str = "") -> str:
    """The HTML page over ``rows`` (from ``run_row``): headline, summary, accuracy against size, KD, table."""
    if not rows:
        return page(title, note("No runs."), [])
    sections = [("accuracy", "Accuracy against size", _accuracy_chart(rows) + note(_chart_note(rows))),
                ("kd", "What KD changed", _kd_section(rows) or note("No pair of runs differs in KD alone.")),
                ("runs", "All runs", _runs_table(rows) + note(
                    "Green rows kept the teacher's accuracy. Size is theoretical (weights at their bits plus scales); "
                    "latency is ONNX Runtime's on the machine that ran the export ('-': not exported). "
                    "Click a run for its full report."))]
    return page(title, intro + _headline(rows) + _summary_text(rows), sections)


def column_text(row: dict[str, Any], key: str) -> str:
    """A row's value as plain text for a terminal table (percentages for accuracy and agreement)."""
    value = row.get(key)
    if key in ("accuracy", "agreement_with_teacher") and value is not None:
        return percent(value)
    return fmt(value, 2 if key == "latency_us" else 4) if not isinstance(value, str) else value
