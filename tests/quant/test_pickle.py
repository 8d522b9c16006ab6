"""A prepared student can be saved whole: ``torch.save``/``torch.load`` and ``copy.deepcopy`` keep it exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qdistill import models
from qdistill.quant import prepare
from qdistill.quant.modules import QuantAdd

IMAGES = torch.rand(8, 1, 8, 8)
SMALL = {"tiny_resnet": {"width": 4}, "tiny_mobilenetv2": {"width": 8}, "tiny_transformer": {"dim": 16, "heads": 2}}
W4 = {"weight_bits": 4, "act_bits": 4, "init": "minmax", "calibration_batches": 1}  # quantized adds change outputs


def _student(name: str) -> nn.Module:
    model = models.create(name, in_channels=1, num_classes=10, image_size=8, **SMALL[name])
    return prepare(model, W4, calibration_data=[IMAGES])


def _save_and_load(student: nn.Module, path) -> nn.Module:
    torch.save(student, path)
    return torch.load(path, weights_only=False)


def _assert_same_student(copied: nn.Module, student: nn.Module) -> None:
    with torch.no_grad():
        assert torch.equal(copied.eval()(IMAGES), student.eval()(IMAGES))  # atol=0
    rewritten = {name: type(module) for name, module in student.named_modules()
                 if hasattr(type(module), "qdistill_forward_code")}
    assert rewritten  # every test model has a forward with quantized additions
    for name, cls in rewritten.items():
        copied_class = type(copied.get_submodule(name))
        assert copied_class.qdistill_forward_code == cls.qdistill_forward_code
        assert copied_class.__mro__[1] is cls.__mro__[1] and copied_class.forward is not cls.__mro__[1].forward
    adds = [name for name, module in copied.named_modules() if isinstance(module, QuantAdd)]
    assert adds == [name for name, module in student.named_modules() if isinstance(module, QuantAdd)]
    assert copied.state_dict().keys() == student.state_dict().keys()


@pytest.mark.parametrize("name", list(SMALL))
def test_deepcopy_of_a_prepared_student_computes_identical_outputs(name):
    student = _student(name)
    _assert_same_student(copy.deepcopy(student), student)


@pytest.mark.parametrize("name", list(SMALL))
def test_torch_save_and_load_of_a_prepared_student_computes_identical_outputs(name, tmp_path):
    student = _student(name)
    _assert_same_student(_save_and_load(student, tmp_path / "student.pt"), student)


def test_a_loaded_student_keeps_shared_quantizers_and_trains(tmp_path):
    loaded = _save_and_load(_student("tiny_resnet"), tmp_path / "student.pt")
    block = loaded.layer1[0]
    assert block.conv1.input_quantizer is block.add.input1_quantizer  # one quantizer per tensor, still shared
    loaded.train()(IMAGES).sum().backward()
    assert block.add.input0_quantizer.scale.grad is not None
