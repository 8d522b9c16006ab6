"""report.json (the contract other tools read) and its pieces."""

from __future__ import annotations

import platform
import sys
from typing import Any

import onnxruntime
import torch

from qdistill.factory import FACTORIES_RUN
from qdistill.version import __version__

SUMMARY_KEYS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "params", "size_bytes",
                # embedding models (output kind "embedding"): the student's embeddings against the teacher's
                "mean_cosine", "min_cosine", "agreement_at_1", "agreement_at_10", "embedding_samples")


def environment(seed: int) -> dict[str, Any]:
    """Versions and platform of this run."""
    return {"seed": seed, "python": sys.version.split()[0], "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "qdistill": __version__, "platform": platform.platform()}


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The report's per-model summary keys that the metrics have (absent ones stay absent)."""
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}


def bit_summary(per_layer: dict[str, dict[str, int | None]]) -> dict[str, Any]:
    """``weight_bits`` and ``act_bits`` of report.json: min, max and a histogram over the quantized layers and ops.

    Example:
        >>> bit_summary({"conv": {"weight_bits": 8, "act_bits": 8}, "fc": {"weight_bits": 4, "act_bits": 8},
        ...              "add": {"weight_bits": None, "act_bits": 8}})
        {'weight_bits': {'min': 4, 'max': 8, 'histogram': {'4': 1, '8': 1}}, 'act_bits': {'min': 8, 'max': 8, 'histogram': {'8': 3}}}
    """
    result: dict[str, Any] = {}
    for key in ("weight_bits", "act_bits"):
        values = [row[key] for row in per_layer.values() if row.get(key) is not None]
        if values:
            histogram = {str(bits): values.count(bits) for bits in sorted(set(values))}
            result[key] = {"min": min(values), "max": max(values), "histogram": histogram}
    return result


def build_report(recipe_dict: dict[str, Any], teacher_metrics: dict[str, Any], student_metrics: dict[str, Any],
                 student_info: dict[str, Any], history: list[dict[str, Any]], seed: int,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble report.json from measured metrics; stages that did not run have no key."""
    student = summary(student_metrics)
    student.update(student_info)
    if "agreement_with_teacher" in student_metrics:
        student["agreement_with_teacher"] = student_metrics["agreement_with_teacher"]
    report: dict[str, Any] = {
        "qdistill_version": __version__,
        "recipe": recipe_dict,
        "teacher": summary(teacher_metrics),
        "student": student,
    }
    if "per_class" in teacher_metrics and "per_class" in student_metrics:
        report["per_class"] = {"teacher": teacher_metrics["per_class"], "student": student_metrics["per_class"]}
    if "confusion_matrix" in student_metrics:
        report["confusion_matrix"] = {"teacher": teacher_metrics.get("confusion_matrix"),
                                      "student": student_metrics["confusion_matrix"]}
    report["history"] = history
    report.update(extra or {})
    report["factories_run"] = list(FACTORIES_RUN)
    report["environment"] = environment(seed)
    return report
