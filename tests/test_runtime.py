"""``qdistill.runtime``: the packed file served as an int8 ONNX Runtime session, equal to model.onnx bit for bit.

Issue 15 item 2. The reference is a plain ``onnxruntime.InferenceSession`` on the ``model.onnx`` a
real export wrote (``qdistill export DIR``), not anything ``qdistill.runtime`` builds.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qdistill
from qdistill import models
from qdistill.cli import main
from qdistill.errors import FileFormatError
from qdistill.export import export_onnx, rebuild_info, save_packed
from qdistill.export.packed import HEADER_KEY
from qdistill.quant import prepare
from qdistill.recipe import ModelSpec, QuantSpec, Recipe
from qdistill.runs import Result
from qdistill.runs.deploy import export_directory


def _reference(path) -> ort.InferenceSession:
    """A plain session of ``path`` with the one setting docs/deploy.md asks of every int8 session."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")  # exact u8s8 sums on x86 without VNNI
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_same_outputs(session, reference, inputs: torch.Tensor) -> None:
    feed = inputs.numpy().astype(np.float32)
    ours = session.run(None, {session.get_inputs()[0].name: feed})[0]
    theirs = reference.run(None, {reference.get_inputs()[0].name: feed})[0]
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)  # bit for bit


@pytest.fixture(scope="module")
def exported_run(digits, digits_teacher, tmp_path_factory):
    """A saved W4A4 run exported by `qdistill export DIR`: model.onnx and student.qpack.safetensors."""
    bundle, train, _ = digits
    folder = tmp_path_factory.mktemp("run")
    recipe = Recipe(data={"name": "digits", "batch_size": 32}, quant={"weight_bits": 4, "act_bits": 4, "init": "minmax"})
    student = prepare(digits_teacher, recipe.quant, calibration_data=train)
    Result(student, {"student": {"accuracy": 0.9}}, recipe, bundle.model_kwargs()).save(folder)
    export_directory(folder, "all", latency_budget_s=0.01)
    return folder


def test_the_packed_file_runs_as_the_exported_int8_graph_bit_for_bit(exported_run, digits):
    bundle, _, val = digits
    session = qdistill.runtime.load(exported_run / "student.qpack.safetensors")
    reference = _reference(exported_run / "model.onnx")
    for inputs in (bundle.val_x[:1], bundle.val_x[:64], bundle.val_x):
        _assert_same_outputs(session, reference, inputs)
    assert qdistill.load_runtime is qdistill.runtime.load


def test_the_rebuilt_graph_is_the_exported_file(exported_run):
    rebuilt = qdistill.runtime.rebuild_onnx(exported_run / "student.qpack.safetensors")
    assert rebuilt.SerializeToString() == (exported_run / "model.onnx").read_bytes()


def test_the_header_records_what_the_rebuild_needs(exported_run):
    with safe_open(str(exported_run / "student.qpack.safetensors"), framework="pt") as handle:
        header = json.loads(handle.metadata()[HEADER_KEY])
    assert header["format_version"] == 3
    rebuild = header["rebuild"]
    assert rebuild["model"]["name"] == "mnist_cnn" and rebuild["model"]["checkpoint"] is None
    assert rebuild["model_kwargs"] == {"in_channels": 1, "num_classes": 10, "image_size": 8}
    assert rebuild["quant"]["weight_bits"] == 4 and rebuild["export"] == {"opset": 13, "input_shape": [1, 1, 8, 8]}


def test_serve_bench_prints_load_time_latency_and_equality(exported_run, capsys):
    code = main(["serve-bench", str(exported_run / "student.qpack.safetensors"), "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "load (rebuild the int8 graph + ONNX Runtime session): first" in out
    assert "batch1" in out and "batch64" in out
    assert f"outputs equal {exported_run / 'model.onnx'} bit for bit: yes" in out


@pytest.mark.parametrize("name, bits", [("tiny_resnet", 2), ("mnist_cnn", 2), ("tiny_resnet", 8)])
def test_residual_and_two_bit_students_serve_bit_for_bit(digits, tmp_path, name, bits):
    bundle, train, _ = digits
    kwargs = bundle.model_kwargs() if name == "mnist_cnn" else {"in_channels": 1, "num_classes": 10, "width": 4}
    quant = QuantSpec(weight_bits=bits, act_bits=bits, init="minmax")
    student = prepare(models.create(name, **kwargs), quant, calibration_data=train)
    onnx_path = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])["path"]
    packed = save_packed(student, tmp_path / "student.qpack.safetensors",
                         rebuild_info(ModelSpec(name=name), kwargs, quant, (1, 1, 8, 8), 13))["path"]
    _assert_same_outputs(qdistill.runtime.load(packed, threads=1), _reference(onnx_path), bundle.val_x)


def test_a_file_without_rebuild_header_needs_the_architecture(digits, digits_teacher, tmp_path):
    bundle, train, _ = digits
    quant = QuantSpec(weight_bits=4, act_bits=4, init="minmax")
    student = prepare(digits_teacher, quant, calibration_data=train)
    onnx_path = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])["path"]
    packed = save_packed(student, tmp_path / "student.qpack.safetensors")["path"]
    with pytest.raises(FileFormatError, match="does not record how to rebuild its model .*pass model="):
        qdistill.runtime.load(packed)
    session = qdistill.runtime.load(packed, model=models.create("mnist_cnn", **bundle.model_kwargs()),
                                    input_shape=(1, 1, 8, 8))
    _assert_same_outputs(session, _reference(onnx_path), bundle.val_x)


def test_a_version_2_file_still_serves_with_the_architecture(digits, digits_teacher, tmp_path):
    bundle, train, _ = digits
    student = prepare(digits_teacher, QuantSpec(weight_bits=4, act_bits=4, init="minmax"), calibration_data=train)
    onnx_path = export_onnx(student, tmp_path / "model.onnx", bundle.train_x[:1])["path"]
    path = tmp_path / "v2.qpack.safetensors"
    save_packed(student, path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[HEADER_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    header["format_version"] = 2
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})
    session = qdistill.runtime.load(path, model=digits_teacher, input_shape=(1, 1, 8, 8))
    _assert_same_outputs(session, _reference(onnx_path), bundle.val_x)


def test_a_malformed_rebuild_header_is_a_corrupt_file(exported_run, tmp_path):
    with safe_open(str(exported_run / "student.qpack.safetensors"), framework="pt") as handle:
        header = json.loads(handle.metadata()[HEADER_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    header["rebuild"]["export"]["input_shape"] = [1, 0, 8]
    path = tmp_path / "bad.qpack.safetensors"
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(FileFormatError, match="the header's 'rebuild' entry is malformed"):
        qdistill.runtime.load(path)
    assert main(["serve-bench", str(path)]) == 2
