"""BatchNorm folding: exactness, which pairs fold (and which must not), and the student trains folded weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdistill import models
from qdistill.models import TINY_MODELS
from qdistill.models.tiny import BasicBlock
from qdistill.quant import fold_batchnorms, fold_into, prepare
from qdistill.quant.fold import find_foldable_pairs
from qdistill.quant.modules import QuantConv2d

ATOL = 1e-5


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, as a trained network has."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_mean is not None:
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)
    return model.eval()


@pytest.mark.parametrize("layer, norm, shape", [
    (nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), (4, 3, 6, 6)),
    (nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False), (4, 3, 6, 6)),
    (nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), (4, 8, 6, 6)),  # depthwise
    (nn.Conv2d(8, 4, 1, groups=2), nn.BatchNorm2d(4), (4, 8, 5, 5)),  # grouped
    (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), (4, 3, 10)),
    (nn.Linear(5, 7), nn.BatchNorm1d(7), (4, 5)),
])
def test_fold_into_is_exact(layer, norm, shape):
    reference = _randomise_norms(nn.Sequential(layer, norm))
    x = torch.randn(shape)
    expected = reference(x)
    fold_into(layer, norm)
    assert torch.allclose(layer(x), expected, atol=ATOL)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_folded_model_equals_unfolded_in_eval(name):
    model = _randomise_norms(models.create(name, in_channels=1, num_classes=10, image_size=8))
    folded = _randomise_norms(models.create(name, in_channels=1, num_classes=10, image_size=8))
    folded.load_state_dict(model.state_dict())
    names = fold_batchnorms(folded)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=ATOL)
    remaining = [n for n, m in folded.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert remaining == []  # every BatchNorm of the test models follows a conv/linear layer
    assert len(names) == sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())


def test_resnet_pairs_include_shortcut_and_blocks():
    pairs, failure = find_foldable_pairs(models.create("tiny_resnet"))
    assert failure is None
    assert ("layer1.0.conv1", "layer1.0.bn1") in pairs and ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs


class _NotFoldable(nn.Module):
    """A conv whose output is also read elsewhere, a norm on the input, a conv called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.shared = nn.Conv2d(3, 3, 1)
        self.bn_shared = nn.BatchNorm2d(3)
        self.batch_stats = nn.BatchNorm2d(3, track_running_stats=False)
        self.last = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(self.input_norm(x))
        z = self.bn(y) + y  # y is read twice: folding bn into conv would change the second read
        z = self.bn_shared(self.shared(z)) + self.shared(x)  # shared is called twice
        return self.batch_stats(self.last(z))  # no running statistics: nothing to fold


def test_pairs_that_must_not_fold_are_left_alone():
    model = _randomise_norms(_NotFoldable())
    assert find_foldable_pairs(model) == ([], None)
    student = prepare(model, {"weight_bits": 8, "act_bits": 8})
    assert student.qdistill_folded == []
    # with running statistics and no layer to fold into: a depthwise 1x1 conv, quantized like any conv
    assert student.qdistill_norm_convs == ["input_norm", "bn", "bn_shared"]
    for name in ("input_norm", "bn", "bn_shared"):
        conv = student.get_submodule(name)
        assert isinstance(conv, QuantConv2d) and conv.groups == conv.in_channels == 3 and conv.kernel_size == (1, 1)
    assert student.qdistill_unquantized == {
        "batch_stats": "BatchNorm without running statistics normalises with each batch's own; it stays float"}
    for name in ("input_norm", "bn", "bn_shared"):  # y = gamma (x - mean) / sqrt(var + eps) + beta, per channel
        norm, conv = model.get_submodule(name), student.get_submodule(name)
        factor = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        assert torch.allclose(conv.weight.flatten(), factor) and torch.allclose(conv.bias, norm.bias - norm.running_mean * factor)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = BasicBlock(4, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = self.block(self.features(x))
        if x.mean() > 10:  # data-dependent branch: torch.fx cannot trace the model
            x = x * 0
        return self.head(x.mean(dim=(2, 3)))


def test_untraceable_model_folds_module_by_module():
    model = _randomise_norms(_Untraceable())
    reference = _randomise_norms(_Untraceable())
    reference.load_state_dict(model.state_dict())
    pairs, failure = find_foldable_pairs(model)
    assert "torch.fx could not trace the model" in failure
    assert set(pairs) == {("features.0", "features.1"), ("block.conv1", "block.bn1"), ("block.conv2", "block.bn2")}
    fold_batchnorms(model)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=ATOL)


def test_student_trains_the_folded_weights():
    teacher = _randomise_norms(models.create("tiny_resnet", width=4))
    student = prepare(teacher, {"weight_bits": 8, "act_bits": 8})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in student.modules())  # train mode has no BN to update
    reference = _randomise_norms(models.create("tiny_resnet", width=4))
    reference.load_state_dict(teacher.state_dict())
    fold_batchnorms(reference)
    assert torch.equal(student.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert torch.equal(student.layer1[0].conv1.bias, reference.layer1[0].conv1.bias)
    assert "layer1.0.bn1" in student.qdistill_folded
