"""Functional average pools in a custom forward become quantized pooling layers (DenseNet's head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.export.onnx import export_onnx
from qdistill.quant import prepare
from qdistill.quant.modules import QuantAdaptiveAvgPool2d, QuantAvgPool2d


class PooledHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        out = F.relu(self.conv(x))
        out = F.avg_pool2d(out, 2)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def test_functional_pools_are_quantized_and_the_conv_before_them_fuses(tmp_path):
    torch.manual_seed(0)
    model = PooledHead().eval()
    x = torch.rand(16, 3, 8, 8)
    student = prepare(model, {"weight_bits": 8, "act_bits": 8, "first_last_bits": None}, calibration_data=[x])
    pools = {type(module) for module in student.modules()}
    assert {QuantAvgPool2d, QuantAdaptiveAvgPool2d} <= pools
    pooled = [module for module in student.modules() if isinstance(module, QuantAdaptiveAvgPool2d)][0]
    assert pooled.output_size == (1, 1)
    with torch.no_grad():  # the student still computes the same function, up to quantization error
        assert torch.allclose(student.eval()(x), model(x), atol=0.05)
    info = export_onnx(student, tmp_path / "model.onnx", x[:1], verify_on=[(x, torch.zeros(16, dtype=torch.long))])
    assert info["integer_ops"]["conv"] == "QLinearConv"  # was ConvInteger: the float pool read its result


class SqueezeExcite(nn.Module):
    """timm's squeeze-excite shape: ReLU after a depthwise conv, then ``x.mean((2, 3), keepdim=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.reduce = nn.Conv2d(4, 2, 1)
        self.expand = nn.Conv2d(2, 4, 1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        x = torch.relu(self.conv_dw(x))
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.head(x * gate).flatten(1)


def test_a_spatial_mean_becomes_a_global_pool_so_the_depthwise_conv_fuses(tmp_path):
    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    x = torch.rand(16, 4, 6, 6)
    student = prepare(model, {"weight_bits": 8, "act_bits": 8, "first_last_bits": None}, calibration_data=[x])
    assert any(isinstance(module, QuantAdaptiveAvgPool2d) for module in student.modules())
    with torch.no_grad():
        assert torch.allclose(student.eval()(x), model(x), atol=0.05)
    info = export_onnx(student, tmp_path / "model.onnx", x[:1], verify_on=[(x, torch.zeros(16, dtype=torch.long))])
    assert info["integer_ops"]["conv_dw"] == "QLinearConv"


class PositionBias(nn.Module):
    """Swin-V2's shape: an MLP applied to a buffer (a constant table), added to the activations."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.linspace(-1, 1, 8).reshape(4, 2))
        self.bias_mlp = nn.Linear(2, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + self.bias_mlp(self.table).sum(0)


def test_a_layer_computing_on_constants_only_stays_float_with_the_reason(tmp_path):
    x = torch.rand(16, 4)
    student = prepare(PositionBias(), {"weight_bits": 8, "act_bits": 8, "first_last_bits": None}, calibration_data=[x])
    assert type(student.bias_mlp) is nn.Linear and "constants only" in student.qdistill_unquantized["bias_mlp"]
    info = export_onnx(student, tmp_path / "model.onnx", x[:1], verify_on=[(x, torch.zeros(16, dtype=torch.long))])
    assert set(info["integer_ops"]) == {"fc"}


@torch.fx.wrap
def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """The shape of torchvision.ops.stochastic_depth (kept as one call by fx): the identity in evaluation."""
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape[0], 1, 1, 1).bernoulli_(1 - p) / (1 - p)
    return x * keep


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth's shape."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        return stochastic_depth(x, self.p, self.training)


class SqueezeExciteBlock(nn.Module):
    """An MBConv-style residual block: expand, squeeze-excite gate, project, stochastic depth, add."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, 16, 1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)
        self.drop = StochasticDepth(0.2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        hidden = F.relu(self.expand(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(hidden, 1)))))
        out = self.drop(self.project(hidden * gate)) + x
        return self.head(out.mean((2, 3)))


def test_squeeze_excite_pool_and_stochastic_depth_round_as_the_runtime(tmp_path):
    """The gate's pool computes as QLinearGlobalAveragePool and the conv before stochastic depth as the
    QLinearConv it fuses into: every layer's ONNX Runtime output equals the student's, bit for bit."""
    from qdistill.export.onnx import diagnose_layers

    torch.manual_seed(0)
    model = SqueezeExciteBlock().eval()
    x = torch.randn(32, 8, 8, 8)
    student = prepare(model, {"weight_bits": 8, "act_bits": 8, "first_last_bits": None}, calibration_data=[x])
    pool = next(module for module in student.modules() if isinstance(module, QuantAdaptiveAvgPool2d))
    add = student.get_submodule(next(name for name, _ in student.named_modules() if name.startswith("add")))
    assert pool.requantizer is student.fc1.input_quantizer  # the quantizer its mean ends in
    assert student.project.requantizer is add.input0_quantizer  # through stochastic depth
    path = tmp_path / "model.onnx"
    info = export_onnx(student, path, x[:1], verify_on=[(x, torch.zeros(32, dtype=torch.long))])
    assert info["integer_ops"]["project"] == "QLinearConv"
    layers = diagnose_layers(path, student, [(x, torch.zeros(32, dtype=torch.long))])
    assert all(layer["max_abs_diff"] == 0.0 for layer in layers), layers
