"""``run_recipe``: one recipe from data to saved student, report and exports (what ``qdistill run`` does)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.batch import split_batch
from qdistill.io import atomic_write_text
from qdistill.recipe import Recipe
from qdistill.report import render
from qdistill.runs.deploy import export_outputs
from qdistill.runs.rundir import RunDir, output_dir
from qdistill.runs.stages import RunData, build_student, check_classes, checkpoint_plan, obtain_teacher, prepare_data
from qdistill.runs.student import Result, distill

SAMPLE_IMAGES = 10  # the method's worked example shows the first ten test images with their predictions


def run_recipe(recipe: Recipe, out: str | Path, resume: bool = False, show_progress: bool = True,
               data: RunData | None = None, teacher: nn.Module | None = None,
               export: bool = True) -> Result:
    """Run one recipe end to end and write its outputs under ``out``; returns the Result.

    Example:
        >>> result = run_recipe(Recipe.from_yaml("recipes/digits_w8a8.yaml"), "out/digits")  # doctest: +SKIP
    """
    with output_dir(out) as run:
        data = data or prepare_data(recipe)
        teacher_history = None
        if teacher is None:
            teacher, teacher_history = obtain_teacher(recipe, data, run, resume, show_progress)
        check_classes(teacher, data)
        plan = checkpoint_plan(recipe, run, resume, recipe.train.checkpoint_every_steps)
        result = distill(copy.deepcopy(teacher), data.train, data.val, recipe, test=data.test,
                         student=build_student(recipe, data), checkpoint=plan, show_progress=show_progress,
                         model_kwargs=data.model_kwargs)
        result.report["data"] = {**result.report.get("data", {}), **data.bundle.split_sizes()}
        if teacher_history is not None:
            result.report["teacher"]["history"] = teacher_history
        if export and (recipe.export.onnx or recipe.export.packed):
            result.report.update(export_outputs(result.student, result.recipe, data, run))
        result.save(run.path)
        write_html_report(result, data, run)
    return result


def prediction_samples(student: nn.Module, data: RunData, count: int = SAMPLE_IMAGES) -> dict[str, Any]:
    """The first ``count`` test inputs with the student's predictions and the true labels."""
    inputs, labels = split_batch(next(iter(data.test if data.test is not None else data.val)))
    inputs, labels = inputs[:count], labels[:count] if labels is not None else None
    device = next(student.parameters()).device
    with torch.no_grad():
        predicted = student.eval()(inputs.to(device)).argmax(dim=1).tolist()
    return {"images": inputs.numpy(), "predicted": predicted,
            "labels": labels.tolist() if labels is not None else [None] * len(predicted)}


def write_html_report(result: Result, data: RunData, run: RunDir) -> Path:
    """``report.html``: the human report, with the first ten test images and the student's predictions."""
    return atomic_write_text(run.html, render(result.report, prediction_samples(result.student, data)))
