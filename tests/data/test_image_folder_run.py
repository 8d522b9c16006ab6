"""Image folders in training: the teacher-logit cache only without augmentation, and `qdistill run` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import qdistill as qd
from data.digit_images import write_digit_folder
from qdistill import models
from qdistill.cli import main
from qdistill.data import load_data, make_loaders
from qdistill.kd.cache import CachedImageLoader, CachedTeacherLoader, is_cacheable
from qdistill.recipe import DataSpec

W8 = {"weight_bits": 8, "act_bits": 8, "calibration_batches": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"), count_per_class=10)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return models.create("tiny_resnet", in_channels=3, num_classes=10, image_size=8, width=4).eval()


def _loaders(folder, augment: str):
    bundle = load_data(DataSpec(image_folder=str(folder), image_size=8, augment=augment, workers=2))
    return make_loaders(bundle, 16, seed=0)


def test_unaugmented_images_are_cached_by_index_with_the_same_batches(folder, teacher):
    train, _, _ = _loaders(folder, "none")
    cached = CachedTeacherLoader.wrap(train, teacher)
    assert isinstance(cached, CachedImageLoader) and len(cached) == len(train)
    train.sampler.set_epoch(1)
    for (x, y), (cached_x, cached_y, logits) in zip(train, cached, strict=True):
        assert torch.equal(x, cached_x) and torch.equal(y, cached_y)
        with torch.no_grad():
            assert torch.allclose(logits, teacher(x), atol=1e-5)


def test_augmented_images_run_the_teacher_live(folder, teacher):
    augmented, val, _ = _loaders(folder, "standard")
    plain, _, _ = _loaders(folder, "none")
    assert not is_cacheable(augmented) and is_cacheable(plain)
    recipe = {"train": {"epochs": 1}, "quant": W8}
    assert qd.distill(teacher, augmented, val, recipe, show_progress=False).report["teacher_logits"] == "live"
    assert qd.distill(teacher, plain, val, recipe, show_progress=False).report["teacher_logits"] == "cached"


def test_qdistill_run_trains_an_rgb_model_on_an_image_folder(folder, tmp_path, monkeypatch):
    recipe = {"model": {"name": "tiny_resnet", "kwargs": {"width": 4}},
              "data": {"image_folder": str(folder), "image_size": 8, "batch_size": 16, "workers": 2},
              "quant": W8, "train": {"epochs": 1}, "teacher_train": {"epochs": 1}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "recipe.yaml"), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {"train_samples": 64, "val_samples": 16, "test_samples": 20, "labelled_samples": 64,
                              "unlabeled_samples": 0}
    assert report["teacher_logits"] == "cached"
    assert report["recipe"]["data"]["image_folder"] == str(folder)
    assert (out / "model.onnx").is_file() and (out / "student.qpack.safetensors").is_file()
    assert main(["eval", str(out)]) == 0  # the saved run rebuilds its student and data
