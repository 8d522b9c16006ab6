"""Quantizer numerics: bit-exact against torch's reference ops, STE and LSQ gradients."""

from __future__ import annotations

import math

import pytest
import torch

from qdistill.errors import RecipeError
from qdistill.quant import IntRange, Quantizer, fake_quantize
from qdistill.quant.fake_quant import LsqFakeQuantize, lsq_grad_factor


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_tensor_matches_torch_reference_exactly(bits):
    qrange = IntRange(bits, signed=False)
    x = torch.randn(4096) * 3
    scale, zero_point = torch.tensor(6.0 / qrange.qmax), torch.tensor(qrange.qmax // 2, dtype=torch.int32)
    expected = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero_point), qrange.qmin, qrange.qmax)
    torch.testing.assert_close(fake_quantize(x, scale, zero_point, qrange), expected, atol=0, rtol=0)


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_channel_matches_torch_reference_exactly(bits):
    qrange = IntRange(bits, signed=True)
    w = torch.randn(16, 8, 3, 3)
    scale = w.abs().amax(dim=(1, 2, 3)) / qrange.qmax * 0.8  # clipped, so both ends saturate
    zero_point = torch.zeros(16, dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, qrange.qmin, qrange.qmax)
    torch.testing.assert_close(fake_quantize(w, scale, zero_point, qrange, axis=0), expected, atol=0, rtol=0)


def test_eight_bit_unsigned_matches_uint8_reference():
    x = torch.rand(1000) * 4 - 1
    scale, zero = torch.tensor(5.0 / 255), torch.tensor(51, dtype=torch.int32)
    expected = torch.fake_quantize_per_tensor_affine(x, scale.item(), 51, 0, 255)
    torch.testing.assert_close(fake_quantize(x, scale, zero, IntRange(8, False)), expected, atol=0, rtol=0)


def test_ranges():
    assert (IntRange(4, True).qmin, IntRange(4, True).qmax) == (-7, 7)
    assert (IntRange(2, True).qmin, IntRange(2, True).qmax) == (-1, 1)
    assert (IntRange(3, False).qmin, IntRange(3, False).qmax) == (0, 7)
    for bad in (1, 9, 0):
        with pytest.raises(RecipeError, match="from 2 to 8"):
            IntRange(bad, True)


def test_straight_through_gradient_inside_and_zero_outside():
    qrange = IntRange(4, signed=False)
    scale, zero = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    x = torch.tensor([-0.5, 0.0, 0.33, 1.0, 1.5, 2.0], requires_grad=True)  # range is [0, 1.5]
    fake_quantize(x, scale, zero, qrange).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_lsq_step_gradient_matches_formula():
    qrange = IntRange(3, signed=False)  # [0, 7]
    scale = torch.tensor(0.2, requires_grad=True)
    zero = torch.tensor(2, dtype=torch.int32)
    x = torch.tensor([-1.0, -0.13, 0.05, 0.31, 0.77, 2.0])
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    grad_factor = lsq_grad_factor(x.numel(), qrange)
    LsqFakeQuantize.apply(x, scale, zero, qrange, None, grad_factor).backward(upstream)
    expected = 0.0
    for value, g in zip(x.tolist(), upstream.tolist(), strict=True):
        scaled = value * (1.0 / 0.2)
        q = round(scaled) + 2
        if q < 0:
            slope = 0 - 2
        elif q > 7:
            slope = 7 - 2
        else:
            slope = round(scaled) - scaled
        expected += g * slope
    expected *= 1.0 / math.sqrt(x.numel() * 7)
    assert scale.grad.item() == pytest.approx(expected, rel=1e-5)


def test_per_channel_step_gradient_is_per_channel():
    qrange = IntRange(4, signed=True)
    w = torch.randn(3, 10)
    scale = (w.abs().amax(dim=1) / 7).requires_grad_(True)
    out = LsqFakeQuantize.apply(w, scale, torch.zeros(3, dtype=torch.int32), qrange, 0, 1.0)
    out[1].sum().backward()  # only channel 1 receives gradient
    assert scale.grad[0] == 0 and scale.grad[2] == 0 and scale.grad[1] != 0


def test_quantizer_calibration_minmax_covers_range():
    quantizer = Quantizer(bits=8, signed=False, init="minmax")
    quantizer.observe()
    quantizer(torch.linspace(-1.0, 3.0, 1000))
    quantizer.finish_calibration()
    assert quantizer.scale.item() == pytest.approx(4.0 / 255, rel=1e-6)
    assert int(quantizer.zero_point) == round(1.0 / (4.0 / 255))
    out = quantizer(torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(out, torch.tensor([-1.0, 3.0]), atol=4.0 / 255, rtol=0)


def test_mse_init_clips_outliers_better_than_minmax():
    torch.manual_seed(0)
    weight = torch.randn(8, 256)
    weight[:, 0] = 12.0  # one outlier per channel
    errors = {}
    for method in ("minmax", "mse"):
        quantizer = Quantizer(bits=4, signed=True, channels=8, init=method)
        quantizer.init_from_weight(weight)
        errors[method] = (quantizer(weight) - weight).pow(2).sum().item()
    assert errors["mse"] < errors["minmax"]


def test_percentile_init_ignores_tail():
    quantizer = Quantizer(bits=8, signed=False, init="percentile", percentile=99.0)
    quantizer.observe()
    values = torch.cat([torch.rand(10000), torch.tensor([1000.0])])
    quantizer(values)
    quantizer.finish_calibration()
    assert quantizer.scale.item() < 2.0 / 255
