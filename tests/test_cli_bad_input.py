"""Bad inputs through the real command: one-line error, exit 2, and no output folder left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from qdistill.cli import main

BASE = {
    "model": {"name": "mnist_cnn"},
    "data": {"name": "digits", "batch_size": 64},
    "quant": {"weight_bits": 4, "act_bits": 4},
    "train": {"epochs": 1},
    "teacher_train": {"epochs": 1},
    "export": {"onnx": False, "packed": False},
}


def _npz(folder: Path, name: str, **arrays) -> str:
    path = folder / name
    np.savez(path, **arrays)
    return str(path)


def _write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def _cases(folder: Path) -> dict[str, tuple[dict, str]]:
    rng = np.random.default_rng(0)
    x = rng.random((80, 1, 8, 8)).astype(np.float32)
    y = np.arange(80) % 10
    nan_x = x.copy()
    nan_x[3, 0, 0, 0] = np.nan
    inf_x = x.copy()
    inf_x[5, 0, 1, 1] = np.inf
    teacher = folder / "teacher.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(teacher))
    data = lambda **arrays: {"data": {"npz": _npz(folder, f"d{len(list(folder.iterdir()))}.npz", **arrays)}}  # noqa: E731
    return {
        "wrong type": ({"train": {"epochs": "2"}}, "recipe field train.epochs: '2' is not allowed"),
        "bool for int": ({"quant": {"weight_bits": True}}, "recipe field quant.weight_bits: True is not allowed"),
        "out of range": ({"train": {"lr": -1.0}}, "recipe field train.lr: -1.0 is not allowed"),
        "unknown key": ({"train": {"epoch": 2}}, "unknown key 'train.epoch'"),
        "unknown section": ({"trainer": {}}, "unknown key 'trainer'"),
        "first_last_bits 1": ({"quant": {"act_bits": 2, "first_last_bits": 1}}, "quant.first_last_bits: 1"),
        "warmup >= epochs": ({"train": {"epochs": 2, "warmup_epochs": 2}}, "warmup_epochs (2) must be smaller than epochs (2)"),
        "two data sources": ({"data": {"name": "digits", "npz": "x.npz"}}, "give exactly one of 'name'"),
        "no override match": ({"quant": {"overrides": {"head.*": {"weight_bits": 8}}}}, "pattern 'head.*' matches no quantizable layer"),
        "smoothing out of range": ({"quant": {"smoothing": 1.5}}, "recipe field quant.smoothing: 1.5 is not allowed"),
        "smoothing a shared input": ({"quant": {"smoothing": 0.5, "smoothing_layers": ["classifier.2"]}},
                                     "quant.smoothing_layers: layer 'classifier.2' cannot be smoothed"),
        "unknown model": ({"model": {"name": "resnet999"}}, "'resnet999' is not a built-in model"),
        "bad factory": ({"model": {"factory": "nowhere.module:make"}}, "cannot import module 'nowhere.module'"),
        "wrong shape": ({**data(x=rng.random((80, 3, 8, 8)), y=y), "model": {"name": "mnist_cnn", "kwargs": {"in_channels": 1}}},
                        "do not fit the model"),
        "wrong dtype": (data(x=x.astype(bool), y=y), "inputs have dtype bool"),
        "complex dtype": (data(x=x.astype(np.complex64), y=y), "inputs have dtype complex64"),
        "float labels": (data(x=x, y=y.astype(np.float32)), "labels have dtype float32"),
        "nan": (data(x=nan_x, y=y), "1 NaN or Inf values"),
        "inf": (data(x=inf_x, y=y), "1 NaN or Inf values"),
        "empty": (data(x=x[:0], y=y[:0]), "the inputs are empty"),
        "negative label": (data(x=x, y=y - 1), "label -1 is negative"),
        "labels beyond classes": ({**data(x=x, y=y), "model": {"name": "mnist_cnn", "kwargs": {"num_classes": 5}}},
                                  "labels cover 10 classes but the teacher predicts 5"),
        "fewer classes than teacher": ({**data(x=x, y=y % 7), "model": {"name": "mnist_cnn", "kwargs": {"num_classes": 10}}},
                                       "labels cover 7 classes but the teacher predicts 10"),
        "label count": (data(x=x, y=y[:50]), "80 inputs but 50 labels"),
        "missing npz": ({"data": {"npz": str(folder / "nope.npz")}}, "does not exist"),
        "corrupt npz": ({"data": {"npz": _write(folder, "bad.npz", b"not a zip")}}, "is not a readable .npz file"),
        "missing weights": ({"model": {"name": "mnist_cnn", "checkpoint": str(folder / "none.safetensors")}}, "does not exist"),
        "truncated weights": ({"model": {"name": "mnist_cnn", "checkpoint": _write(folder, "t.safetensors", teacher.read_bytes()[:20])}},
                              "is truncated or not a safetensors file"),
        "corrupt weights": ({"model": {"name": "mnist_cnn", "checkpoint": _write(folder, "c.safetensors", b"\x00" * 64)}},
                            "is truncated or not a safetensors file"),
        "weights of another model": ({"model": {"name": "mnist_cnn", "checkpoint": str(teacher)}}, "weights do not fit the model"),
        "pickle as weights": ({"model": {"name": "mnist_cnn", "checkpoint": _write(folder, "p.safetensors", b"\x80\x04K\x01.")}},
                              "is truncated or not a safetensors file"),
        "tuple output": ({"model": {"factory": "support:tuple_output_model"}},
                         "model returns a tuple; qdistill needs one float tensor of class logits"),
        "dict output": ({"model": {"factory": "support:dict_output_model"}},
                        "model returns a dict; qdistill needs one float tensor of class logits"),
        "too few samples for the splits": (data(x=x[:2], y=y[:2]), "2 samples are too few for a train, validation and test split"),
    }


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _cases(tmp_path_factory.mktemp("inputs"))



@pytest.mark.parametrize("name", [
    "wrong type", "bool for int", "out of range", "unknown key", "unknown section", "first_last_bits 1",
    "warmup >= epochs", "two data sources", "no override match", "smoothing out of range",
    "smoothing a shared input", "unknown model", "bad factory", "wrong shape",
    "wrong dtype", "complex dtype", "float labels", "nan", "inf", "empty", "negative label", "labels beyond classes",
    "fewer classes than teacher", "label count", "missing npz", "corrupt npz", "missing weights", "truncated weights",
    "corrupt weights", "weights of another model", "pickle as weights", "tuple output", "dict output",
    "too few samples for the splits",
])
def test_bad_input(name, cases, tmp_path, capsys):
    change, message = cases[name]
    recipe = {**BASE, **change}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code == 2, error
    assert error.startswith("error: ") and "\n" not in error, error
    assert message in error, error
    assert not out.exists()  # nothing was written before the error, so no folder is left behind


def test_empty_recipe_file_is_refused(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    code = main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert f"recipe file {str(path)!r} is empty; a recipe is a YAML mapping of sections (model," in error
    assert not (tmp_path / "out").exists()


def test_probability_outputs_get_a_one_line_warning(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": {"factory": "support:softmax_output_model"}, "data": {**BASE["data"], "limit": 200}}))
    code = main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: ")]
    assert warnings and "outputs look like probabilities" in warnings[0]


def test_existing_output_folder_is_kept_after_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": {"name": "resnet999"}}))
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_unwritable_output_directory(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code = main(["run", str(path), "--out", str(blocker / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "cannot be written" in error and "\n" not in error


def test_resume_without_checkpoint_is_refused_when_asked_to_eval(tmp_path, capsys):
    code = main(["eval", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "recipe.yaml" in error and "does not exist" in error
