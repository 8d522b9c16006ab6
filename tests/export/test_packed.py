"""Packed low-bit files: bit-stream packing, bit-exact round trips at every width, bad files.

Issue 9 item 4 (the tests after ``SPECS``): the header records every quantizer's bit width, so
residual models load bit-exact from their float architecture.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qdistill import models
from qdistill.errors import FileFormatError, ModelError
from qdistill.export import load_packed, pack_bits, save_packed, unpack_bits
from qdistill.export.packed import HEADER_KEY, fp32_safetensors_bytes
from qdistill.quant import prepare
from qdistill.quant.quantizer import Quantizer


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_pack_unpack_round_trip(bits, count):
    codes = np.random.default_rng(bits * 1000 + count).integers(0, 2**bits, size=count)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and len(packed) == (count * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), codes)


def test_two_four_bit_or_four_two_bit_values_per_byte():
    assert pack_bits(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]


def _student(teacher, train, bits):
    spec = {"weight_bits": bits, "act_bits": bits, "first_last_bits": None, "init": "minmax"}  # minmax: fast to set up
    return prepare(teacher, spec, calibration_data=train)


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_is_bit_exact(digits, digits_teacher, tmp_path, bits):
    bundle, train, _ = digits
    student = _student(digits_teacher, train, bits).eval()
    path = tmp_path / "student.qpack.safetensors"
    info = save_packed(student, path)
    assert info["file_bytes"] == path.stat().st_size
    inputs = bundle.val_x[:64]
    with torch.no_grad():
        expected = student(inputs)
        from_float = load_packed(path, model=digits_teacher)(inputs)
        from_skeleton = load_packed(path, model=_student(digits_teacher, train, bits))(inputs)
    torch.testing.assert_close(from_float, expected, atol=0, rtol=0)
    torch.testing.assert_close(from_skeleton, expected, atol=0, rtol=0)


def test_header_and_sizes(digits, digits_teacher, tmp_path):
    _, train, _ = digits
    path = tmp_path / "w2.qpack.safetensors"
    info = save_packed(_student(digits_teacher, train, 2), path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[HEADER_KEY])
        packed = handle.get_tensor("classifier.2.weight.packed")
    assert header["format_version"] == 3 and header["qdistill_version"]
    assert header["layers"]["classifier.2"]["weight_bits"] == 2
    assert packed.dtype == torch.uint8 and packed.numel() == 128 * 256 * 2 // 8  # four 2-bit values per byte
    assert info["file_bytes"] * 8 < fp32_safetensors_bytes(digits_teacher)


@pytest.fixture
def packed_file(digits, digits_teacher, tmp_path):
    _, train, _ = digits
    path = tmp_path / "student.qpack.safetensors"
    save_packed(_student(digits_teacher, train, 4), path)
    return path


def test_corrupt_byte_is_detected(packed_file, digits_teacher):
    data = bytearray(packed_file.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data, which safetensors itself does not check
    packed_file.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="CRC32"):
        load_packed(packed_file, model=digits_teacher)


def test_truncated_file(packed_file, digits_teacher):
    packed_file.write_bytes(packed_file.read_bytes()[: packed_file.stat().st_size // 2])
    with pytest.raises(FileFormatError, match="truncated"):
        load_packed(packed_file, model=digits_teacher)


def test_garbage_and_missing_files(tmp_path, digits_teacher):
    garbage = tmp_path / "garbage.qpack.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    with pytest.raises(FileFormatError):
        load_packed(garbage, model=digits_teacher)
    with pytest.raises(FileFormatError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors", model=digits_teacher)


def _rewrite_header(path, change):
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    header = json.loads(metadata[HEADER_KEY])
    change(header)
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})


def test_unknown_version(packed_file, digits_teacher):
    _rewrite_header(packed_file, lambda header: header.update(format_version=99))
    with pytest.raises(FileFormatError, match="format_version 99 is not supported; allowed: 1, 2, 3$"):
        load_packed(packed_file, model=digits_teacher)


def test_not_a_packed_file(tmp_path, digits_teacher):
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, str(plain))
    with pytest.raises(FileFormatError, match="no 'qdistill_qpack' header"):
        load_packed(plain, model=digits_teacher)


def test_bit_width_mismatch_with_the_skeleton(packed_file, digits, digits_teacher):
    _, train, _ = digits
    with pytest.raises(ModelError, match="4-bit in the file but 8-bit in the model"):
        load_packed(packed_file, model=_student(digits_teacher, train, 8))


SPECS = {
    "W8A8": {"weight_bits": 8, "act_bits": 8, "first_last_bits": None},
    "W4A4": {"weight_bits": 4, "act_bits": 4, "first_last_bits": None},
    # bits differ per layer and per op: 8-bit stem and fc, 3/6-bit layer2 (its add too), a 5-bit pool input
    "W4A4 mixed": {"weight_bits": 4, "act_bits": 4, "first_last_bits": 8,
                   "overrides": {"layer2.*": {"weight_bits": 3, "act_bits": 6}, "pool": {"act_bits": 5}}},
}


def _resnet(bundle, **kwargs):
    torch.manual_seed(0)
    return models.create("tiny_resnet", **bundle.model_kwargs(), width=4, **kwargs)


def _prepared(float_model, train, spec: dict):
    return prepare(float_model, {**spec, "init": "minmax", "calibration_batches": 2}, calibration_data=train).eval()


def _bits(model) -> dict[str, int]:
    return {name: module.bits for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, Quantizer)}


def _header(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[HEADER_KEY])


def _as_version_1(header: dict) -> None:
    del header["quantizers"]
    header["format_version"] = 1


@pytest.mark.parametrize("label", list(SPECS))
def test_residual_model_loads_bit_exact_from_the_float_architecture(label, digits, tmp_path):
    bundle, train, _ = digits
    float_model = _resnet(bundle)
    student = _prepared(float_model, train, SPECS[label])
    path = tmp_path / "student.qpack.safetensors"
    save_packed(student, path)
    loaded = load_packed(path, model=float_model)
    assert _bits(loaded) == _bits(student)
    inputs = bundle.val_x[:128]
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), student(inputs), atol=0, rtol=0)


def test_the_header_records_every_quantizer_under_every_path(digits, tmp_path):
    bundle, train, _ = digits
    student = _prepared(_resnet(bundle), train, SPECS["W4A4 mixed"])
    save_packed(student, tmp_path / "student.qpack.safetensors")
    table = _header(tmp_path / "student.qpack.safetensors")["quantizers"]
    assert {name: entry["bits"] for name, entry in table.items()} == _bits(student)
    assert table["layer2.0.add.input0_quantizer"]["bits"] == 6 and table["pool.input_quantizer"]["bits"] == 5
    # the residual block's input feeds conv1 and the add through one shared quantizer
    assert table["layer1.0.add.input1_quantizer"]["instance"] == table["layer1.0.conv1.input_quantizer"]["instance"]


def test_a_version_1_file_loads_where_it_records_every_bit_width(digits, digits_teacher, tmp_path):
    bundle, train, _ = digits
    student = _prepared(digits_teacher, train, {"weight_bits": 4, "act_bits": 4, "first_last_bits": 8})
    path = tmp_path / "v1.qpack.safetensors"
    save_packed(student, path)
    _rewrite_header(path, _as_version_1)
    inputs = bundle.val_x[:64]
    with torch.no_grad():
        torch.testing.assert_close(load_packed(path, model=digits_teacher)(inputs), student(inputs), atol=0, rtol=0)


def test_a_version_1_residual_file_is_refused_from_the_float_model_and_loads_into_the_prepared(digits, tmp_path):
    bundle, train, _ = digits
    float_model = _resnet(bundle)
    student = _prepared(float_model, train, SPECS["W8A8"])
    path = tmp_path / "v1.qpack.safetensors"
    save_packed(student, path)
    _rewrite_header(path, _as_version_1)
    with pytest.raises(FileFormatError, match=r"format_version 1 records only the layers' bit widths, not those of "
                                              r"quantizer 'layer1\.0\.add\.input0_quantizer'; load it into the prepared"):
        load_packed(path, model=float_model)
    inputs = bundle.val_x[:64]
    with torch.no_grad():
        torch.testing.assert_close(load_packed(path, model=student)(inputs), student(inputs), atol=0, rtol=0)


def test_a_file_of_another_architecture_is_refused_naming_the_quantizer(digits, tmp_path):
    bundle, train, _ = digits
    path = tmp_path / "student.qpack.safetensors"
    save_packed(_prepared(_resnet(bundle), train, SPECS["W4A4"]), path)
    deeper = _resnet(bundle, blocks=(1, 2, 1))  # has every layer of the file, and layer2.1 more
    with pytest.raises(ModelError, match=r"the model has quantizer 'layer2\.1\.conv1\.weight_quantizer', which the "
                                         r"file does not record; the file was saved from another architecture"):
        load_packed(path, model=deeper)


def test_a_skeleton_with_other_op_bits_is_refused(digits, tmp_path):
    bundle, train, _ = digits
    path = tmp_path / "student.qpack.safetensors"
    save_packed(_prepared(_resnet(bundle), train, SPECS["W4A4 mixed"]), path)
    skeleton = _prepared(_resnet(bundle), train, {**SPECS["W4A4 mixed"], "overrides": {"layer2.*": {"weight_bits": 3}}})
    with pytest.raises(ModelError, match=r"quantizer 'layer2\.0\.conv1\.input_quantizer' is 6-bit in the file but 4-bit in the model"):
        load_packed(path, model=skeleton)


@pytest.mark.parametrize("edit", [lambda header: header.pop("quantizers"),
                                  lambda header: header["quantizers"]["pool.input_quantizer"].update(bits=12),
                                  lambda header: header["quantizers"]["fc.weight_quantizer"].pop("instance")])
def test_a_version_2_header_without_a_valid_quantizer_table_is_a_corrupt_file(digits, tmp_path, edit):
    bundle, train, _ = digits
    path = tmp_path / "student.qpack.safetensors"
    save_packed(_prepared(_resnet(bundle), train, SPECS["W4A4"]), path)
    _rewrite_header(path, edit)
    with pytest.raises(FileFormatError, match=r"the header's 'quantizers' table is missing or malformed"):
        load_packed(path, model=_resnet(bundle))


@pytest.mark.parametrize("edit, error, message", [
    ({"instance": 999}, ModelError, r"are one shared quantizer in the model but separate ones in the file"),
    ({"bits": 6}, FileFormatError, r"gives shared quantizer 'layer1\.0\.(add\.input1|conv1\.input)_quantizer' two bit "
                                   r"widths \(corrupt header\)"),
])
def test_an_edited_quantizer_table_that_the_float_model_cannot_rebuild_is_refused(digits, tmp_path, edit, error, message):
    bundle, train, _ = digits
    float_model = _resnet(bundle)
    path = tmp_path / "student.qpack.safetensors"
    save_packed(_prepared(float_model, train, SPECS["W4A4"]), path)
    # this path and layer1.0.conv1.input_quantizer are one shared quantizer in the student
    _rewrite_header(path, lambda header: header["quantizers"]["layer1.0.add.input1_quantizer"].update(edit))
    with pytest.raises(error, match=message):
        load_packed(path, model=float_model)


def test_layers_mixing_per_channel_and_per_tensor_weights_are_refused_from_the_float_model(digits, tmp_path):
    bundle, train, _ = digits
    float_model = _resnet(bundle)
    path = tmp_path / "student.qpack.safetensors"
    save_packed(_prepared(float_model, train, SPECS["W4A4"]), path)
    _rewrite_header(path, lambda header: header["layers"]["fc"].update(axis=None))
    with pytest.raises(ModelError, match=r"its layers mix per-channel and per-tensor weights, which prepare cannot "
                                         r"rebuild from a float model; pass the prepared student as model"):
        load_packed(path, model=float_model)


def test_fp32_baseline_of_a_student_with_shared_quantizers_is_the_float_model_size():
    """MobileNetV3's squeeze-excite shares one quantizer between a pool and a product: safetensors refuses
    shared storage, and a float model has no step sizes to count anyway."""
    from qdistill import models
    from qdistill.export import float_copy
    from qdistill.export.packed import fp32_safetensors_bytes
    from qdistill.quant import prepare

    teacher = models.create("tiny_resnet")
    student = prepare(teacher, {"weight_bits": 4, "act_bits": 4}, calibration_data=[torch.rand(4, 1, 8, 8)])
    assert student.layer1[0].conv1.input_quantizer is student.layer1[0].add.input1_quantizer  # shared
    float_student = float_copy(student)
    weights = sum(parameter.numel() * 4 for name, parameter in float_student.named_parameters() if "quantizer" not in name)
    size = fp32_safetensors_bytes(float_student)  # raised "Some tensors share memory" before
    assert weights < size < weights + 8192  # the folded float weights and a header, no step sizes
