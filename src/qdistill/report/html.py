"""The human report: one self-contained HTML page (inline SVG, no network) next to report.json.

It shows what a person checks first: teacher vs student metrics, training curves, per-class F1,
the confusion matrix, per-layer bit widths, export results, and - as in the method's worked
example - the first ten validation images with the student's predicted labels.
"""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}h2{margin-top:1.6em;border-bottom:1px solid #ddd}.bad{color:#b00}.good{color:#070}
.images span{display:inline-block;text-align:center;margin:4px;font-size:13px}"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("-" if value is None else str(value))


def _line_chart(series: dict[str, list[float]], title: str, width: int = 480, height: int = 200) -> str:
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    values = [v for points in series.values() for v in points if v is not None]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    parts = [f'<svg width="{width}" height="{height + 30}" role="img"><title>{html.escape(title)}</title>',
             f'<text x="4" y="14" font-size="13">{html.escape(title)} ({low:.4g} .. {high:.4g})</text>']
    for index, (name, points) in enumerate(series.items()):
        count = max(len(points) - 1, 1)
        coords = " ".join(f"{10 + i * (width - 20) / count:.1f},{24 + (height - 10) * (1 - (v - low) / span):.1f}"
                          for i, v in enumerate(points) if v is not None)
        color = colors[index % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        parts.append(f'<text x="{12 + 110 * index}" y="{height + 28}" font-size="12" fill="{color}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def _bars(values: dict[str, list[float]], title: str) -> str:
    classes = len(next(iter(values.values())))
    width, bar = 40 * classes + 20, 16
    parts = [f'<svg width="{width}" height="190"><text x="4" y="14" font-size="13">{html.escape(title)}</text>']
    for series, (name, points) in enumerate(values.items()):
        color = "#1f77b4" if series == 0 else "#ff7f0e"
        for index, value in enumerate(points):
            x = 10 + index * 40 + series * bar
            parts.append(f'<rect x="{x}" y="{170 - 140 * value:.1f}" width="{bar - 2}" height="{140 * value:.1f}" fill="{color}">'
                         f"<title>{name} class {index}: {value:.3f}</title></rect>")
        parts.append(f'<text x="{10 + 120 * series}" y="186" font-size="12" fill="{color}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def _image_svg(image: np.ndarray, pixel: int) -> str:
    image = image.reshape(image.shape[-2], image.shape[-1]) if image.ndim >= 2 else image.reshape(1, -1)
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / ((high - low) or 1.0)
    rows, cols = scaled.shape
    rects = "".join(f'<rect x="{c * pixel}" y="{r * pixel}" width="{pixel}" height="{pixel}" fill="rgb({g},{g},{g})"/>'
                    for r in range(rows) for c in range(cols) for g in [int(255 * (1 - scaled[r, c]))])
    return f'<svg width="{cols * pixel}" height="{rows * pixel}">{rects}</svg>'


def _samples(samples: dict[str, Any]) -> str:
    cells = []
    for image, predicted, label in zip(samples["images"], samples["predicted"], samples["labels"], strict=True):
        pixel = max(2, 84 // max(image.shape[-1], 1))
        verdict = "good" if label is None or predicted == label else "bad"
        caption = f"pred {predicted}" + ("" if label is None else f" / true {label}")
        cells.append(f'<span>{_image_svg(np.asarray(image), pixel)}<br><b class="{verdict}">{caption}</b></span>')
    return f'<div class="images">{"".join(cells)}</div>'


def render(report: dict[str, Any], samples: dict[str, Any] | None = None) -> str:
    """The HTML page for a report.json dict (and optional sample images with predictions)."""
    keys = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "params", "size_bytes"]
    rows = [[name] + [report[name].get(key) for key in keys] for name in ("teacher", "student") if name in report]
    student = report.get("student", {})
    sections = ["<h1>qdistill report</h1>",
                f"<p>Student weights at {_bits_range(student.get('weight_bits'))} bits, activations at "
                f"{_bits_range(student.get('act_bits'))} bits; agreement with teacher "
                f"{_fmt(student.get('agreement_with_teacher'))}; size is theoretical (bits of the weights plus scales).</p>",
                f"<h2>Teacher vs student ({html.escape(str(report.get('evaluated_on', 'test')))} split)</h2>", _table(["model"] + keys, rows)]
    history = report.get("history", [])
    if history:
        sections += ["<h2>Training</h2>",
                     _line_chart({"loss": [r["loss"] for r in history], "kd": [r["kd_loss"] for r in history],
                                  "task": [r["task_loss"] for r in history]}, "loss per epoch"),
                     _line_chart({"val accuracy": [r["val_accuracy"] for r in history]}, "validation accuracy"),
                     _table(list(history[0]), [list(r.values()) for r in history])]
    if samples:
        sections += ["<h2>First ten test images, student's predictions</h2>", _samples(samples)]
    if "per_class" in report:
        f1 = {name: [row["f1"] for row in report["per_class"][name]] for name in ("teacher", "student")}
        sections += ["<h2>Per-class F1</h2>", _bars(f1, "F1 per class (teacher, student)")]
    if "confusion_matrix" in report:
        matrix = report["confusion_matrix"]["student"]
        sections += ["<h2>Student confusion matrix (rows: true, columns: predicted)</h2>",
                     _table([""] + [str(i) for i in range(len(matrix))], [[i] + row for i, row in enumerate(matrix)])]
    per_layer = student.get("per_layer", {})
    sections += ["<h2>Layers</h2>", _table(["layer", "weight bits", "act bits"],
                                           [[n, v["weight_bits"], v["act_bits"]] for n, v in per_layer.items()])]
    if student.get("unquantized_layers"):
        sections.append("<p>Left float: " + "; ".join(html.escape(x) for x in student["unquantized_layers"]) + "</p>")
    if "export" in report:
        sections += ["<h2>Export</h2>", f"<pre>{html.escape(_export_text(report['export']))}</pre>"]
    return f"<!doctype html><meta charset='utf-8'><title>qdistill report</title><style>{STYLE}</style>" + "".join(sections)


def _bits_range(summary: Any) -> str:
    if not isinstance(summary, dict):
        return _fmt(summary)
    low, high = summary.get("min"), summary.get("max")
    return f"{low}" if low == high else f"{low}-{high}"


def _export_text(section: dict[str, Any]) -> str:
    return json.dumps(section, indent=2)
