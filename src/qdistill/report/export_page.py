"""The Export section of report.html: file sizes, parity, integer kernels per layer, latency bars.

Example:
    >>> export_section({}) is None
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qdistill.report import figures
from qdistill.report.html import Html, Section, fmt, note, percent, plots, size, table

ENGINES = (("int8", "ONNX Runtime int8"), ("fp32", "ONNX Runtime fp32"), ("torch_fp32", "PyTorch fp32 (eager)"))
SHOWN = {"path", "file_bytes", "fp32_file_bytes", "accuracy", "student_accuracy", "agreement_with_student",
         "max_abs_logit_diff", "samples", "integer_ops", "latency_threads", "latency_us_per_sample",
         "fp32_latency_us_per_sample", "torch_fp32_latency_us_per_sample"}


def _files(section: dict[str, Any]) -> str:
    rows = []
    for key, name, reference in (("onnx", "int8 ONNX", "fp32 ONNX"), ("packed", "packed low-bit weights",
                                                                      "fp32 safetensors")):
        part = section.get(key)
        if part and "file_bytes" in part:
            fp32 = part.get("fp32_file_bytes")
            ratio = f"{fp32 / part['file_bytes']:.1f}x" if fp32 and part["file_bytes"] else None
            rows.append([name, Path(str(part.get("path", ""))).name, Html(size(part["file_bytes"])),
                         reference, Html(size(fp32)), ratio])
    return "<h3>Files</h3>" + table(["file", "name", "size on disk", "compared with", "its size", "smaller by"], rows)


def _parity(onnx: dict[str, Any]) -> str:
    if "agreement_with_student" not in onnx:
        return ""
    rows = [["ONNX int8 accuracy", percent(onnx.get("accuracy"))],
            ["fake-quant student accuracy (same samples)", percent(onnx.get("student_accuracy"))],
            ["agreement with the student (same predicted class)", percent(onnx["agreement_with_student"])],
            ["largest absolute logit difference", fmt(onnx.get("max_abs_logit_diff"), 6)],
            ["samples compared (validation split)", onnx.get("samples")]]
    return "<h3>Parity: the int8 file against the trained student</h3>" + table(["check", "measured"], rows)


def _kernels(onnx: dict[str, Any], per_layer: dict[str, Any]) -> str:
    kernels = onnx.get("integer_ops") or {}
    if not kernels:
        return ""
    rows = [[layer, op, (per_layer.get(layer) or {}).get("weight_bits"), (per_layer.get(layer) or {}).get("act_bits")]
            for layer, op in kernels.items()]
    return ("<h3>Integer kernels per layer</h3>" + table(["layer", "ONNX operator", "weight bits", "activation bits"], rows)
            + note("Every quantized layer runs as an integer operator in the ONNX file (the export checks this)."))


def _latency(onnx: dict[str, Any]) -> str:
    threads = onnx.get("latency_threads") or {}
    groups = [(key, label) for key, label in (("1", "1 thread"), ("all", f"{threads.get('all_threads', 'all')} threads"))
              if threads.get(key)]
    if not groups:
        return ""
    categories, series = [], {label: [] for _, label in ENGINES}
    for key, label in groups:
        for batch in ("batch1", "batch64"):
            categories.append(f"batch {batch.removeprefix('batch')}, {label}")
            for engine, name in ENGINES:
                series[name].append((threads[key].get(engine) or {}).get(batch))
    values = [v for column in series.values() for v in column if v]
    log = bool(values) and max(values) > 30 * min(values)  # one slow number would hide the others
    chart = figures.hbars("latency per sample", categories, series,
                          f"microseconds per sample ({'log scale; ' if log else ''}shorter is faster)", log=log)
    rows = [[category] + [fmt(series[name][i], 2) for _, name in ENGINES] for i, category in enumerate(categories)]
    return ("<h3>Latency</h3>" + plots(chart) + table(["batch, threads"] + [f"{name} (µs/sample)" for _, name in ENGINES], rows)
            + note("Median time per sample after warm-up, on this machine's CPU."))


def _other(part: dict[str, Any]) -> str:
    rows = [[key, value] for key, value in part.items() if key not in SHOWN and not isinstance(value, (dict, list))]
    return table(["ONNX file", "value"], rows) if rows else ""


def export_section(report: dict[str, Any]) -> Section | None:
    """The Export section for report.json's ``export`` (None when the run exported nothing)."""
    section = report.get("export")
    if not section:
        return None
    onnx = section.get("onnx") or {}
    per_layer = report.get("student", {}).get("per_layer") or {}
    parts = [_files(section), _parity(onnx), _kernels(onnx, per_layer), _latency(onnx), _other(onnx)]
    return "export", "Export", "".join(parts)
