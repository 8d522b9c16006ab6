"""``distill``, ``Result`` and ``load``: the first calls a user makes."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill import models
from qdistill.distill import Distiller, KDLoss, freeze
from qdistill.distill.teacher import CachedTeacherLoader
from qdistill.errors import DataError, FileFormatError, ModelError
from qdistill.evaluate import evaluate
from qdistill.factory import call_factory
from qdistill.io import atomic_write_json, atomic_write_text, ensure_writable_dir, load_weights, save_weights
from qdistill.quant import layer_table, prepare
from qdistill.recipe import ModelSpec, Recipe
from qdistill.report import build_report
from qdistill.train import CheckpointPlan, fit

WEIGHTS_FILE, REPORT_FILE, RECIPE_FILE = "student.safetensors", "report.json", "recipe.yaml"


@dataclass
class Result:
    """What ``distill`` returns: the fake-quant student, its report, and how to save them.

    Example:
        >>> result = qd.distill(teacher, train_loader, val_loader, recipe)
        >>> result.report["student"]["accuracy"]
        >>> result.save("out/")     # student.safetensors, report.json, recipe.yaml
    """

    student: nn.Module
    report: dict[str, Any]
    recipe: Recipe
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write ``student.safetensors``, ``report.json`` and ``recipe.yaml`` (each atomically)."""
        directory = ensure_writable_dir(directory)
        metadata = {"qdistill": json.dumps({"model_kwargs": self.model_kwargs, "format_version": 1})}
        save_weights(directory / WEIGHTS_FILE, self.student.state_dict(), metadata)
        atomic_write_text(directory / RECIPE_FILE, self.recipe.to_yaml())
        atomic_write_json(directory / REPORT_FILE, self.report)
        return directory


def _as_recipe(recipe: Recipe | dict | None) -> Recipe:
    if recipe is None:
        return Recipe()
    return recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)


def _batches(loader: Iterable[Any], name: str) -> Any:
    for batch in loader:
        return batch
    raise DataError(f"{name}: the loader yielded no batches; at least one sample is needed")


def check_loader(loader: Iterable[Any], name: str, num_classes: int) -> bool:
    """Scan a loader before training: finite inputs, labels in ``0..num_classes-1``; True if labelled."""
    labelled = None
    for batch in loader:
        inputs, labels = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (list, tuple)) else (batch, None)
        if inputs.is_floating_point() and not torch.isfinite(inputs).all():
            raise DataError(f"{name}: inputs contain NaN or Inf values; all inputs must be finite")
        labelled = labels is not None
        if labels is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = int(labels.max()) if labels.max() >= num_classes else int(labels.min())
            raise DataError(f"{name}: label {bad} is outside the model's {num_classes} classes; allowed: 0..{num_classes - 1}")
    if labelled is None:
        raise DataError(f"{name}: the loader yielded no batches; at least one sample is needed")
    return labelled


def _check_outputs(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        try:
            teacher_out = teacher(example)
        except RuntimeError as error:
            raise DataError(f"data: inputs of shape {tuple(example.shape)} do not fit the teacher ({str(error).splitlines()[0]})") from None
        try:
            student.eval()
            student_out = student(example)
        except RuntimeError as error:
            raise DataError(f"data: inputs of shape {tuple(example.shape)} do not fit the student ({str(error).splitlines()[0]})") from None
    if teacher_out.shape != student_out.shape:
        raise ModelError(f"teacher outputs shape {tuple(teacher_out.shape)} but student outputs {tuple(student_out.shape)}; they must match")
    if teacher_out.dim() != 2:
        raise ModelError(f"teacher outputs shape {tuple(teacher_out.shape)}; qdistill needs class logits of shape (batch, classes)")
    return teacher_out.shape[1]


def distill(teacher: nn.Module, train: Iterable[Any], val: Iterable[Any], recipe: Recipe | dict | None = None, *,
            student: nn.Module | None = None, checkpoint: CheckpointPlan | None = None, show_progress: bool = True,
            model_kwargs: dict[str, Any] | None = None) -> Result:
    """Train a quantized student of ``teacher`` with QAT + KD and evaluate it.

    ``train``/``val`` yield ``(x, y)`` or ``(x,)``; ``student`` is an optional float model of another
    architecture (default: a copy of the teacher). The teacher is never modified.

    Example:
        >>> result = qd.distill(teacher, train_loader, val_loader, qd.Recipe(quant={"weight_bits": 4}))
        >>> result.student, result.report["student"]["accuracy"]
    """
    recipe = _as_recipe(recipe)
    device = next(teacher.parameters()).device
    frozen_teacher = freeze(copy.deepcopy(teacher))
    example = _batches(train, "train data")
    example = (example[0] if isinstance(example, (list, tuple)) else example).to(device)
    float_student = copy.deepcopy(student if student is not None else teacher).to(device)
    num_classes = _check_outputs(frozen_teacher, float_student, example)
    labelled = check_loader(train, "train data", num_classes)
    val_labelled = check_loader(val, "validation data", num_classes)
    torch.manual_seed(recipe.train.seed)
    if hasattr(getattr(train, "sampler", None), "set_epoch"):
        train.sampler.set_epoch(0)  # calibrate on the same batches whatever ran on this loader before
    quantized = prepare(float_student, recipe.quant, calibration_data=train)
    _check_outputs(frozen_teacher, quantized, example)
    alpha = recipe.distill.alpha if labelled else 1.0  # label-free: the teacher is the only target
    distiller = Distiller(frozen_teacher, quantized, KDLoss(recipe.distill.temperature, alpha),
                          recipe.distill.features, example_input=example)

    def validate() -> float | None:
        return evaluate(quantized, val, num_classes)["accuracy"] if val_labelled else None

    cached = None if recipe.distill.features or alpha == 0 else CachedTeacherLoader.wrap(train, frozen_teacher)
    history = fit(distiller, cached if cached is not None else train, recipe.train, phase="student", validate=validate, plan=checkpoint,
                  show_progress=show_progress)
    distiller.remove_hooks()
    report = make_report(recipe, frozen_teacher, quantized, val, num_classes, history, label_free=not labelled)
    return Result(student=quantized, report=report, recipe=recipe, model_kwargs=model_kwargs or {})


def make_report(recipe: Recipe, teacher: nn.Module, student: nn.Module, val: Iterable[Any], num_classes: int,
                history: list[dict[str, Any]], label_free: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate teacher and student on ``val`` and build report.json."""
    teacher_metrics = evaluate(teacher, val, num_classes)
    student_metrics = evaluate(student, val, num_classes, teacher=teacher)
    per_layer = layer_table(student)
    student_info = {
        "weight_bits": recipe.quant.weight_bits,
        "act_bits": recipe.quant.act_bits,
        "per_layer": per_layer,
        "unquantized_layers": [f"{name}: {reason}" for name, reason in getattr(student, "qdistill_unquantized", {}).items()],
        "folded_batchnorms": list(getattr(student, "qdistill_folded", [])),
    }
    extra = dict(extra or {})
    if label_free:
        extra["label_free"] = True
    return build_report(recipe.to_dict(), teacher_metrics, student_metrics, student_info, history, recipe.train.seed, extra)


def build_model(spec: ModelSpec, model_kwargs: dict[str, Any], field_name: str = "model") -> nn.Module:
    """A float model from a recipe's model section, with its checkpoint loaded when named."""
    kwargs = {**model_kwargs, **spec.kwargs}
    if spec.name is not None:
        model = models.create(spec.name, **kwargs)
    else:
        model = call_factory(spec.factory, f"{field_name}.factory", **kwargs)
        if not isinstance(model, nn.Module):
            raise ModelError(f"{field_name}.factory: {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if spec.checkpoint:
        load_state(model, load_weights(spec.checkpoint), f"{field_name}.checkpoint {spec.checkpoint!r}")
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` whose key and shape mismatches are one-line ``ModelError``s."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{source}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ModelError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)}")
    model.load_state_dict(state)


def _saved_model_kwargs(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:
        raise FileFormatError(f"weights file {str(path)!r} is truncated or not a safetensors file") from None
    return json.loads(metadata.get("qdistill", "{}")).get("model_kwargs", {})


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a student saved by ``Result.save`` or ``qdistill run``.

    ``model`` is the float architecture; it may be left out when the saved recipe names a built-in
    model or a factory.

    Example:
        >>> student = qd.load("out/")
    """
    directory = Path(directory)
    recipe = Recipe.from_yaml(directory / RECIPE_FILE)
    weights_path = directory / WEIGHTS_FILE
    state = load_weights(weights_path)
    if model is None:
        spec = recipe.student or recipe.model
        model = build_model(spec.model_copy(update={"checkpoint": None}), _saved_model_kwargs(weights_path))
    student = prepare(model, recipe.quant)
    load_state(student, state, f"student weights {str(weights_path)!r}")
    return student.eval()
