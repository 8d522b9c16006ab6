"""Bad image folders and image keys fail with one line naming the file, folder or key and what is allowed."""

from __future__ import annotations

import shutil

import pytest

from data.digit_images import write_digit_folder
from qdistill.data import load_data, make_loaders
from qdistill.errors import DataError, RecipeError
from qdistill.recipe import DataSpec, Recipe


@pytest.fixture
def folder(tmp_path):
    return write_digit_folder(tmp_path / "digits", count_per_class=4)


def _load(root, **settings):
    return load_data(DataSpec(image_folder=str(root), image_size=8, **settings))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _decode_everything(bundle) -> None:
    for loader in make_loaders(bundle, 8, seed=0):
        for _ in loader:
            pass


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_bad_image_is_named_in_one_line_even_from_a_worker(folder, damage):
    bad = folder / "3" / "0013.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    bundle = _load(folder, workers=2, test_fraction=0.25)
    with pytest.raises(DataError) as error:
        _decode_everything(bundle)
    assert _one_line(error).startswith(f"data.image_folder: cannot decode {str(bad)!r} (")


def test_an_empty_class_folder_is_named(folder):
    (folder / "empty").mkdir()
    (folder / "empty" / "notes.txt").write_text("not an image")
    (folder / "empty" / "._0001.png").write_bytes(b"macOS metadata, not an image")
    with pytest.raises(DataError) as error:
        _load(folder)
    assert _one_line(error).startswith(f"data.image_folder: class folder {str(folder / 'empty')!r} has no images; allowed: .jpg")


def test_a_folder_without_class_folders(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataError) as error:
        _load(tmp_path)
    assert "has no class folders; expected one folder of images per class" in _one_line(error)
    with pytest.raises(DataError, match="is not a folder"):
        _load(tmp_path / "missing")


def test_split_folders_beside_class_folders_or_with_unknown_classes(folder, tmp_path):
    shutil.copytree(folder / "0", folder / "train" / "0")
    with pytest.raises(DataError) as error:
        _load(folder)
    assert "give either class folders only or train/ (and val/, test/) folders" in _one_line(error)
    split = tmp_path / "split"
    shutil.copytree(folder / "0", split / "train" / "0")
    shutil.copytree(folder / "1", split / "val" / "1")
    with pytest.raises(DataError, match="val/ has class folders 1 that train/ lacks"):
        _load(split)


def test_too_few_images_to_set_a_split_aside(folder, tmp_path):
    split = tmp_path / "split"
    shutil.copytree(folder / "0", split / "train" / "0")  # 4 images
    shutil.copytree(folder / "0", split / "test" / "0")
    with pytest.raises(DataError, match="its 4 training samples are too few to set a val split aside"):
        _load(split, val_fraction=0.9)


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "digits", "image_size": 32}, "image_size applies to image_folder data only"),
    # image tensors (npz, mnist5k) augment too (data.augment shift|standard); text does not
    ({"text": "x.txt", "tokenizer": "tok", "augment": "standard"}, "augment applies to image data"),
    ({"image_folder": "photos", "augment": "shift"}, "augment 'shift' applies to image tensors"),
    ({"name": "digits", "normalize": "imagenet"}, "normalize 'imagenet' applies to image_folder data only"),
    ({"image_folder": "photos", "limit": 10}, "limit applies to mnist5k, digits and npz data"),
    ({"image_folder": "photos", "name": "digits"}, "give exactly one of 'name'"),
    ({"image_folder": "photos", "augment": "heavy"}, "data.augment: 'heavy' is not allowed"),
])
def test_image_keys_are_checked_in_the_recipe(data, message):
    with pytest.raises(RecipeError, match=message) as error:
        Recipe(data=data)
    _one_line(error)
