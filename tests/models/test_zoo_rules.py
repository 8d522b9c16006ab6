"""Zoo models without the zoo: argument translation, refused downloads, the recipe's sources, a missing extra, checkpoints."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

from qdistill.cli import main
from qdistill.errors import FileFormatError, ModelError, RecipeError
from qdistill.io import save_weights
from qdistill.models import build_model
from qdistill.models.zoo import check_no_download, create_zoo_model, zoo_kwargs
from qdistill.recipe import ModelSpec, Recipe

DATA = {"in_channels": 3, "num_classes": 10, "image_size": 32}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None


def test_the_data_arguments_are_translated_not_passed_on():
    assert zoo_kwargs("torchvision", "resnet18", DATA, {}) == {"num_classes": 10}
    assert zoo_kwargs("timm", "resnet18", {**DATA, "in_channels": 1}, {}) == {"num_classes": 10, "in_chans": 1}
    assert zoo_kwargs("timm", "resnet18", DATA, {"num_classes": 5, "drop_rate": 0.2}) == {
        "num_classes": 5, "in_chans": 3, "drop_rate": 0.2}  # the recipe's kwargs win
    assert zoo_kwargs("torchvision", "resnet18", {**DATA, "num_classes": 0}, {}) == {}  # unlabelled: the model's default


def test_torchvision_needs_three_channels():
    with pytest.raises(ModelError) as error:
        zoo_kwargs("torchvision", "resnet18", {**DATA, "in_channels": 1}, {}, "student")
    assert str(error.value) == ("student.torchvision: resnet18 takes 3-channel images but the data has 1; use 3-channel "
                                "data (e.g. data.image_folder, decoded as RGB) or a timm model (it builds the stem for in_chans)")


@pytest.mark.parametrize(("zoo", "kwargs"), [
    ("torchvision", {"weights": "IMAGENET1K_V1"}), ("torchvision", {"weights_backbone": "DEFAULT"}),
    ("torchvision", {"pretrained": True}), ("timm", {"pretrained": True}), ("timm", {"checkpoint_path": "w.pth"}),
    ("timm", {"pretrained_cfg_overlay": {"file": "w.bin"}}),
])
def test_arguments_that_would_download_are_refused_before_any_import(zoo, kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ModelError, match=f"^model.kwargs: {key}=.* would download weights; qdistill never downloads"):
        create_zoo_model(zoo, "resnet18", **kwargs)
    check_no_download(zoo, {key: None} if key != "pretrained" else {key: False})  # None / False download nothing


def test_a_recipe_names_exactly_one_model_source():
    assert Recipe(model={"timm": "resnet18", "kwargs": {"drop_rate": 0.1}}).model.zoo == "timm"
    assert Recipe(student={"torchvision": "resnet18"}).student.zoo == "torchvision"
    for both in ({"name": "mlp", "torchvision": "resnet18"}, {"timm": "a", "torchvision": "b"}, {"checkpoint": "w"}):
        with pytest.raises(RecipeError, match="give exactly one of 'name' .* 'torchvision' or 'timm'"):
            Recipe(model=both)


@pytest.mark.skipif(HAS_TORCHVISION and HAS_TIMM, reason="the vision extra is installed")
@pytest.mark.parametrize("zoo", ["torchvision", "timm"])
def test_a_zoo_without_its_extra_is_one_line_and_exit_2(zoo, tmp_path, capsys):
    if importlib.util.find_spec(zoo) is not None:
        pytest.skip(f"{zoo} is installed")
    with pytest.raises(ModelError, match=f"^student.{zoo}: {zoo} is not installed; install the vision extra: "
                                         "pip install 'qdistill.vision.'$"):
        build_model(ModelSpec(**{zoo: "resnet18"}), DATA, "student")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {zoo: "resnet18"}, "data": {"name": "digits"}}))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{zoo} is not installed; install the vision extra" in error
    assert not (tmp_path / "out").exists()


def test_checkpoints_load_from_safetensors_or_torch_state_dicts(tmp_path):
    torch.manual_seed(1)
    reference = build_model(ModelSpec(name="mlp"), {"in_channels": 1, "num_classes": 3, "image_size": 4}).eval()
    torch.save(reference.state_dict(), tmp_path / "mlp.pth")
    save_weights(tmp_path / "mlp.safetensors", reference.state_dict())
    inputs = torch.rand(5, 1, 4, 4)
    for name in ("mlp.pth", "mlp.safetensors"):
        torch.manual_seed(2)  # other initial weights, replaced by the checkpoint's
        model = build_model(ModelSpec(name="mlp", checkpoint=str(tmp_path / name)), {"in_channels": 1, "num_classes": 3,
                                                                                     "image_size": 4}).eval()
        assert torch.equal(model(inputs), reference(inputs))


def test_torch_files_must_hold_a_state_dict_and_nothing_that_runs(tmp_path):
    spec = {"in_channels": 1, "num_classes": 3, "image_size": 4}
    torch.save({"epoch": 3, "model": {"weight": torch.zeros(1)}}, tmp_path / "training.pt")
    with pytest.raises(ModelError, match="holds dict of more than tensors; expected a state dict"):
        build_model(ModelSpec(name="mlp", checkpoint=str(tmp_path / "training.pt")), spec)
    torch.save(build_model(ModelSpec(name="mlp"), spec), tmp_path / "pickled_module.pt")  # a whole pickled model
    with pytest.raises(FileFormatError, match="is corrupt or holds more than tensors"):
        build_model(ModelSpec(name="mlp", checkpoint=str(tmp_path / "pickled_module.pt")), spec)
