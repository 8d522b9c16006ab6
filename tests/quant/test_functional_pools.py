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
