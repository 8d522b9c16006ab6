"""Packed low-bit files: bit-stream packing, bit-exact round trips at every width, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qdistill.errors import FileFormatError, ModelError
from qdistill.export import load_packed, pack_bits, save_packed, unpack_bits
from qdistill.export.packed import HEADER_KEY, fp32_safetensors_bytes
from qdistill.quant import prepare


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
    assert header["format_version"] == 1 and header["qdistill_version"]
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
    with pytest.raises(FileFormatError, match="format_version 99 is not supported; allowed: 1"):
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
