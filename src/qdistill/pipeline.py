"""``run_recipe``: one recipe from data to saved student, report and exports (what ``qdistill run`` does)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.api import Result, build_model, distill, load_state
from qdistill.data import DataBundle, load_data, make_loaders
from qdistill.errors import DataError, ModelError
from qdistill.evaluate import evaluate
from qdistill.io import atomic_write_json, ensure_writable_dir, load_weights, save_weights
from qdistill.recipe import Recipe
from qdistill.train import CheckpointPlan, Supervised, fingerprint, fit

TEACHER_FILE = "teacher.safetensors"


@dataclass
class Prepared:
    """Data, loaders and model arguments shared by the stages of one run."""

    bundle: DataBundle
    train: Any
    val: Any
    model_kwargs: dict[str, Any]


def default_device() -> torch.device:
    """CUDA when present, else the CPU (data stays on the CPU; batches move per step)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_data(recipe: Recipe) -> Prepared:
    """Load the recipe's data and build deterministic loaders."""
    bundle = load_data(recipe.data)
    train, val = make_loaders(bundle, recipe.data.batch_size, recipe.data.seed)
    return Prepared(bundle, train, val, bundle.model_kwargs())


def _checkpoint_plan(recipe: Recipe, out: Path, resume: bool, spec_every: int | None) -> CheckpointPlan:
    return CheckpointPlan(out / "checkpoint", fingerprint(recipe.to_yaml()), spec_every, resume)


def obtain_teacher(recipe: Recipe, data: Prepared, out: Path, resume: bool, show_progress: bool,
                   reuse_cached: bool = False) -> tuple[nn.Module, list[dict[str, Any]] | None]:
    """The recipe's teacher: loaded from its checkpoint, reused from ``out``, or trained here."""
    torch.manual_seed(recipe.teacher_train.seed)  # the same initial weights in every run of this recipe
    teacher = build_model(recipe.model, data.model_kwargs).to(default_device())
    check_classes(teacher, data)  # before any training: the data must fit the model
    check_quant_layers(recipe, data, teacher)
    cached = out / TEACHER_FILE
    if recipe.model.checkpoint:
        return teacher, None
    if cached.is_file() and (resume or reuse_cached):
        load_state(teacher, load_weights(cached), f"cached teacher {str(cached)!r}")
        return teacher, None
    if not data.bundle.has_labels:
        raise DataError("model.checkpoint: the data has no labels, so a teacher cannot be trained here; give model.checkpoint")
    plan = _checkpoint_plan(recipe, out, resume, recipe.teacher_train.checkpoint_every_steps)
    history = fit(Supervised(teacher), data.train, recipe.teacher_train, phase="teacher",
                  validate=lambda: evaluate(teacher, data.val, data.bundle.num_classes)["accuracy"], plan=plan,
                  show_progress=show_progress)
    save_weights(cached, teacher.state_dict())
    return teacher, history


def check_quant_layers(recipe: Recipe, data: Prepared, teacher: nn.Module) -> None:
    """Per-layer overrides must match layers of the model that will be quantized (before training)."""
    from qdistill.quant.prepare import layer_bits, quantizable_layers

    model = build_student(recipe, data) or teacher
    layer_bits([name for name, _ in quantizable_layers(model)], recipe.quant)


def check_classes(teacher: nn.Module, data: Prepared) -> None:
    """The data's classes must be exactly the teacher's outputs."""
    example = data.bundle.train_x[:2].to(next(teacher.parameters()).device)
    was_training = teacher.training
    with torch.no_grad():
        try:
            outputs = teacher.eval()(example)
            teacher.train(was_training)
        except RuntimeError as error:
            raise DataError(f"data: inputs of shape {tuple(example.shape[1:])} do not fit the model ({str(error).splitlines()[0]})") from None
    if outputs.dim() != 2:
        raise ModelError(f"model outputs shape {tuple(outputs.shape)}; qdistill needs class logits (batch, classes)")
    predicted, in_data = outputs.shape[1], data.bundle.num_classes
    if data.bundle.has_labels and in_data != predicted:
        raise DataError(f"data: labels cover {in_data} classes but the teacher predicts {predicted}; they must be equal")


def build_student(recipe: Recipe, data: Prepared) -> nn.Module | None:
    """The float student architecture when the recipe names one (None: a copy of the teacher)."""
    if recipe.student is None:
        return None
    torch.manual_seed(recipe.train.seed)
    return build_model(recipe.student, data.model_kwargs, "student")


def run_recipe(recipe: Recipe, out: str | Path, resume: bool = False, show_progress: bool = True,
               data: Prepared | None = None, teacher: nn.Module | None = None,
               export: bool = True) -> Result:
    """Run one recipe end to end and write its outputs under ``out``; returns the Result."""
    out = ensure_writable_dir(out)
    data = data or prepare_data(recipe)
    teacher_history = None
    if teacher is None:
        teacher, teacher_history = obtain_teacher(recipe, data, out, resume, show_progress)
    check_classes(teacher, data)
    plan = _checkpoint_plan(recipe, out, resume, recipe.train.checkpoint_every_steps)
    result = distill(copy.deepcopy(teacher), data.train, data.val, recipe, student=build_student(recipe, data),
                     checkpoint=plan, show_progress=show_progress, model_kwargs=data.model_kwargs)
    if teacher_history is not None:
        result.report["teacher"]["history"] = teacher_history
    if export and (recipe.export.onnx or recipe.export.packed):
        result.report.update(export_outputs(result, data, out))
    result.save(out)
    write_html_report(result, data, out)
    return result


def write_html_report(result: Result, data: Prepared, out: Path) -> Path:
    """``out/report.html``: the human report, with the first ten validation images and predictions."""
    from qdistill.html_report import render
    from qdistill.io import atomic_write_text

    images = data.bundle.val_x[:10]
    device = next(result.student.parameters()).device
    with torch.no_grad():
        predicted = result.student.eval()(images.to(device)).argmax(dim=1).tolist()
    labels = data.bundle.val_y[:10].tolist() if data.bundle.val_y is not None else [None] * len(predicted)
    samples = {"images": images.numpy(), "predicted": predicted, "labels": labels}
    return atomic_write_text(out / "report.html", render(result.report, samples))


def export_outputs(result: Result, data: Prepared, out: Path) -> dict[str, Any]:
    """Write the deployment files the recipe asks for; returns report.json's ``export`` section."""
    from qdistill.export import export_all

    section = export_all(result.student, out, data.bundle.train_x[:1], data.val, result.recipe.export,
                         float_model=None)
    return {"export": section} if section else {}


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON output (demo.json and friends)."""
    atomic_write_json(path, data)
