"""End-to-end ``distill`` on scikit-learn's digits, save/load, determinism, teacher untouched."""

from __future__ import annotations

import copy

import torch

import qdistill as qd
from qdistill.recipe import Recipe

REPORT_KEYS = {"qdistill_version", "recipe", "teacher", "student", "per_class", "history", "environment"}
MODEL_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "params", "size_bytes"}
STUDENT_KEYS = MODEL_KEYS | {"weight_bits", "act_bits", "agreement_with_teacher", "per_layer", "unquantized_layers"}
HISTORY_KEYS = {"epoch", "loss", "kd_loss", "task_loss", "val_accuracy", "lr", "seconds"}


def _recipe(**train):
    return Recipe(data={"name": "digits"}, quant={"weight_bits": 4, "act_bits": 4},
                  train={"epochs": 2, "lr": 1e-3, **train})


def test_distill_end_to_end_far_above_chance(digits, digits_teacher, tmp_path):
    bundle, train, val = digits
    before = copy.deepcopy(digits_teacher.state_dict())
    result = qd.distill(digits_teacher, train, val, _recipe(), show_progress=False, model_kwargs=bundle.model_kwargs())
    report = result.report
    assert REPORT_KEYS <= set(report)
    assert MODEL_KEYS <= set(report["teacher"]) and STUDENT_KEYS <= set(report["student"])
    assert all(HISTORY_KEYS <= set(row) for row in report["history"]) and len(report["history"]) == 2
    assert report["student"]["accuracy"] > 0.85  # chance is 0.10
    assert report["student"]["size_bytes"] < report["teacher"]["size_bytes"] / 4
    assert set(report["student"]["per_layer"]) == {"features.0", "features.3", "classifier.2", "classifier.5"}
    bits = {name: (row["weight_bits"], row["act_bits"]) for name, row in report["student"]["per_layer"].items()}
    assert bits["features.3"] == (4, 4) and bits["features.0"] == (8, 8)  # the first layer stays at 8 bits
    assert len(report["per_class"]["student"]) == 10
    for name, tensor in digits_teacher.state_dict().items():  # the teacher is never modified
        assert torch.equal(tensor, before[name]), name
    assert all(p.requires_grad for p in digits_teacher.parameters())

    result.save(tmp_path)
    assert {"student.safetensors", "report.json", "recipe.yaml"} <= {p.name for p in tmp_path.iterdir()}
    loaded = qd.load(tmp_path)
    x = bundle.val_x[:64]
    torch.testing.assert_close(loaded(x), result.student.eval()(x), atol=0, rtol=0)
    assert qd.evaluate(loaded, val)["accuracy"] == report["student"]["accuracy"]


def test_same_seed_same_student(digits, digits_teacher):
    _, train, val = digits
    runs = [qd.distill(digits_teacher, train, val, _recipe(epochs=1), show_progress=False) for _ in range(2)]
    for name, tensor in runs[0].student.state_dict().items():
        assert torch.equal(tensor, runs[1].student.state_dict()[name]), name


def test_early_stop_at_target(digits, digits_teacher):
    _, train, val = digits
    result = qd.distill(digits_teacher, train, val, _recipe(epochs=6, target_accuracy=0.5), show_progress=False)
    assert len(result.report["history"]) == 1  # 50% is reached after the first epoch


def test_label_free_distillation(digits, digits_teacher):
    bundle, _, val = digits
    from qdistill.data import make_loader

    unlabelled = make_loader(bundle.train_x, None, 32, 0, shuffle=True)
    result = qd.distill(digits_teacher, unlabelled, val, _recipe(epochs=1), show_progress=False)
    assert result.report["label_free"] is True
    assert result.report["history"][0]["task_loss"] == 0.0
    assert result.report["student"]["accuracy"] > 0.8


def test_schedules_and_optimizers_train(digits, digits_teacher):
    _, train, val = digits
    for optimizer, schedule in (("sgd", "step"), ("adamw", "exponential"), ("adam", "linear")):
        recipe = _recipe(epochs=2, optimizer=optimizer, schedule=schedule, warmup_epochs=1, lr=5e-3 if optimizer == "sgd" else 1e-3)
        history = qd.distill(digits_teacher, train, val, recipe, show_progress=False).report["history"]
        assert history[0]["lr"] > 0 and history[-1]["val_accuracy"] > 0.5, (optimizer, schedule)


def test_report_predictions_are_reused_for_the_grids_and_equal_fresh_ones(digits, digits_teacher, monkeypatch):
    # reference: the same samples predicted afresh (predictions=None), independent of the report's pass
    import numpy as np

    from qdistill.evaluate import predict
    from qdistill.runs import recipe_run
    from qdistill.runs.recipe_run import prediction_samples
    from qdistill.runs.stages import RunData

    bundle, train, val = digits
    result = qd.distill(digits_teacher, train, val, _recipe(epochs=1), show_progress=False)
    assert result.predictions["loader"] is val and len(result.predictions["student"]) == len(bundle.val_x)
    data = RunData(bundle=bundle, train=train, val=val, test=None, model_kwargs={})
    calls = []
    monkeypatch.setattr(recipe_run, "predict", lambda model, loader: calls.append(loader) or predict(model, loader))
    reused = prediction_samples(result.student, data, digits_teacher, predictions=result.predictions)
    assert calls == []  # nothing predicted again
    fresh = prediction_samples(result.student, data, digits_teacher)
    assert calls == [val, val]
    assert reused.keys() == fresh.keys() == {"first", "student_wrong_teacher_right"}
    for name in fresh:
        for key in ("indices", "labels", "student", "teacher"):
            assert reused[name][key] == fresh[name][key], (name, key)
        np.testing.assert_array_equal(reused[name]["images"], fresh[name]["images"])
    batches = list(val)  # the same samples through another loader: predicted afresh
    other = RunData(bundle=bundle, train=train, val=batches, test=None, model_kwargs={})
    assert prediction_samples(result.student, other, digits_teacher, predictions=result.predictions)["first"]["student"] \
        == fresh["first"]["student"]
    assert calls[2:] == [batches, batches]
