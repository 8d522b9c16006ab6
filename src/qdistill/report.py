"""report.json (the contract other tools read) and its pieces."""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

from qdistill.factory import FACTORIES_RUN

SUMMARY_KEYS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "params", "size_bytes")


def environment(seed: int) -> dict[str, Any]:
    """Versions and platform of this run."""
    from qdistill import __version__

    try:
        import onnxruntime

        onnxruntime_version = onnxruntime.__version__
    except ImportError:
        onnxruntime_version = None
    return {"seed": seed, "python": sys.version.split()[0], "torch": torch.__version__,
            "onnxruntime": onnxruntime_version, "qdistill": __version__, "platform": platform.platform()}


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The report's per-model summary keys that the metrics have (absent ones stay absent)."""
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}


def build_report(recipe_dict: dict[str, Any], teacher_metrics: dict[str, Any], student_metrics: dict[str, Any],
                 student_info: dict[str, Any], history: list[dict[str, Any]], seed: int,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble report.json from measured metrics; stages that did not run have no key."""
    from qdistill import __version__

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
