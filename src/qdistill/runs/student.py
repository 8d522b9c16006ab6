"""The student stage: ``distill`` trains a quantized student with QAT + KD and evaluates it; ``Result`` holds it."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.batch import batch_inputs, check_inputs, input_rows, input_tensors, move_inputs, split_batch
from qdistill.errors import DataError, ModelError, QdistillError, RecipeError
from qdistill.evaluate import evaluate, evaluate_embeddings, logit_metrics, predict
from qdistill.kd import CachedTeacherLoader, Distiller, KDLoss, MixedLoader, freeze
from qdistill.kd.hidden import AttentionRelationKD, HiddenStateKD
from qdistill.kd.losses import EmbeddingKDLoss
from qdistill.models.convnet import hint_layer
from qdistill.models.outputs import class_logits
from qdistill.quant import layer_table, prepare
from qdistill.recipe import FeatureHint, Recipe, TrainSpec
from qdistill.report import bit_summary, build_report
from qdistill.runs.rundir import RunDir, save_run
from qdistill.runs.stages import run_kind
from qdistill.train import CheckpointPlan, distributed, fit
from qdistill.train.tensorboard import require_tensorboard, step_sizes


@dataclass
class Result:
    """What ``distill`` returns: the fake-quant student, its report, and how to save them.

    Example:
        >>> result = qd.distill(teacher, train_loader, val_loader, recipe, test=test_loader)  # doctest: +SKIP
        >>> result.report["student"]["accuracy"]                                               # doctest: +SKIP
        >>> result.save("out/")     # student.safetensors, report.json, recipe.yaml            # doctest: +SKIP
    """

    student: nn.Module
    report: dict[str, Any]
    recipe: Recipe
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # the evaluation split's predicted classes (student, teacher) and labels, as the report measured them,
    # with the loader they came from: report.html's prediction grids reuse them instead of predicting again
    predictions: dict[str, Any] | None = None

    def save(self, directory: str | Path) -> Path:
        """Write ``student.safetensors``, ``report.json`` and ``recipe.yaml`` (each atomically)."""
        run = RunDir(Path(directory))
        run.path.mkdir(parents=True, exist_ok=True)
        save_run(run, self.student, self.report, self.recipe, self.model_kwargs)
        return run.path


def _as_recipe(recipe: Recipe | dict | None) -> Recipe:
    if recipe is None:
        return Recipe()
    return recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)


def first_batch(loader: Iterable[Any], name: str) -> Any:
    """The first batch of a loader; a loader with none is a ``DataError``."""
    for batch in loader:
        return batch
    raise DataError(f"{name}: the loader yielded no batches; at least one sample is needed")


def check_loader(loader: Iterable[Any], name: str, num_classes: int, check_labels: bool = True) -> tuple[bool, int]:
    """Scan a loader before training: finite inputs, labels in ``0..num_classes-1``; returns (labelled, samples).

    ``check_labels`` False (embedding outputs, which use no labels): labels are not checked, and the
    loader counts as unlabeled."""
    labelled, samples = None, 0
    for batch in loader:
        inputs, labels = split_batch(batch)
        check_inputs(inputs, name)
        samples += input_rows(inputs)
        if any(tensor.is_floating_point() and not torch.isfinite(tensor).all() for tensor in input_tensors(inputs)):
            raise DataError(f"{name}: inputs contain NaN or Inf values; all inputs must be finite")
        labelled = labels is not None and check_labels
        if labelled and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = int(labels.max()) if labels.max() >= num_classes else int(labels.min())
            raise DataError(f"{name}: label {bad} is outside the model's {num_classes} classes; allowed: 0..{num_classes - 1}")
    if labelled is None:
        raise DataError(f"{name}: the loader yielded no batches; at least one sample is needed")
    return labelled, samples


def _paired_classes(teacher: nn.Module, student: nn.Module, example: Any) -> int:
    teacher_shape = class_logits(teacher, example, "teacher").shape
    student_shape = class_logits(student, example, "student").shape
    if teacher_shape != student_shape:
        raise ModelError(f"teacher outputs shape {tuple(teacher_shape)} but student outputs {tuple(student_shape)}; they must match")
    return teacher_shape[1]


def distill(teacher: nn.Module, train: Iterable[Any], val: Iterable[Any], recipe: Recipe | dict | None = None, *,
            test: Iterable[Any] | None = None, student: nn.Module | None = None,
            checkpoint: CheckpointPlan | None = None, show_progress: bool = True,
            model_kwargs: dict[str, Any] | None = None, tensorboard_dir: str | Path | None = None,
            unlabeled: Iterable[Any] | None = None) -> Result:
    """Train a quantized student of ``teacher`` with QAT + KD and evaluate it.

    ``train``/``val``/``test`` yield ``(x, y)`` or ``(x,)``, where ``x`` is a tensor, a tuple of
    tensors (``((a, b), y)``: the model is called as ``model(a, b)``) or a dict of named tensors
    (``model(**x)``), or dicts in the Hugging Face convention (``{"input_ids", "attention_mask",
    ..., "labels"}``); integer inputs (token ids) stay integer (``qdistill.batch``). Validation steers training (early
    stop at ``train.target_accuracy``, the history); the report's metrics are measured on
    ``test``, which nothing was tuned on (without ``test`` they are measured on ``val``, and
    report.json says so in ``evaluated_on``). ``student`` is an optional float model of another
    architecture (default: a copy of the teacher). The teacher is never modified. With
    ``train.tensorboard: true`` the scalars go to ``tensorboard_dir`` (``qdistill run`` uses ``DIR/tb``).

    ``unlabeled`` (a loader of inputs, e.g. ``data.make_unlabeled_loader``) is transfer data the
    student learns from the teacher alone, mixed into every step by ``kd.mixing``'s rule; it is
    used when the recipe distils (``distill.alpha > 0``), and report.json's ``data`` counts the
    labelled and unlabeled samples used.

    Example:
        >>> result = qd.distill(teacher, train_loader, val_loader, {"quant": {"weight_bits": 4}},  # doctest: +SKIP
        ...                     test=test_loader)
    """
    recipe = _as_recipe(recipe)
    tensorboard_dir = _tensorboard_dir(recipe, tensorboard_dir)
    device = next(teacher.parameters()).device
    frozen_teacher = freeze(copy.deepcopy(teacher))
    example = batch_inputs(first_batch(train, "train data"))
    check_inputs(example, "train data")
    example = move_inputs(example, device)
    float_student = copy.deepcopy(student if student is not None else teacher).to(device)
    kind = run_kind(recipe, float_student)
    _check_kind(recipe, kind)
    num_classes = _paired_classes(frozen_teacher, float_student, example)  # for embeddings: the width
    logits = kind == "logits"
    labelled, train_samples = check_loader(train, "train data", num_classes, logits)
    val_labelled, val_samples = check_loader(val, "validation data", num_classes, logits)
    sizes = {"train_samples": train_samples, "val_samples": val_samples}
    if test is not None:
        sizes["test_samples"] = check_loader(test, "test data", num_classes, logits)[1]
    torch.manual_seed(recipe.train.seed)
    if hasattr(getattr(train, "sampler", None), "set_epoch"):
        train.sampler.set_epoch(0)  # calibrate on the same batches whatever ran on this loader before
    quantized = prepare(float_student, recipe.quant, calibration_data=distributed.global_loader(train))
    _paired_classes(frozen_teacher, quantized, example)
    alpha = recipe.distill.alpha if labelled else 1.0  # label-free: the teacher is the only target
    hints = feature_hints(recipe)
    extras = inner_losses(recipe, frozen_teacher, quantized)
    loss = (KDLoss(recipe.distill.temperature, alpha) if logits else
            EmbeddingKDLoss(recipe.distill.cosine_weight, recipe.distill.mse_weight, recipe.distill.relation_weight))
    distiller = Distiller(frozen_teacher, quantized, loss, hints, example_input=example, extra_losses=extras)

    def validate() -> float | None:
        return evaluate(quantized, val, num_classes)["accuracy"] if val_labelled else None

    cached, teacher_logits = _teacher_logits_source(train, frozen_teacher, bool(hints or extras), alpha)
    loader = cached if cached is not None else train
    unlabeled_samples = 0
    if _uses_unlabeled(unlabeled, recipe, alpha):
        unlabeled_samples = check_loader(unlabeled, "unlabeled data", num_classes, logits)[1]
        loader, teacher_logits = _mixed(loader, unlabeled, frozen_teacher, teacher_logits)
    sizes.update(labelled_samples=train_samples if labelled else 0,
                 unlabeled_samples=(0 if labelled else train_samples) + unlabeled_samples)
    history = fit(distiller, loader, training_spec(recipe.train, kind), phase="student", validate=validate,
                  plan=checkpoint, show_progress=show_progress, tensorboard=tensorboard_dir)
    distiller.remove_hooks()
    extra = {"data": sizes, "teacher_logits": teacher_logits, "evaluated_on": "test" if test is not None else "validation",
             "output_kind": kind}
    predictions: dict[str, Any] = {}
    report = make_report(recipe, frozen_teacher, quantized, test if test is not None else val, num_classes, history,
                         label_free=not labelled, extra=extra, kind=kind, predictions=predictions)
    return Result(student=quantized, report=report, recipe=recipe, model_kwargs=model_kwargs or {},
                  predictions=predictions or None)


def training_spec(spec: TrainSpec, kind: str) -> TrainSpec:
    """``spec`` with ``dropout: auto`` resolved for a student of output ``kind``: off for an embedding student,
    whose only target is the teacher's embedding of the same input (dropout adds noise larger than the
    quantization error it trains away; docs/transformers.md), on for class logits.

    Example:
        >>> training_spec(TrainSpec(), "embedding").dropout, training_spec(TrainSpec(), "logits").dropout
        ('off', 'on')
    """
    if spec.dropout != "auto":
        return spec
    return spec.model_copy(update={"dropout": "off" if kind == "embedding" else "on"})


def _check_kind(recipe: Recipe, kind: str) -> None:
    """Settings that assume class logits are refused for embedding outputs, and embedding settings for class logits
    (one line, before any training)."""
    if kind != "embedding":
        if recipe.distill.relation_weight > 0:
            raise RecipeError("distill.relation_weight: similarity-relation KD goes with embedding outputs "
                              "(distill.output: embedding); remove it for a model that returns class logits")
        return
    if recipe.train.target_accuracy is not None:
        raise RecipeError("train.target_accuracy: an embedding model has no accuracy (its metrics are the cosine and "
                          "retrieval agreement to the teacher); remove train.target_accuracy")
    if recipe.distill.features:
        raise RecipeError("distill.features: hints on module outputs go with class logits; for an embedding "
                          "encoder use distill.hidden_layers: [[teacher_layer, student_layer], ...]")


def inner_losses(recipe: Recipe, teacher: nn.Module, student: nn.Module) -> list[nn.Module]:
    """The recipe's losses on inner activations (``kd.hidden``): hidden-state pairs and attention relations."""
    extras: list[nn.Module] = []
    if recipe.distill.hidden_layers:
        extras.append(HiddenStateKD(teacher, student, recipe.distill.hidden_layers, recipe.distill.hidden_weight))
    if recipe.distill.attention_relation_weight > 0:
        extras.append(AttentionRelationKD(teacher, student, recipe.distill.attention_relation_weight))
    return extras


def _tensorboard_dir(recipe: Recipe, directory: str | Path | None) -> Path | None:
    """Where this run's TensorBoard scalars go (None: not asked for); checked before any training."""
    if not recipe.train.tensorboard:
        return None
    require_tensorboard()
    if directory is None:
        raise QdistillError("train.tensorboard is true but no folder was given; pass tensorboard_dir= to distill "
                            "(qdistill run writes DIR/tb/)")
    return Path(directory)


def _teacher_logits_source(train: Iterable[Any], teacher: nn.Module, hints: bool,
                           alpha: float) -> tuple[CachedTeacherLoader | None, str]:
    """The cached loader (or None) and how the student gets the teacher's logits: cached, live or unused."""
    if alpha == 0 and not hints:
        return None, "unused"
    if hints:
        return None, "live"  # feature hints need the teacher's inner activations at every step
    cached = CachedTeacherLoader.wrap(train, teacher)
    return cached, "cached" if cached is not None else "live"


def feature_hints(recipe: Recipe) -> list[FeatureHint]:
    """``distill.features``, with ``auto`` resolved to the built-in models' documented pair (``models.convnet.hint_layer``).

    Example:
        >>> [hint.student for hint in feature_hints(Recipe(student={"name": "mnist_cnn_small"}, distill={"features": "auto"}))]
        ['features']
    """
    if recipe.distill.features != "auto":
        return list(recipe.distill.features)
    student_spec = recipe.student or recipe.model
    teacher_layer = hint_layer(recipe.model.name or "", recipe.model.kwargs)
    student_layer = hint_layer(student_spec.name or "", student_spec.kwargs)
    if teacher_layer is None or student_layer is None:
        raise RecipeError("distill.features: auto knows the built-in models mnist_cnn, mnist_cnn_small and mlp; for "
                          "other models give the pairs, e.g. [{student: layer3, teacher: layer3}]")
    return [FeatureHint(student=student_layer, teacher=teacher_layer)]


def _uses_unlabeled(unlabeled: Iterable[Any] | None, recipe: Recipe, alpha: float) -> bool:
    """Unlabeled data trains only with the KD loss: without it (``distill.alpha: 0``) it is left out, with a warning
    when the recipe asked for ``data.unlabeled`` (``data.label_fraction``'s remainder is left out quietly: QAT on the
    labelled fraction is that recipe's no-KD baseline)."""
    if unlabeled is None:
        return False
    if alpha == 0:
        if recipe.data.unlabeled is not None:
            warnings.warn("data.unlabeled is not used: distill.alpha is 0 (QAT only), and unlabeled samples train "
                          "with the KD loss alone; set distill.alpha > 0 to learn from them", stacklevel=3)
        return False
    return True


def _mixed(loader: Iterable[Any], unlabeled: Iterable[Any], teacher: nn.Module, teacher_logits: str) -> tuple[MixedLoader, str]:
    """The mixed loader (``kd.mixing``); its teacher logits are cached only when both parts can be."""
    cached = CachedTeacherLoader.wrap(unlabeled, teacher) if teacher_logits == "cached" else None
    return MixedLoader(loader, cached if cached is not None else unlabeled), "cached" if cached is not None else "live"


def make_report(recipe: Recipe, teacher: nn.Module, student: nn.Module, loader: Iterable[Any], num_classes: int,
                history: list[dict[str, Any]], label_free: bool = False, extra: dict[str, Any] | None = None,
                kind: str = "logits", predictions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate teacher and student on ``loader`` (the test split) and build report.json.

    ``kind`` "embedding": the student's embeddings against the teacher's (``evaluate.evaluate_embeddings``).
    For class logits each model predicts once; a ``predictions`` dict receives the predicted classes
    (``student``, ``teacher``), the ``labels`` and the ``loader`` (see ``Result.predictions``)."""
    if kind == "embedding":
        teacher_metrics, student_metrics = evaluate_embeddings(student, teacher, loader)
    else:
        teacher_logits, labels = predict(teacher, loader)
        student_logits, _ = predict(student, loader)
        teacher_metrics = logit_metrics(teacher, teacher_logits, labels, num_classes)
        student_metrics = logit_metrics(student, student_logits, labels, num_classes, teacher_logits)
        if predictions is not None:
            predictions.update(loader=loader, labels=labels, student=student_logits.argmax(axis=1),
                               teacher=teacher_logits.argmax(axis=1))
    steps = step_sizes(student)
    per_layer = {name: {**row, **steps.get(name, {})} for name, row in layer_table(student).items()}
    student_info = {
        **bit_summary(per_layer),
        "per_layer": per_layer,
        "unquantized_layers": [f"{name}: {reason}" for name, reason in getattr(student, "qdistill_unquantized", {}).items()],
        "folded_batchnorms": list(getattr(student, "qdistill_folded", [])),
    }
    if getattr(student, "qdistill_smoothed", None):  # quant.smoothing: {layer: max s / min s}
        student_info["smoothed_layers"] = {name: round(spread, 3) for name, spread in student.qdistill_smoothed.items()}
    extra = dict(extra or {})
    if label_free:
        extra["label_free"] = True
    return build_report(recipe.to_dict(), teacher_metrics, student_metrics, student_info, history, recipe.train.seed, extra)
