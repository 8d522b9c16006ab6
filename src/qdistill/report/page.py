"""report.html: one run's report.json as a page a person reads (``render``).

Sections, each shown only when report.json has its data: headline numbers; teacher against
student; training curves (loss parts, validation accuracy, learning rate); predictions (the first
ten test samples, and the first ten the student gets wrong and the teacher right); per-class
precision, recall and F1; confusion matrices; per-layer bits and step sizes; export (files,
parity, kernels, latency); search (size against accuracy, the chosen candidate marked).

Example:
    >>> page = render({"teacher": {"accuracy": 0.9}, "student": {"accuracy": 0.88}})
    >>> page.startswith("<!doctype html>") and "Teacher and student" in page
    True
"""

from __future__ import annotations

from typing import Any

from qdistill.report import figures
from qdistill.report.export_page import export_section
from qdistill.report.html import Html, Section, cards, fmt, note, page, percent, plots, points, size, table
from qdistill.report.search_page import search_section

LOSS_NAMES = {"loss": "total", "kd_loss": "KD", "task_loss": "task"}
METRICS = (("accuracy", "accuracy"), ("precision_macro", "precision (macro)"), ("recall_macro", "recall (macro)"),
           ("f1_macro", "F1 (macro)"))


def class_names(report: dict[str, Any], count: int) -> list[str]:
    """report.json's ``class_names`` when it has them, else the class indices as text.

    Example:
        >>> class_names({}, 3), class_names({"class_names": ["cat", "dog"]}, 2)
        (['0', '1', '2'], ['cat', 'dog'])
    """
    names = report.get("class_names")
    return [str(name) for name in names] if isinstance(names, list) and len(names) == count else [str(i) for i in range(count)]


def bits_range(summary: Any) -> str:
    """``4-8`` for a ``{min, max}`` bit summary (``8`` when they are equal; a dash when absent)."""
    if not isinstance(summary, dict):
        return fmt(summary)
    low, high = summary.get("min"), summary.get("max")
    return f"{low}" if low == high else f"{low}-{high}"


def _delta(student: dict[str, Any], teacher: dict[str, Any], key: str) -> float | None:
    if isinstance(student.get(key), (int, float)) and isinstance(teacher.get(key), (int, float)):
        return student[key] - teacher[key]
    return None


def _intro(report: dict[str, Any]) -> str:
    teacher, student = report.get("teacher", {}), report.get("student", {})
    recipe = report.get("recipe", {})
    model = (recipe.get("student") or recipe.get("model") or {}).get("name", "the student")
    split = report.get("evaluated_on", "test")
    items = _embedding_cards(student) if "mean_cosine" in student else [
        ("student accuracy", percent(student.get("accuracy")),
         f"{points(_delta(student, teacher, 'accuracy'))} against the teacher's {percent(teacher.get('accuracy'))}")]
    if student.get("size_bytes") and teacher.get("size_bytes"):
        items.append(("student size", f"{student['size_bytes'] / 1024:.1f} KiB",
                      f"{teacher['size_bytes'] / student['size_bytes']:.1f}x smaller than the teacher"))
    if "agreement_with_teacher" in student:
        items.append(("agreement with teacher", percent(student["agreement_with_teacher"]), "same predicted class"))
    if "f1_macro" in student:
        items.append(("student F1 (macro)", fmt(student["f1_macro"], 3), f"teacher {fmt(teacher.get('f1_macro'), 3)}"))
    text = (f"{fmt(model)} student, weights at {bits_range(student.get('weight_bits'))} bits and activations at "
            f"{bits_range(student.get('act_bits'))} bits. Every metric below is measured on the <b>{fmt(split)}</b> "
            f"split ({fmt(report.get('data', {}).get(f'{split}_samples', '?'))} samples) unless it says otherwise; "
            "sizes are theoretical (weights at their bits plus scales)"
            + ("; file sizes on disk are under Export." if report.get("export") else "."))
    return cards(items) + note(text)


def _embedding_cards(student: dict[str, Any]) -> list[tuple[str, str, str]]:
    """An embedding student's cards: cosine to the teacher's embeddings and nearest-neighbour agreement."""
    return [("mean cosine to the teacher", fmt(student["mean_cosine"], 4), f"worst text {fmt(student.get('min_cosine'), 4)}"),
            ("agreement@1", percent(student.get("agreement_at_1")), "same nearest neighbour as the teacher"),
            ("agreement@10", percent(student.get("agreement_at_10")), "overlap of the 10 nearest neighbours")]


def _models(report: dict[str, Any]) -> Section:
    names = [name for name in ("teacher", "student") if name in report]
    rows = [[name] + [percent(report[name].get(key)) if key == "accuracy" else report[name].get(key)
                      for key, _ in METRICS] + [report[name].get("params"), Html(size(report[name].get("size_bytes")))]
            for name in names]
    if len(names) == 2:
        teacher, student = report["teacher"], report["student"]
        rows.append(["student - teacher"] + [points(_delta(student, teacher, key)) for key, _ in METRICS] + ["", ""])
    header = ["model"] + [label for _, label in METRICS] + ["parameters", "size"]
    return "models", "Teacher and student", table(header, rows)


def _training(report: dict[str, Any]) -> Section | None:
    history = report.get("history") or []
    if not history:
        return None
    epochs = [row["epoch"] for row in history]
    loss_keys = [key for key in history[0] if key.endswith("loss")]
    losses = {LOSS_NAMES.get(key, key.removesuffix("_loss")): [row.get(key) for row in history] for key in loss_keys}
    teacher_history = report.get("teacher", {}).get("history") or []
    teacher_val = teacher_history[-1].get("val_accuracy") if teacher_history else None
    hlines = {"teacher, end of its training": teacher_val} if teacher_val is not None else None
    charts = plots(
        figures.line_plot("loss parts per epoch", epochs, losses, "epoch", "mean loss per batch"),
        figures.line_plot("validation accuracy per epoch", epochs, {"student": [row.get("val_accuracy") for row in history]},
                          "epoch", "validation accuracy (%)", hlines=hlines, percent=True),
        figures.line_plot("learning rate per epoch", epochs, {"learning rate": [row.get("lr") for row in history]},
                          "epoch", "learning rate (epoch's first step)"))
    text = note("Loss parts are means over the epoch's batches (loss = alpha x KD + (1 - alpha) x task); validation "
                "accuracy is measured on the validation split after each epoch; the learning rate is the rate of "
                "the epoch's first step.")
    header = list(history[0])
    details = f"<details><summary>history table</summary>{table(header, [[row.get(k) for k in header] for row in history])}</details>"
    return "training", "Training", charts + text + details


def _caption(sample: dict[str, Any], index: int, names: list[str]) -> str:
    label = sample["labels"][index]
    parts = [f"#{sample['indices'][index]}: true {names[label] if label is not None else '?'}",
             f"student {names[sample['student'][index]]}"]
    if sample.get("teacher") is not None:
        parts.append(f"teacher {names[sample['teacher'][index]]}")
    return "\n".join(parts)


def _grid(title: str, sample: dict[str, Any], names: list[str]) -> str:
    count = len(sample["student"])
    captions = [_caption(sample, i, names) for i in range(count)]
    wrong = [sample["labels"][i] is not None and sample["student"][i] != sample["labels"][i] for i in range(count)]
    return figures.image_grid(title, list(sample["images"]), captions, wrong)


def _predictions(report: dict[str, Any], samples: dict[str, Any] | None, names: list[str]) -> Section | None:
    if not samples:
        return None
    parts = [note("Each image: its index in the test split, the true class, and the classes the student and the teacher "
                  "predict; a red caption is a wrong student prediction."),
             "<h3>First ten test samples</h3>", _grid("first ten test samples", samples["first"], names)]
    disagree = samples.get("student_wrong_teacher_right")
    if disagree is not None:
        parts.append("<h3>First ten the student gets wrong and the teacher gets right</h3>")
        parts.append(_grid("student wrong, teacher right", disagree, names) if disagree["student"] else
                     note("None: on this split the student gets no sample wrong that the teacher gets right."))
    return "predictions", "Predictions", "".join(parts)


def _per_class(report: dict[str, Any], names: list[str]) -> Section | None:
    if "per_class" not in report:
        return None
    rows = report["per_class"]
    metrics = ("precision", "recall", "f1")
    panels = {metric.replace("f1", "F1"): {model: [row[metric] for row in rows[model]] for model in ("teacher", "student")}
              for metric in metrics}
    chart = figures.grouped_bars("per-class precision, recall and F1", names, panels, "class", "score",
                                 ylim=(0, 1.05))
    header = ["class", "support"] + [f"{model} {m}" for model in ("teacher", "student") for m in metrics] + ["F1 change"]
    body = [[names[i], teacher["support"]] + [teacher[m] for m in metrics] + [student[m] for m in metrics]
            + [points(student["f1"] - teacher["f1"])]
            for i, (teacher, student) in enumerate(zip(rows["teacher"], rows["student"], strict=True))]
    text = note("Support is the number of test samples of the class (0: absent from the split, left out of macro averages).")
    return "classes", "Per-class precision, recall and F1", chart + table(header, body) + text


def _confusion(report: dict[str, Any], names: list[str]) -> Section | None:
    matrices = {f"{model}": matrix for model, matrix in report.get("confusion_matrix", {}).items() if matrix}
    if not matrices:
        return None
    chart = figures.heatmaps("confusion matrices", matrices, names)
    return "confusion", "Confusion matrices", chart + note("Rows: true class; columns: predicted class; cells: test samples.")


def _step(summary: Any) -> Any:
    if not isinstance(summary, dict):
        return None
    return Html(f"{summary['mean']:.3g}") if summary["min"] == summary["max"] else Html(
        f"{summary['mean']:.3g} <span class='note'>({summary['min']:.3g}-{summary['max']:.3g})</span>")


def _layers(report: dict[str, Any]) -> Section | None:
    student = report.get("student", {})
    per_layer = student.get("per_layer") or {}
    if not per_layer:
        return None
    names = list(per_layer)
    rows = [[name, row.get("weight_bits"), row.get("act_bits"), _step(row.get("weight_step")),
             _step(row.get("act_step"))] for name, row in per_layer.items()]
    parts = [plots(figures.hbars("bits per layer", names, {"weights": [r.get("weight_bits") for r in per_layer.values()],
                                                          "input activations": [r.get("act_bits") for r in per_layer.values()]},
                                 "bits", width=5.6), *_step_chart(per_layer)),
             table(["layer", "weight bits", "activation bits", "weight step: mean (min-max over channels)",
                    "input step"], rows)]
    if student.get("unquantized_layers"):
        parts.append(note("Left in float: " + "; ".join(fmt(x) for x in student["unquantized_layers"])))
    if student.get("smoothed_layers"):
        parts.append(note("Smoothed inputs (quant.smoothing; largest over smallest channel factor): "
                          + ", ".join(f"{name} {spread:g}" for name, spread in student["smoothed_layers"].items())))
    if student.get("folded_batchnorms"):
        parts.append(note("BatchNorms folded into the layer before them: " + ", ".join(fmt(x) for x in student["folded_batchnorms"])))
    return "layers", "Layers: bits and step sizes", "".join(parts)


def _step_chart(per_layer: dict[str, Any]) -> list[str]:
    series = {"weight step (mean)": [(r.get("weight_step") or {}).get("mean") for r in per_layer.values()],
              "input step": [(r.get("act_step") or {}).get("mean") for r in per_layer.values()]}
    if not any(v for values in series.values() for v in values):
        return []
    return [figures.hbars("step sizes per layer", list(per_layer), series, "step size (log scale)", log=True, width=5.6)]


def render(report: dict[str, Any], samples: dict[str, Any] | None = None) -> str:
    """The report.html page for a report.json dict.

    ``samples`` (from ``qdistill.runs.recipe_run.prediction_samples``) holds two groups of test
    samples, ``first`` and ``student_wrong_teacher_right``, each with ``indices``, ``images``,
    ``labels``, ``student`` and ``teacher`` predictions.
    """
    count = len(report.get("per_class", {}).get("student", [])) or len(report.get("confusion_matrix", {}).get("student") or [])
    names = class_names(report, count or 1 + max(_all_classes(samples), default=0))
    sections = [_models(report), _training(report), _predictions(report, samples, names), _per_class(report, names),
                _confusion(report, names), _layers(report), export_section(report), search_section(report)]
    return page("qdistill report", _intro(report), [s for s in sections if s is not None])


def _all_classes(samples: dict[str, Any] | None) -> list[int]:
    found = []
    for group in (samples or {}).values():
        if isinstance(group, dict):
            found += [c for key in ("labels", "student", "teacher") for c in (group.get(key) or []) if c is not None]
    return found
