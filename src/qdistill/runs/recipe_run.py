"""``run_recipe``: one recipe from data to saved student, report and exports (what ``qdistill run`` does)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from qdistill.evaluate import predict
from qdistill.io import atomic_write_text
from qdistill.recipe import Recipe
from qdistill.report import render
from qdistill.runs.deploy import export_outputs
from qdistill.runs.rundir import RunDir, output_dir
from qdistill.runs.stages import (
    RunData,
    check_classes,
    checkpoint_plan,
    initial_student,
    obtain_teacher,
    prepare_data,
    run_kind,
)
from qdistill.runs.student import Result, distill
from qdistill.train import distributed
from qdistill.train.tensorboard import require_tensorboard

SAMPLE_IMAGES = 10  # the method's worked example shows the first ten test images with their predictions


def run_recipe(recipe: Recipe, out: str | Path, resume: bool = False, show_progress: bool = True,
               data: RunData | None = None, teacher: nn.Module | None = None,
               export: bool = True) -> Result:
    """Run one recipe end to end and write its outputs under ``out``; returns the Result.

    Under torchrun every process trains its shard (``train.distributed``); rank 0 alone exports
    and writes files.

    Example:
        >>> result = run_recipe(Recipe.from_yaml("recipes/digits_w8a8.yaml"), "out/digits")  # doctest: +SKIP
    """
    if recipe.train.tensorboard:
        require_tensorboard()  # before any folder or training: a missing extra is a one-line error
    distributed.setup()
    with output_dir(out) as run:
        data = data or prepare_data(recipe)
        teacher_history = None
        if teacher is None:
            teacher, teacher_history = obtain_teacher(recipe, data, run, resume, show_progress)
        check_classes(teacher, data, run_kind(recipe, teacher))
        plan = checkpoint_plan(recipe, run, resume, recipe.train.checkpoint_every_steps)
        student, student_init = initial_student(recipe, data, teacher)
        result = distill(copy.deepcopy(teacher), data.train, data.val, recipe, test=data.test,
                         student=student, checkpoint=plan, show_progress=show_progress,
                         model_kwargs=data.model_kwargs, tensorboard_dir=run.tb, unlabeled=data.unlabeled)
        result.report["data"] = {**result.report.get("data", {}), **data.bundle.split_sizes()}
        result.report["student_init"] = student_init
        if teacher_history is not None:
            result.report["teacher"]["history"] = teacher_history
        if not distributed.is_main():
            return result  # rank 0 writes the files
        if export and (recipe.export.onnx or recipe.export.packed):
            result.report.update(export_outputs(result.student, result.recipe, data, run))
        result.save(run.path)
        write_html_report(result, data, run, teacher)
    return result


def prediction_samples(student: nn.Module, data: RunData, teacher: nn.Module | None = None,
                       count: int = SAMPLE_IMAGES, predictions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Test samples for report.html's prediction grids, each group with its indices in the test split,
    images, true labels and the student's (and teacher's) predicted classes.

    ``first``: the first ``count`` samples; ``student_wrong_teacher_right`` (with a teacher and
    labels): the first ``count`` samples the student gets wrong and the teacher gets right.
    ``predictions`` (``Result.predictions``) are reused when they came from the same loader.
    """
    loader, inputs = (data.test, data.bundle.test_x) if data.test is not None else (data.val, data.bundle.val_x)
    if predictions is not None and predictions.get("loader") is loader and (teacher is None) == (predictions["teacher"] is None):
        student_pred, teacher_pred, labels = predictions["student"], predictions["teacher"], predictions["labels"]
    else:
        student_logits, labels = predict(student, loader)
        student_pred = student_logits.argmax(axis=1)
        teacher_pred = predict(teacher, loader)[0].argmax(axis=1) if teacher is not None else None
    groups = {"first": np.arange(min(count, len(student_pred)))}
    if teacher_pred is not None and labels is not None:
        groups["student_wrong_teacher_right"] = np.flatnonzero((student_pred != labels) & (teacher_pred == labels))[:count]
    return {name: _sample_group(indices, inputs, labels, student_pred, teacher_pred) for name, indices in groups.items()}


def _sample_group(indices: np.ndarray, inputs, labels, student_pred: np.ndarray,
                  teacher_pred: np.ndarray | None) -> dict[str, Any]:
    def pick(values):
        return None if values is None else [int(values[i]) for i in indices]
    return {"indices": [int(i) for i in indices], "images": inputs[indices].cpu().numpy(),
            "labels": pick(labels) or [None] * len(indices), "student": pick(student_pred), "teacher": pick(teacher_pred)}


def write_html_report(result: Result, data: RunData, run: RunDir, teacher: nn.Module | None = None) -> Path:
    """``report.html``: the human report, with prediction grids of test samples (student and teacher)."""
    inputs = data.bundle.test_x if data.test is not None else data.bundle.val_x
    # the grids draw images: tokens (dict inputs) and other multi-tensor inputs have none to draw
    samples = (prediction_samples(result.student, data, teacher, predictions=result.predictions)
               if not isinstance(inputs, dict | tuple) else None)
    return atomic_write_text(run.html, render(result.report, samples))
