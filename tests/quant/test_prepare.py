"""Graph-aware ``prepare``: attention, residual additions, concatenations, shared quantizers, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdistill import models
from qdistill.errors import ModelError
from qdistill.io import load_weights, save_weights
from qdistill.models.tiny import BasicBlock, TinyMLP
from qdistill.quant import check_overrides, is_quantized, layer_table, prepare
from qdistill.quant.attention import DecomposedMultiheadAttention, decompose_attention
from qdistill.quant.modules import ActivationQuantizer, QuantAdd, QuantCat, QuantConv2d, QuantLinear
from qdistill.quant.prepare import activation_quantizers
from support import UntraceableNet

W8 = {"weight_bits": 8, "act_bits": 8, "init": "minmax", "calibration_batches": 2}
IMAGES = torch.rand(16, 1, 8, 8)


def _calibrated(model: nn.Module, spec: dict = W8) -> nn.Module:
    return prepare(model.eval(), spec, calibration_data=[IMAGES[:8], IMAGES[8:]])


def _relative_error(student: nn.Module, model: nn.Module, x: torch.Tensor = IMAGES) -> float:
    with torch.no_grad():
        expected = model.eval()(x)
        return float((student.eval()(x) - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_decomposed_attention_computes_what_mha_computes(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    decomposed = DecomposedMultiheadAttention.from_mha(mha).eval()
    query, key = torch.randn(3, 5, 16), torch.randn(3, 7, kdim or 16)
    if not batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    for options in ({}, {"key_padding_mask": padding}, {"attn_mask": torch.randn(5, 7)}, {"need_weights": False},
                    {"attn_mask": torch.rand(5, 7) > 0.8, "average_attn_weights": False}):
        expected, expected_weights = mha(query, key, key, **options)
        output, weights = decomposed(query, key, key, **options)
        assert torch.allclose(output, expected, atol=1e-6), options
        assert (weights is None) == (expected_weights is None)
        if weights is not None:
            assert torch.allclose(weights, expected_weights, atol=1e-6)


def test_attention_projections_are_quantized_and_listed():
    model = models.create("tiny_transformer", dim=16, heads=2)
    student = _calibrated(model)
    table = layer_table(student)
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):  # nn.MultiheadAttention, decomposed
        assert table[f"encoder.0.attention.{projection}"] == {"weight_bits": 8, "act_bits": 8}
    for projection in ("query", "key", "value", "output"):  # hand-written attention
        assert isinstance(student.encoder[1].attention.get_submodule(projection), QuantLinear)
    assert table["position"] == {"weight_bits": 8, "act_bits": None}  # nn.Embedding: weights only
    assert not any("attention" in name for name in student.qdistill_unquantized)
    assert "only its input is quantized" in student.qdistill_unquantized["encoder.0.norm1"]  # LayerNorm stays float
    assert _relative_error(student, model) < 0.1


def test_unsupported_attention_stays_float_with_reason():
    model = nn.Sequential(nn.Linear(8, 8))
    model.attention = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    kept = decompose_attention(copy.deepcopy(model))
    assert "add_bias_kv" in kept["attention"]


def test_torch_encoder_layer_keeps_its_function_and_is_reported():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    model = nn.Sequential(nn.Linear(8, 16), layer).eval()
    decomposed = copy.deepcopy(model)
    decompose_attention(decomposed)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():  # no_grad would take the fused fast path if the layer still could
        assert torch.allclose(decomposed(x), model(x), atol=1e-5)
    student = prepare(model, W8)
    assert "residual additions stay float" in student.qdistill_unquantized["1"]
    assert isinstance(student[1].self_attn.q_proj, QuantLinear)


def test_residual_additions_become_quantized_ops():
    student = _calibrated(models.create("tiny_resnet", width=4))
    block = student.layer2[0]
    assert isinstance(block, BasicBlock) and isinstance(block.add, QuantAdd)  # the class is kept
    table = layer_table(student)
    assert table["layer1.0.add"] == {"weight_bits": None, "act_bits": 8}
    assert table["pool"] == {"weight_bits": None, "act_bits": 8}  # AdaptiveAvgPool2d gets a quantized input
    assert {"layer2.0.add", "layer3.0.add", "layer2.0.downsample.0"} <= set(table)


def test_depthwise_convolutions_are_quantized_per_channel():
    student = _calibrated(models.create("tiny_mobilenetv2", width=8))
    depthwise = {name: module for name, module in student.named_modules()
                 if isinstance(module, QuantConv2d) and module.groups > 1}
    assert len(depthwise) == 5
    for name, conv in depthwise.items():
        assert conv.groups == conv.in_channels == conv.out_channels
        assert conv.weight_quantizer.scale.shape == (conv.out_channels,)
        assert name in layer_table(student)
    assert {"layer1.0.add", "layer2.1.add", "layer3.1.add"} <= set(layer_table(student))


def test_consumers_of_one_tensor_share_one_quantizer():
    resnet = prepare(models.create("tiny_resnet", width=4), W8)
    block, shortcut_block = resnet.layer1[0], resnet.layer2[0]
    assert block.conv1.input_quantizer is block.add.input1_quantizer  # the identity feeds conv1 and the add
    assert block.add.input0_quantizer is not block.conv1.input_quantizer
    assert shortcut_block.conv1.input_quantizer is shortcut_block.downsample[0].input_quantizer
    transformer = prepare(models.create("tiny_transformer", dim=16, heads=2), W8)
    manual, mha = transformer.encoder[1].attention, transformer.encoder[0].attention
    assert manual.query.input_quantizer is manual.key.input_quantizer is manual.value.input_quantizer
    assert mha.q_proj.input_quantizer is mha.k_proj.input_quantizer is mha.v_proj.input_quantizer
    assert transformer.encoder[1].norm1.input_quantizer is transformer.encoder[1].add.input0_quantizer


def test_shared_quantizer_quantizes_a_tensor_once_per_pass():
    quantizer = ActivationQuantizer(8)
    quantizer.observe()
    quantizer(torch.rand(64))
    quantizer.finish_calibration()
    x = torch.rand(64)
    first = quantizer(x)
    assert quantizer(x) is first
    with torch.no_grad():
        assert quantizer(x) is not first  # another autograd mode: computed again
    x.mul_(0.5)  # changed in place: computed again
    assert torch.equal(quantizer(x), ActivationQuantizer.forward(quantizer, x.clone()))
    copy.deepcopy(quantizer)  # the remembered tensors are not copied
    student = prepare(models.create("tiny_resnet", width=4), W8)
    student(IMAGES).sum().backward()
    assert all(m._memo is None for m in student.modules() if isinstance(m, ActivationQuantizer))
    copy.deepcopy(student)


class _Branches(nn.Module):
    """Concatenation of two branches, scalar additions and an alpha= addition (not residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        y = y + y.size(1) + 1.0
        y = y.add(y, alpha=0.5)
        return self.head(F.relu(y).mean(dim=(2, 3)))


def test_concatenation_is_quantized_and_scalar_additions_are_not():
    model = _Branches()
    student = _calibrated(model)
    assert isinstance(student.cat, QuantCat) and student.cat.dim == 1
    assert layer_table(student)["cat"] == {"weight_bits": None, "act_bits": 8}
    assert not any(isinstance(m, QuantAdd) for m in student.modules())
    assert _relative_error(student, model) < 0.05


class _TrainingBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return x + F.dropout(self.linear(x), 0.5, training=self.training)


class _OptionalScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x, scale=None):
        y = self.linear(x)
        return x + (y if scale is None else y * scale)


def test_modules_that_cannot_be_rewritten_are_reported_and_still_run():
    model = nn.Sequential(nn.Linear(64, 8), _TrainingBranch(), _OptionalScale(), nn.Linear(8, 10))
    student = prepare(nn.Sequential(nn.Flatten(), model), W8)
    assert "self.training" in student.qdistill_unquantized["1.1"]
    assert isinstance(student[1][2].add, QuantAdd)  # called as block(x): specialised to scale=None
    student.train()(IMAGES)  # dropout still active in training mode
    with torch.no_grad():
        assert student.eval()(IMAGES).shape == (16, 10)




def test_untraceable_model_falls_back_module_by_module():
    model = UntraceableNet()
    student = _calibrated(model)
    reasons = student.qdistill_unquantized
    assert "torch.fx could not trace the model" in reasons["<graph>"] and "TraceError" in reasons["<graph>"]
    assert "stay float" in reasons["<model>"]
    assert isinstance(student.block.add, QuantAdd)  # the block traces on its own
    assert student.block.conv1.input_quantizer is student.block.add.input1_quantizer
    assert student.qdistill_folded == ["stem.1", "block.bn1", "block.bn2"]
    assert _relative_error(student, model) < 0.05


def test_overrides_reach_quantized_ops_and_unknown_patterns_list_them():
    spec = {"weight_bits": 4, "act_bits": 4, "overrides": {"layer1.0.add": {"act_bits": 8}}}
    table = layer_table(prepare(models.create("tiny_resnet", width=4), spec))
    assert table["layer1.0.add"]["act_bits"] == 8 and table["layer2.0.add"]["act_bits"] == 4
    with pytest.raises(ModelError, match=r"quant.overrides: pattern 'nothing\*' matches no quantizable layer.*layer1.0.add"):
        prepare(models.create("tiny_resnet", width=4), {"overrides": {"nothing*": {"act_bits": 8}}})


def test_override_check_accepts_and_refuses_exactly_what_prepare_does():
    model = models.create("tiny_resnet", width=4)
    on_an_add = {"weight_bits": 4, "act_bits": 4, "overrides": {"layer1.0.add": {"act_bits": 8}, "layer1.*": {"weight_bits": 6}}}
    table = check_overrides(model, on_an_add)
    assert table == layer_table(prepare(model, on_an_add))
    assert table["layer1.0.add"] == {"weight_bits": None, "act_bits": 8} and table["layer1.0.conv1"]["weight_bits"] == 6
    messages = []
    for check in (check_overrides, prepare):
        with pytest.raises(ModelError) as refused:
            check(model, {"overrides": {"layer1.0.add": {"act_bits": 8}, "nothing*": {"act_bits": 8}}})
        messages.append(str(refused.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert messages[0].startswith("quant.overrides: pattern 'nothing*' matches no quantizable layer; layers: stem.0, ")


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_weight_quantizers_count_their_weight_and_activation_quantizers_one_sample(granularity):
    """LSQ's N: the whole weight per tensor, one output channel per channel, one sample for activations."""
    student = prepare(models.create("tiny_resnet", width=4), {**W8, "granularity": granularity})
    layers = [module for module in student.modules() if is_quantized(module)]
    for layer in layers:
        weight = layer.weight
        expected = weight.numel() if granularity == "per_tensor" else weight.numel() // weight.shape[0]
        assert layer.weight_quantizer.elements_per_step(weight) == expected
    for quantizer in activation_quantizers(student):
        assert quantizer.elements_per_step(IMAGES) == 1 * 8 * 8


@pytest.mark.parametrize("activation", ["relu6", "gelu", "silu", "hardswish"])
def test_students_with_float_activations_stay_close_to_the_model(activation):
    model = TinyMLP(64, 10, hidden=(32,), activation=activation)
    assert _relative_error(_calibrated(model), model) < 0.05


def test_pools_get_quantized_inputs_and_max_pool_stays_as_is():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
    student = _calibrated(model)
    table = layer_table(student)
    assert table["4"] == {"weight_bits": None, "act_bits": 8} and "2" not in table
    assert _relative_error(student, model) < 0.05


def test_prepared_structure_is_deterministic_so_weights_reload(tmp_path):
    model = models.create("tiny_transformer", dim=16, heads=2)
    student = _calibrated(model)
    save_weights(tmp_path / "student.safetensors", student.state_dict())  # shared quantizers: keys repeat
    again = prepare(model, W8)
    again.load_state_dict(load_weights(tmp_path / "student.safetensors"))
    with torch.no_grad():
        assert torch.equal(again.eval()(IMAGES), student.eval()(IMAGES))


class _DenseLayer(nn.Module):
    """Called with a list of tensors, as torchvision's DenseNet layers are: fx cannot specialise a module graph on it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2, 3, padding=1)

    def forward(self, features):
        return F.relu(self.conv(torch.cat(features, 1)))


class _DenseBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.layers = nn.ModuleList([_DenseLayer(2), _DenseLayer(4)])
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        features = [F.relu(self.stem(x))]
        for layer in self.layers:
            features.append(layer(features))
        return self.head(torch.cat(features, 1).mean(dim=(2, 3)))


def test_a_module_called_with_a_list_of_tensors_is_rewritten_as_part_of_its_caller():
    model = _DenseBlock()
    student = _calibrated(model)
    assert student.qdistill_unquantized == {}
    cats = [name for name, module in student.named_modules() if isinstance(module, QuantCat)]
    assert len(cats) == 2, cats  # the second layer's concatenation and the block's (the first layer's has one input)
    assert _relative_error(student, model) < 0.05
    # the quantized forward is the block's: its layers' own forward (which would skip the quantized cat) is not called
    called = []
    hooks = [layer.register_forward_hook(lambda *_: called.append(1)) for layer in student.layers]
    with torch.no_grad():
        student(IMAGES[:2])
    assert not called
    for hook in hooks:
        hook.remove()
