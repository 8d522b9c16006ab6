"""Smaller students in a recipe run: started from the teacher's channels (or from scratch, or a checkpoint), the
documented feature hints (``distill.features: auto``), and report.json saying how the student started and how
many labelled and unlabeled samples it learned from."""

from __future__ import annotations

import pytest
import torch

from qdistill.errors import RecipeError
from qdistill.models import create
from qdistill.models.narrow import init_from_teacher
from qdistill.recipe import Recipe
from qdistill.runs.recipe_run import run_recipe
from qdistill.runs.stages import initial_student, prepare_data
from qdistill.runs.student import feature_hints

BASE = {"model": {"name": "mnist_cnn"}, "data": {"name": "digits", "batch_size": 32, "limit": 400},
        "quant": {"weight_bits": 8, "act_bits": 8}, "train": {"epochs": 1}, "teacher_train": {"epochs": 1},
        "export": {"onnx": False, "packed": False}}


def test_initial_student_says_where_it_started():
    recipe = Recipe(**BASE, student={"name": "mnist_cnn_small"})
    data = prepare_data(recipe)
    teacher = create("mnist_cnn", **data.model_kwargs)
    student, init = initial_student(recipe, data, teacher)
    assert init["from"] == "teacher_channels" and init["random"] == [] and len(init["layers"]) == 4
    reference = create("mnist_cnn_small", **data.model_kwargs)
    init_from_teacher(reference, teacher)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), reference.state_dict().values(), strict=True))
    scratch, init = initial_student(recipe.with_overrides(["distill.student_init=scratch"]), data, teacher)
    assert init == {"from": "scratch"} and not torch.equal(scratch.features[0].weight, student.features[0].weight)
    assert initial_student(Recipe(**BASE), data, teacher) == (None, {"from": "teacher_copy"})


def test_auto_hints_resolve_to_the_documented_layers():
    hints = feature_hints(Recipe(**BASE, student={"name": "mnist_cnn_small"}, distill={"features": "auto"}))
    assert [(hint.student, hint.teacher, hint.weight) for hint in hints] == [("features", "features", 1.0)]
    mlp = feature_hints(Recipe(model={"name": "mlp", "kwargs": {"hidden": [32, 16, 8]}}, distill={"features": "auto"}))
    assert [(hint.student, hint.teacher) for hint in mlp] == [("net.8", "net.8")]
    with pytest.raises(RecipeError, match="distill.features: auto knows the built-in models"):
        feature_hints(Recipe(model={"factory": "support:tuple_output_model"}, distill={"features": "auto"}))


def test_recipe_run_with_a_half_width_student_scarce_labels_and_hints(tmp_path):
    recipe = Recipe(**{**BASE, "data": {**BASE["data"], "label_fraction": 0.25, "unlabeled_ratio": 3}},
                    student={"name": "mnist_cnn_small"}, distill={"features": "auto"})
    report = run_recipe(recipe, tmp_path / "run", show_progress=False).report
    data = report["data"]
    assert data["labelled_samples"] + data["unlabeled_samples"] == data["train_samples"] == 256
    assert data["labelled_samples"] == sum(max(1, round(0.25 * n)) for n in _class_counts(recipe))
    assert report["student_init"]["from"] == "teacher_channels"
    assert report["teacher_logits"] == "live" and "feature:features_loss" in report["history"][0]


def _class_counts(recipe: Recipe) -> list[int]:
    labels = prepare_data(recipe.with_overrides(["data.label_fraction=null"])).bundle.train_y
    return torch.bincount(labels).tolist()
