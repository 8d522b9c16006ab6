"""Quantizer numerics against references written out here: the fake-quantize formula and LSQ's gradients.

Nothing is compared with torch's fake-quantize ops (which ``fake_quantize`` runs): every expected
value comes from numpy float32 arithmetic in this file.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdistill.errors import RecipeError
from qdistill.quant import IntRange, Quantizer, fake_quantize
from support import calibrated

BITS = range(2, 9)


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid written out: signed grids are narrow (``±(2^(b-1)-1)``), unsigned ones ``[0, 2^b-1]``."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _along(values, ndim: int, axis: int | None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def expected_codes(x, scale, zero, qmin: int, qmax: int, axis: int | None = None):
    """``(x / s, its rounding half to even, the rounded code + z clamped to [qmin, qmax])`` in float32.

    ``x / s``, as ONNX QuantizeLinear computes it (``fake_quantize`` follows the runtime), not torch's
    kernels' ``x * (1/s)``: the two differ in the last bit for some x, and an x within one ulp of a
    half-integer step then rounds to the neighbouring integer, so a bit-exact comparison needs this form.
    """
    x = np.asarray(x, dtype=np.float32)
    scale, zero = _along(scale, x.ndim, axis), _along(zero, x.ndim, axis)
    scaled = x / scale
    rounded = np.rint(scaled)  # numpy rounds half to even
    return scaled, rounded, np.clip(rounded + zero, qmin, qmax)


def reference_fake_quantize(x, scale, zero, qmin: int, qmax: int, axis: int | None = None) -> np.ndarray:
    """``(clamp(round_half_to_even(x / s) + z, qmin, qmax) - z) * s`` in float32."""
    x = np.asarray(x, dtype=np.float32)
    _, _, codes = expected_codes(x, scale, zero, qmin, qmax, axis)
    return ((codes - _along(zero, x.ndim, axis)) * _along(scale, x.ndim, axis)).astype(np.float32)


def reference_lsq_gradients(x, scale, zero, qmin: int, qmax: int, upstream, grad_factor: float,
                            axis: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LSQ's backward written out: ``(d loss / d x, d loss / d s, the sum of |terms| of d loss / d s)``.

    ``d/dx``: the upstream gradient where the rounded code is inside ``[qmin, qmax]``, 0 where it
    was clamped. ``d/ds``: ``grad_factor * sum(upstream * slope)`` over the elements of each step,
    with ``slope = qmin - z`` below the range, ``qmax - z`` above it, ``round(x/s) - x/s`` inside.
    """
    x, upstream = np.asarray(x, dtype=np.float32), np.asarray(upstream, dtype=np.float32)
    scaled, rounded, _ = expected_codes(x, scale, zero, qmin, qmax, axis)
    zero = _along(zero, x.ndim, axis)
    below, above = rounded + zero < qmin, rounded + zero > qmax
    slope = np.where(below, qmin - zero, np.where(above, qmax - zero, rounded - scaled))
    terms = upstream.astype(np.float64) * slope
    dims = tuple(dim for dim in range(x.ndim) if dim != axis)
    return upstream * ~(below | above), grad_factor * terms.sum(axis=dims), grad_factor * np.abs(terms).sum(axis=dims)


def grid_values(qmin: int, qmax: int, zero: int, scale: float, count: int = 2048, seed: int = 0) -> np.ndarray:
    """Values across and three steps beyond the range, every half-step tie, both ends and zero (float32)."""
    rng = np.random.default_rng(seed)
    low, high = (qmin - zero - 3) * scale, (qmax - zero + 3) * scale
    ties = (np.arange(qmin - zero - 3, qmax - zero + 3) + 0.5) * scale
    ends = np.array([(qmin - zero) * scale, (qmax - zero) * scale, 0.0, -0.0])
    return np.concatenate([rng.uniform(low, high, count), ties, ends]).astype(np.float32)


def _zero_point(signed: bool, qmax: int) -> int:
    return 0 if signed else qmax // 3


@pytest.mark.parametrize("bits", BITS)
def test_int_range_is_narrow_when_signed_and_full_when_unsigned(bits):
    for signed in (True, False):
        assert (IntRange(bits, signed).qmin, IntRange(bits, signed).qmax) == grid(bits, signed)
    assert (IntRange(4, True).qmin, IntRange(4, True).qmax, IntRange(3, False).qmax) == (-7, 7, 7)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0])
def test_int_range_refuses_bits_outside_2_to_8(bits):
    with pytest.raises(RecipeError, match="from 2 to 8"):
        IntRange(bits, True)


@pytest.mark.parametrize("scale", [0.0371, 2.0**-5])  # a power of two makes the half-step ties exact
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_per_tensor_equals_the_formula(bits, signed, scale):
    qmin, qmax = grid(bits, signed)
    zero = _zero_point(signed, qmax)
    x = grid_values(qmin, qmax, zero, scale)
    out = fake_quantize(torch.from_numpy(x), torch.tensor(scale), torch.tensor(zero, dtype=torch.int32),
                        IntRange(bits, signed))
    np.testing.assert_array_equal(out.numpy(), reference_fake_quantize(x, scale, zero, qmin, qmax))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_per_channel_equals_the_formula(bits, signed, axis):
    qmin, qmax = grid(bits, signed)
    scales = np.array([0.0371, 2.0**-5, 0.3, 1.7, 2.0**-9], dtype=np.float32)
    zeros = np.array([0 if signed else (qmax * index) // 4 for index in range(len(scales))])
    rows = [grid_values(qmin, qmax, int(z), float(s), seed=index)
            for index, (s, z) in enumerate(zip(scales, zeros, strict=True))]
    x = np.ascontiguousarray(np.moveaxis(np.stack(rows), 0, axis))  # (channels, values) or (values, channels)
    out = fake_quantize(torch.from_numpy(x), torch.from_numpy(scales), torch.from_numpy(zeros).to(torch.int32),
                        IntRange(bits, signed), axis=axis)
    np.testing.assert_array_equal(out.numpy(), reference_fake_quantize(x, scales, zeros, qmin, qmax, axis))


def test_half_step_ties_round_to_even():
    steps = torch.tensor([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    out = fake_quantize(steps * 0.25, torch.tensor(0.25), torch.tensor(0, dtype=torch.int32), IntRange(8, True))
    assert (out / 0.25).tolist() == [-4.0, -2.0, -2.0, 0.0, 0.0, 2.0, 2.0, 4.0]


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


@st.composite
def fake_quantize_case(draw):
    bits, signed, channels = draw(st.integers(2, 8)), draw(st.booleans()), draw(st.integers(1, 4))
    qmin, qmax = grid(bits, signed)
    per_channel = draw(st.booleans())
    count = channels if per_channel else 1
    scales = draw(st.lists(st.floats(2.0**-10, 8.0, width=32), min_size=count, max_size=count))
    zeros = [0] * count if signed else draw(st.lists(st.integers(qmin, qmax), min_size=count, max_size=count))
    values = draw(st.lists(finite, min_size=channels * 3, max_size=channels * 3))
    x = np.array(values, dtype=np.float32).reshape(channels, 3)
    return bits, signed, x, np.array(scales, dtype=np.float32), np.array(zeros), 0 if per_channel else None


@settings(max_examples=300, deadline=None)
@given(fake_quantize_case())
def test_fake_quantize_equals_the_formula_for_drawn_cases(case):
    bits, signed, x, scales, zeros, axis = case
    qmin, qmax = grid(bits, signed)
    scale = torch.from_numpy(scales) if axis is not None else torch.tensor(scales[0])
    zero = torch.from_numpy(zeros).to(torch.int32) if axis is not None else torch.tensor(int(zeros[0]), dtype=torch.int32)
    out = fake_quantize(torch.from_numpy(x), scale, zero, IntRange(bits, signed), axis=axis)
    expected = reference_fake_quantize(x, scales if axis is not None else scales[0],
                                       zeros if axis is not None else zeros[0], qmin, qmax, axis)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_lsq_backward_at_the_ends_and_inside_worked_by_hand():
    # unsigned 3 bits [0, 7], step 0.5, zero point 2: the representable values are -1.0 .. 2.5
    x = torch.tensor([-3.0, -1.0, 0.3, 2.5, 2.7, 2.8, 4.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    fake_quantize(x, scale, torch.tensor(2, dtype=torch.int32), IntRange(3, False), grad_factor=0.5).backward(upstream)
    # x/s = -6, -2, 0.6, 5, 5.4, 5.6, 8 -> rounded + 2 = -4, 0, 3, 7, 7, 8, 10: below, inside x4, above x2
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]
    # slopes: 0 - 2, round - x/s (0, 0.4, 0, -0.4), 7 - 2, 7 - 2
    expected = 0.5 * (1 * -2 + 2 * 0 + 3 * 0.4 + 4 * 0 + 5 * -0.4 + 6 * 5 + 7 * 5)
    assert scale.grad.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_backward_equals_the_written_out_gradients(bits, signed, axis):
    qmin, qmax = grid(bits, signed)
    scales = np.array([0.0371, 2.0**-5, 0.3], dtype=np.float32)[: 1 if axis is None else 3]
    zeros = np.array([_zero_point(signed, qmax) + index for index in range(len(scales))]) * (not signed)
    x = np.stack([grid_values(qmin, qmax, int(z), float(s), seed=index)
                  for index, (s, z) in enumerate(zip(scales, zeros, strict=True))])
    upstream = np.random.default_rng(7).standard_normal(x.shape).astype(np.float32)
    if axis is None:
        x, upstream, scales, zeros = x[0], upstream[0], scales[0], zeros[0]
    x_tensor = torch.from_numpy(x).requires_grad_(True)
    scale = torch.tensor(scales).requires_grad_(True)
    zero = torch.tensor(zeros, dtype=torch.int32)
    fake_quantize(x_tensor, scale, zero, IntRange(bits, signed), axis, grad_factor=0.37).backward(torch.from_numpy(upstream))
    grad_x, grad_scale, magnitude = reference_lsq_gradients(x, scales, zeros, qmin, qmax, upstream, 0.37, axis)
    np.testing.assert_array_equal(x_tensor.grad.numpy(), grad_x)
    # float32 summation of a few thousand terms: within 1e-5 of the sum of their magnitudes
    assert np.all(np.abs(scale.grad.numpy() - grad_scale) <= 1e-5 * magnitude)


def test_a_step_size_at_or_below_zero_is_used_as_the_minimum_with_a_straight_through_gradient():
    # a high learning rate can drive a learned step to 0 or below: the forward then uses 1e-8 and the
    # parameter gets LSQ's gradient at 1e-8 (not clamp's zero gradient, which would leave it stuck)
    minimum = np.float32(1e-8)
    x = np.array([[-2e-8, 0.0, 3e-9, 1e-7], [0.5, -0.5, 4e-8, 1e-9], [1.0, 2.0, -3.0, 0.25]], dtype=np.float32)
    upstream = np.array([[1.0, -2.0, 0.5, 3.0], [-1.0, 2.0, 1.5, -0.5], [0.25, 1.0, -1.0, 2.0]], dtype=np.float32)
    scales = np.array([-0.3, 0.0, 0.1], dtype=np.float32)
    used = np.maximum(scales, minimum)
    x_tensor = torch.from_numpy(x).requires_grad_(True)
    scale = torch.from_numpy(scales.copy()).requires_grad_(True)
    zero = torch.zeros(3, dtype=torch.int32)
    out = fake_quantize(x_tensor, scale, zero, IntRange(4, True), axis=0, grad_factor=0.5)
    np.testing.assert_array_equal(out.detach().numpy(), reference_fake_quantize(x, used, np.zeros(3), -7, 7, axis=0))
    out.backward(torch.from_numpy(upstream))
    grad_x, grad_scale, magnitude = reference_lsq_gradients(x, used, np.zeros(3), -7, 7, upstream, 0.5, 0)
    np.testing.assert_array_equal(x_tensor.grad.numpy(), grad_x)
    assert np.all(np.abs(scale.grad.numpy() - grad_scale) <= 1e-5 * magnitude)
    assert scale.grad[0] != 0 and scale.grad[1] != 0  # the clamped steps still learn


def test_per_channel_step_gradient_reaches_only_its_channel():
    w = torch.randn(3, 10)
    scale = (w.abs().amax(dim=1) / 7).requires_grad_(True)
    out = fake_quantize(w, scale, torch.zeros(3, dtype=torch.int32), IntRange(4, True), axis=0)
    out[1].sum().backward()
    assert scale.grad[0] == 0 and scale.grad[2] == 0 and scale.grad[1] != 0


def _step_gradient(quantizer: Quantizer, x: torch.Tensor, upstream: torch.Tensor) -> np.ndarray:
    quantizer.scale.grad = None
    quantizer(x).backward(upstream)
    return quantizer.scale.grad.numpy()


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_step_gradient_scale_counts_the_elements_of_its_step(per_channel):
    """LSQ's ``g = 1/sqrt(N * qmax)``: N = one channel's elements per channel, all elements per tensor."""
    qmin, qmax = grid(4, True)
    weight = torch.randn(8, 3, 3, 3)
    quantizer = Quantizer(4, signed=True, channels=8 if per_channel else None, init="minmax", role="weight")
    quantizer.init_from_weight(weight)
    with torch.no_grad():
        quantizer.scale.mul_(0.7)  # clipped: both ends and the inside contribute
    upstream = torch.randn_like(weight)
    elements = 3 * 3 * 3 if per_channel else 8 * 3 * 3 * 3
    _, expected, magnitude = reference_lsq_gradients(
        weight.numpy(), quantizer.scale.detach().numpy(), 0, qmin, qmax, upstream.numpy(),
        1.0 / math.sqrt(elements * qmax), axis=0 if per_channel else None)
    assert np.all(np.abs(_step_gradient(quantizer, weight, upstream) - expected) <= 1e-5 * magnitude)


def _activation_quantizer(scale: float, zero: int, bits: int = 4) -> Quantizer:
    return calibrated(Quantizer(bits, signed=False), scale, zero)


def test_activation_step_gradient_scale_counts_one_sample():
    """For activations N is the features of one sample (LSQ's N_F), not the whole batch."""
    qmin, qmax = grid(4, False)
    x = (torch.rand(16, 4, 5, 5) * 3 - 0.5).requires_grad_(True)  # an activation inside a network
    upstream = torch.randn_like(x)
    quantizer = _activation_quantizer(0.15, 3)
    _, expected, magnitude = reference_lsq_gradients(x.detach().numpy(), 0.15, 3, qmin, qmax, upstream.numpy(),
                                                     1.0 / math.sqrt(4 * 5 * 5 * qmax))
    assert abs(_step_gradient(quantizer, x, upstream) - expected) <= 1e-5 * magnitude


def test_activation_step_gradient_does_not_depend_on_the_batch_size():
    sample = (torch.rand(1, 4, 5, 5) * 3 - 0.5).requires_grad_(True)
    gradients = []
    for copies in (1, 8):
        quantizer = _activation_quantizer(0.15, 3)
        quantizer(sample.repeat(copies, 1, 1, 1)).sum(dim=(1, 2, 3)).mean().backward()  # a batch-mean loss
        gradients.append(quantizer.scale.grad.item())
    assert gradients[1] == pytest.approx(gradients[0], rel=1e-6)


def test_the_step_of_input_data_is_kept_unless_asked():
    """Data carries no gradient: learning its step would cost an input-gradient pass through the first layer."""
    data = torch.rand(8, 4) * 3 - 0.5
    kept = _activation_quantizer(0.15, 3)
    out = kept(data)
    assert not out.requires_grad and kept.scale.requires_grad  # nothing to backpropagate into the first layer's input
    learned = _activation_quantizer(0.15, 3)
    learned.learn_input_scale = True
    learned(data).sum().backward()
    inside_slopes = learned.scale.grad.item()
    assert inside_slopes != 0.0
    # an activation inside a network (it carries a gradient) learns its step either way
    hidden = data.clone().requires_grad_(True)
    kept(hidden).sum().backward()
    assert kept.scale.grad.item() == pytest.approx(inside_slopes, rel=1e-6)


def test_a_zero_point_of_zero_skips_nothing_that_matters():
    """The zero_is_zero fast path gives the same values and gradients bit for bit."""
    x = (torch.rand(6, 50) * 4 - 1).requires_grad_(True)
    upstream = torch.randn(6, 50)
    results = []
    for promise in (False, True):
        scale = torch.tensor(0.11, requires_grad=True)
        x.grad = None
        out = fake_quantize(x, scale, torch.tensor(0, dtype=torch.int32), IntRange(4, False), grad_factor=0.3,
                            zero_is_zero=promise)
        out.backward(upstream)
        results.append((out.detach(), x.grad.clone(), scale.grad.clone()))
    for first, second in zip(*results, strict=True):
        torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_quantizer_role_is_checked():
    with pytest.raises(RecipeError, match="role: 'bias' is not allowed; allowed: 'weight', 'activation'"):
        Quantizer(8, signed=True, role="bias")


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


def _onnx_runtime_quantize_dequantize(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    initializers = [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
                    helper.make_tensor("zero", TensorProto.UINT8, [], [zero])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("scale", [0.0371, 0.016777239739894867, 0.0031])
def test_fake_quantize_equals_onnx_runtime_next_to_every_half_step_tie(scale):
    """Independent reference: ONNX Runtime's QuantizeLinear -> DequantizeLinear on the values a few ulps
    around every half-integer step, where a multiply by 1/s (torch's kernels) and a division part ways."""
    zero = 37
    ties = ((np.arange(-zero - 2, 256 - zero + 2) + 0.5) * np.float32(scale)).astype(np.float32)
    x = [ties]
    for direction in (np.inf, -np.inf):
        neighbour = ties
        for _ in range(3):
            neighbour = np.nextafter(neighbour, np.float32(direction)).astype(np.float32)
            x.append(neighbour)
    x = np.concatenate(x)
    out = fake_quantize(torch.from_numpy(x), torch.tensor(scale), torch.tensor(zero, dtype=torch.int32), IntRange(8, False))
    runtime = _onnx_runtime_quantize_dequantize(x, scale, zero)
    np.testing.assert_array_equal(out.numpy(), runtime)
    torch_kernel = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), scale, zero, 0, 255).numpy()
    assert (torch_kernel != runtime).any()  # the values do tell the two formulas apart
