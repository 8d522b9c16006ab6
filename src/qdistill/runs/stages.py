"""The stages before distillation: the run's data, its teacher and its student architecture.

Each check runs before any training, so a recipe whose layers, data or models do not fit fails in
seconds with one line, not after the teacher has trained.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qdistill.batch import move_inputs, take_rows
from qdistill.data import DataBundle, load_data, make_loaders, make_unlabeled_loader
from qdistill.errors import DataError
from qdistill.evaluate import evaluate
from qdistill.models import build_model
from qdistill.models.hf import layer_indices
from qdistill.models.narrow import init_from_teacher
from qdistill.models.outputs import class_logits, output_kind
from qdistill.quant.prepare import check_overrides
from qdistill.recipe import Recipe
from qdistill.runs.rundir import RunDir, load_teacher, save_teacher
from qdistill.train import CheckpointPlan, Supervised, fingerprint, fit
from qdistill.train.batchnorm import recalibrate_batchnorm


@dataclass
class RunData:
    """Data and loaders shared by the stages of one run (validation steers, test reports).

    ``unlabeled`` loads the inputs without labels (``data.label_fraction``'s remainder and
    ``data.unlabeled``), or is None.
    """

    bundle: DataBundle
    train: Any
    val: Any
    test: Any
    model_kwargs: dict[str, Any]
    unlabeled: Any = None


def default_device() -> torch.device:
    """CUDA when present, else the CPU (data stays on the CPU; batches move per step)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_data(recipe: Recipe) -> RunData:
    """Load the recipe's data, split it into train/validation/test and build deterministic loaders."""
    bundle = load_data(recipe.data)
    tensor_augment = "none" if recipe.data.image_folder else recipe.data.augment  # image files augment as they decode
    train, val, test = make_loaders(bundle, recipe.data.batch_size, recipe.data.seed, tensor_augment)
    unlabeled_batch = max(1, round(recipe.data.batch_size * recipe.data.unlabeled_ratio))
    unlabeled = make_unlabeled_loader(bundle, unlabeled_batch, recipe.data.seed, tensor_augment)
    return RunData(bundle, train, val, test, bundle.model_kwargs(), unlabeled)


def checkpoint_plan(recipe: Recipe, run: RunDir, resume: bool, every_steps: int | None) -> CheckpointPlan:
    """Where and how often a phase of this recipe checkpoints (the fingerprint ties it to the recipe)."""
    return CheckpointPlan(run.checkpoint, fingerprint(recipe.to_yaml()), every_steps, resume)


def obtain_teacher(recipe: Recipe, data: RunData, run: RunDir, resume: bool, show_progress: bool,
                   reuse_cached: bool = False) -> tuple[nn.Module, list[dict[str, Any]] | None]:
    """The recipe's teacher and its training history: loaded from its checkpoint, reused from the run folder, or trained here."""
    torch.manual_seed(recipe.teacher_train.seed)  # the same initial weights in every run of this recipe
    teacher = build_model(recipe.model, data.model_kwargs).to(default_device())
    check_classes(teacher, data, run_kind(recipe, teacher))  # before any training: the data must fit the model
    check_quant_layers(recipe, data, teacher)
    if recipe.model.checkpoint or pretrained_teacher(recipe, teacher):
        return teacher, None
    if run.teacher.is_file() and (resume or reuse_cached):
        return teacher, load_teacher(run, teacher)
    if not data.bundle.has_labels:
        raise DataError("model.checkpoint: the data has no labels, so a teacher cannot be trained here; give model.checkpoint")
    plan = checkpoint_plan(recipe, run, resume, recipe.teacher_train.checkpoint_every_steps)
    history = fit(Supervised(teacher), data.train, recipe.teacher_train, phase="teacher",
                  validate=lambda: evaluate(teacher, data.val, data.bundle.num_classes)["accuracy"], plan=plan,
                  show_progress=show_progress)
    recalibrate_batchnorm(teacher, data.train, recipe.teacher_train.bn_recalibration_batches)
    save_teacher(run, teacher, history)
    return teacher, history


def run_kind(recipe: Recipe, model: nn.Module) -> str:
    """The run's output kind: ``distill.output`` when not ``auto``, else the model's (``models.outputs.output_kind``).

    Example:
        >>> run_kind(Recipe(distill={"output": "embedding"}), nn.Linear(2, 2)), run_kind(Recipe(), nn.Linear(2, 2))
        ('embedding', 'logits')
    """
    return output_kind(model, None if recipe.distill.output == "auto" else recipe.distill.output)


def pretrained_teacher(recipe: Recipe, teacher: nn.Module) -> bool:
    """A Hugging Face embedding model's folder holds the trained teacher: nothing to train (a classifier's new
    head still trains on the labels)."""
    return recipe.model.hf is not None and run_kind(recipe, teacher) == "embedding"


def check_quant_layers(recipe: Recipe, data: RunData, teacher: nn.Module) -> None:
    """The recipe's quantization settings must fit the student before training (the rule ``prepare`` applies)."""
    check_overrides(build_student(recipe, data) or teacher, recipe.quant)


def check_classes(teacher: nn.Module, data: RunData, kind: str = "logits") -> None:
    """The teacher must return class logits for the data's inputs, one per class in the labels (an embedding
    model, ``kind`` "embedding", must return one vector per input; labels are not used)."""
    example = move_inputs(take_rows(data.bundle.train_x, slice(0, 2)), next(teacher.parameters()).device)
    predicted = class_logits(teacher, example, "model").shape[1]
    in_data = data.bundle.num_classes
    if kind == "logits" and data.bundle.has_labels and in_data != predicted:
        raise DataError(f"data: labels cover {in_data} classes but the teacher predicts {predicted}; they must be equal")


def build_student(recipe: Recipe, data: RunData) -> nn.Module | None:
    """The float student architecture when the recipe names one (None: a copy of the teacher)."""
    if recipe.student is None:
        return None
    torch.manual_seed(recipe.train.seed)
    return build_model(recipe.student, data.model_kwargs, "student")


def initial_student(recipe: Recipe, data: RunData, teacher: nn.Module) -> tuple[nn.Module | None, dict[str, Any]]:
    """The float student the student stage starts from, and report.json's ``student_init`` saying how it was made.

    No ``student`` section: a copy of the teacher (``from: teacher_copy``). A student checkpoint
    is loaded as it is (``checkpoint``). Otherwise ``distill.student_init: teacher`` fills it from the
    teacher where shapes allow (``models.narrow``; ``from: teacher_channels`` with the layers done and
    those left random) and ``scratch`` keeps its random initialisation.
    """
    student = build_student(recipe, data)
    if student is None:
        return None, {"from": "teacher_copy"}
    if recipe.student.checkpoint:
        return student, {"from": "checkpoint"}
    if recipe.student.hf is not None:  # its folder's weights; num_layers keeps evenly spaced layers of that model
        total = getattr(getattr(teacher, "encoder", None), "config", None)
        layers = None
        if recipe.student.num_layers is not None and total is not None and recipe.student.hf == recipe.model.hf:
            layers = layer_indices(total.num_hidden_layers, recipe.student.num_layers)
        return student, {"from": "hf_folder", **({"teacher_layers": layers} if layers is not None else {})}
    if recipe.distill.student_init == "scratch":
        return student, {"from": "scratch"}
    done = init_from_teacher(student, teacher)
    if not done["layers"]:
        warnings.warn("distill.student_init: no layer of the student matches the teacher's by name and shape, so it "
                      "starts from its random initialisation; set distill.student_init: scratch to say so", stacklevel=2)
    return student, {"from": "teacher_channels", **done}
