"""torchvision and timm architectures (the vision extra; `make test-vision`): built as the zoo builds them,
loaded from local checkpoints, prepared for QAT and distilled on a small image folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import qdistill as qd
from data.digit_images import write_digit_folder
from qdistill.cli import main
from qdistill.data import load_data, make_loaders
from qdistill.errors import ModelError
from qdistill.io import save_weights
from qdistill.models import build_model, create_zoo_model
from qdistill.quant import layer_table
from qdistill.recipe import DataSpec, ModelSpec

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

DATA = {"in_channels": 3, "num_classes": 10, "image_size": 32}
W8 = {"weight_bits": 8, "act_bits": 8, "calibration_batches": 1, "init": "minmax"}  # minmax: quick on big layers
ZOO_MODELS = [("torchvision", "resnet18"), ("torchvision", "mobilenet_v3_small"), ("timm", "resnet10t")]


def _reference(zoo: str, name: str, **kwargs) -> torch.nn.Module:
    """The zoo's own constructor, called directly."""
    if zoo == "torchvision":
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 32x32 RGB image folder: 10 classes x 6 digits; 38 training images, one batch of 64."""
    root = write_digit_folder(tmp_path_factory.mktemp("digits"), count_per_class=6, scale=4)
    bundle = load_data(DataSpec(image_folder=str(root), image_size=32, workers=0))
    return root, bundle, make_loaders(bundle, 64, seed=0)


@pytest.mark.parametrize(("zoo", "name"), ZOO_MODELS)
def test_zoo_models_are_built_as_the_zoo_builds_them(zoo, name):
    torch.manual_seed(0)
    model = build_model(ModelSpec(**{zoo: name}), DATA).eval()
    torch.manual_seed(0)
    reference = _reference(zoo, name, num_classes=10).eval()
    inputs = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(inputs), reference(inputs))
    assert model(inputs).shape == (2, 10)


def test_timm_builds_its_stem_for_the_data_channels():
    torch.manual_seed(0)
    model = build_model(ModelSpec(timm="resnet10t"), {**DATA, "in_channels": 1}).eval()
    torch.manual_seed(0)
    reference = _reference("timm", "resnet10t", num_classes=10, in_chans=1).eval()
    inputs = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(inputs), reference(inputs))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_zoo_weights_come_from_a_local_checkpoint(tmp_path, suffix):
    torch.manual_seed(3)
    reference = _reference("torchvision", "resnet18", num_classes=10).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_weights(path, reference.state_dict())
    model = build_model(ModelSpec(torchvision="resnet18", checkpoint=str(path)), DATA).eval()
    inputs = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(inputs), reference(inputs))


@pytest.mark.parametrize(("zoo", "name", "close"), [("torchvision", "resnet19", "resnet18"),
                                                    ("timm", "resnet10", "resnet10t")])
def test_unknown_names_say_how_to_list_the_names(zoo, name, close):
    with pytest.raises(ModelError) as error:
        create_zoo_model(zoo, name, field="student")
    message = str(error.value)
    assert message.startswith(f"student.{zoo}: {name!r} is not a {zoo} model; did you mean ") and close in message
    assert message.endswith(f"every name: python -c 'import {zoo}; print({zoo + '.models' if zoo == 'torchvision' else zoo}"
                            ".list_models())'")


def test_bad_zoo_arguments_are_one_line():
    with pytest.raises(ModelError, match=r"^model.torchvision: resnet18 cannot be built with arguments \{'depth': 3\}"):
        create_zoo_model("torchvision", "resnet18", depth=3)


@pytest.mark.parametrize(("zoo", "name"), ZOO_MODELS)
def test_zoo_models_prepare_and_take_a_qat_kd_step_on_an_image_folder(images, zoo, name):
    _, bundle, (train, val, test) = images
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(**{zoo: name}), bundle.model_kwargs()).eval()
    result = qd.distill(teacher, train, val, {"train": {"epochs": 1}, "quant": W8}, test=test, show_progress=False)
    quantized = {layer for layer, bits in layer_table(result.student).items() if bits["weight_bits"] == 8}
    convs = {layer for layer, module in teacher.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))}
    assert quantized == convs  # qdistill.quant.prepare quantized every conv and linear layer
    assert len(result.report["history"]) == 1 and torch.isfinite(torch.tensor(result.report["history"][0]["loss"]))
    assert result.report["data"] == {"train_samples": 38, "val_samples": 10, "test_samples": 12, "labelled_samples": 38,
                                     "unlabeled_samples": 0}
    assert result.report["teacher_logits"] == "cached"


def test_a_recipe_runs_a_torchvision_teacher_from_its_checkpoint_and_a_timm_student(images, tmp_path, monkeypatch):
    root, _, _ = images
    torch.manual_seed(0)
    save_weights(tmp_path / "teacher.safetensors", _reference("torchvision", "resnet18", num_classes=10).state_dict())
    recipe = {"model": {"torchvision": "resnet18", "checkpoint": str(tmp_path / "teacher.safetensors")},
              "student": {"timm": "resnet10t", "kwargs": {"drop_rate": 0.1}},
              "data": {"image_folder": str(root), "image_size": 32, "normalize": "imagenet", "workers": 2},
              "quant": W8, "train": {"epochs": 1}, "export": {"onnx": False, "packed": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "recipe.yaml"), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["student"]["timm"] == "resnet10t" and "history" not in report["teacher"]  # not trained here
    assert main(["eval", str(out)]) == 0  # the saved timm student is rebuilt from the recipe
