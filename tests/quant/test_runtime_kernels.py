"""``qlinear_add``, ``qlinear_mul``, ``qlinear_global_average_pool``, ``qlinear_average_pool`` and ``fma32`` against independent
references: ONNX Runtime's own QLinearAdd/QLinearMul over every pair of uint8 codes, its
QLinearGlobalAveragePool on random and tie-heavy maps, and exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qdistill.quant.float_kernels import fma32
from qdistill.quant.modules import ActivationQuantizer, QuantAdaptiveAvgPool2d, QuantAdd, QuantAvgPool2d, QuantMul
from qdistill.quant.runtime_kernels import (
    QLINEAR_ADD_EXACT,
    QLINEAR_GLOBAL_AVERAGE_POOL_EXACT,
    QLINEAR_MUL_EXACT,
    qlinear_add,
    qlinear_average_pool,
    qlinear_global_average_pool,
    qlinear_mul,
)
from support import calibrated

needs_avx2 = pytest.mark.skipif(not QLINEAR_ADD_EXACT, reason="qlinear_add reproduces ONNX Runtime's AVX2 kernel")
needs_x86 = pytest.mark.skipif(not QLINEAR_MUL_EXACT, reason="qlinear_mul reproduces ONNX Runtime's x86 kernel")
needs_x86_pool = pytest.mark.skipif(not QLINEAR_GLOBAL_AVERAGE_POOL_EXACT,
                                    reason="qlinear_global_average_pool reproduces ONNX Runtime's x86 kernel")


def _ort_binary_op(codes_a, codes_b, grids, op="QLinearAdd"):
    """ONNX Runtime's com.microsoft.QLinearAdd (or ``op``) on uint8 codes; ``grids`` = ((s_a, z_a), (s_b, z_b), (s_c, z_c))."""
    names = ("a", "b", "c")
    initializers = []
    for name, (scale, zero) in zip(names, grids, strict=True):
        initializers += [helper.make_tensor(f"{name}_scale", TensorProto.FLOAT, [], [scale]),
                         helper.make_tensor(f"{name}_zero", TensorProto.UINT8, [], [zero])]
    node = helper.make_node(op, ["a", "a_scale", "a_zero", "b", "b_scale", "b_zero", "c_scale", "c_zero"],
                            ["c"], domain="com.microsoft")
    graph = helper.make_graph([node], "add", [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.UINT8, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"a": codes_a.astype(np.uint8), "b": codes_b.astype(np.uint8)})[0].astype(np.int64)


def _quantizer(scale: float, zero: int) -> ActivationQuantizer:
    return calibrated(ActivationQuantizer(8), scale, zero)


def _all_code_pairs():
    codes_a, codes_b = np.meshgrid(np.arange(256), np.arange(256))
    return codes_a.ravel(), codes_b.ravel()


def _random_grids(seed: int, widest_step: float) -> list[tuple[float, int]]:
    """Three (step, zero point) grids; zero points at 0 for even seeds."""
    rng = np.random.default_rng(seed)
    scales = [float(np.float32(rng.uniform(0.002, widest_step))) for _ in range(3)]
    zeros = [int(z) for z in rng.integers(0, 256, 3)] if seed % 2 else [0, 0, 0]
    return list(zip(scales, zeros, strict=True))


def _kernel_against_onnx_runtime(kernel, op: str, grids, codes_a: np.ndarray, codes_b: np.ndarray) -> None:
    """``kernel`` (``qlinear_add``/``qlinear_mul``) on the dequantized codes, against ONNX Runtime's ``op``."""
    quantizers = [_quantizer(scale, zero) for scale, zero in grids]
    a = torch.from_numpy(codes_a - grids[0][1]).float() * quantizers[0].scale.detach()
    b = torch.from_numpy(codes_b - grids[1][1]).float() * quantizers[1].scale.detach()
    ours = torch.round(kernel(a, b, *quantizers) / quantizers[2].scale.detach()).long().numpy() + grids[2][1]
    theirs = _ort_binary_op(codes_a, codes_b, grids, op=op)
    assert np.array_equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.size} codes differ"


@needs_avx2
@pytest.mark.parametrize("seed", range(12))
def test_qlinear_add_equals_onnx_runtime_for_every_pair_of_codes(seed):
    _kernel_against_onnx_runtime(qlinear_add, "QLinearAdd", _random_grids(seed, 0.06), *_all_code_pairs())


@needs_avx2
def test_the_float_formula_misses_codes_the_kernel_rounds_the_other_way():
    """The case this module exists for (ResNet-34's first residual add): the exact sum is 24.5000038
    steps, the kernel's float32 steps give 24.49999; ONNX Runtime writes 24, a float add rounds to 25."""
    grids = [(0.019825927913188934, 120), (0.014284253120422363, 0), (0.016777239739894867, 0)]
    quantizers = [_quantizer(scale, zero) for scale, zero in grids]
    a = (torch.tensor([122.0]) - 120) * quantizers[0].scale.detach()
    b = torch.tensor([26.0]) * quantizers[1].scale.detach()
    theirs = _ort_binary_op(np.array([122]), np.array([26]), grids)
    assert theirs.tolist() == [24]
    assert torch.round((a + b) / quantizers[2].scale.detach()).item() == 25
    assert torch.round(qlinear_add(a, b, *quantizers) / quantizers[2].scale.detach()).item() == 24


@needs_avx2
def test_quant_add_evaluates_as_the_kernel_and_trains_on_the_float_sum():
    quantizers = [_quantizer(0.019825927913188934, 120), _quantizer(0.014284253120422363, 0),
                  _quantizer(0.016777239739894867, 0)]
    add = QuantAdd(quantizers[:2])
    add.__dict__["requantizer"], add.__dict__["requantizer_after_relu"] = quantizers[2], True
    a = (torch.tensor([122.0, 130.0]) - 120) * quantizers[0].scale.detach()
    b = torch.tensor([26.0, 3.0]) * quantizers[1].scale.detach()
    with torch.no_grad():
        evaluated = add(a, b)
    assert torch.equal(evaluated, qlinear_add(a, b, *quantizers))
    trained = add(a.requires_grad_(), b)
    assert torch.equal(trained, a + b) and trained.requires_grad


@needs_x86
@pytest.mark.parametrize("seed", range(12))
def test_qlinear_mul_equals_onnx_runtime_for_every_pair_of_codes(seed):
    # products of small steps, as a squeeze-excite gate times activations; every third seed wider steps
    _kernel_against_onnx_runtime(qlinear_mul, "QLinearMul", _random_grids(100 + seed, 0.06 if seed % 3 else 0.5),
                                 *_all_code_pairs())


@needs_x86
def test_qlinear_mul_broadcasts_a_gate_as_the_kernel_does():
    """(N, C, H, W) activations times a (N, C, 1, 1) gate: the kernel's scalar-B path, element for element."""
    rng = np.random.default_rng(0)
    codes_a, codes_b = rng.integers(0, 256, (2, 3, 4, 4)), rng.integers(0, 256, (2, 3, 1, 1))
    _kernel_against_onnx_runtime(qlinear_mul, "QLinearMul", [(0.0123, 7), (1 / 255, 0), (0.0091, 3)], codes_a, codes_b)


@needs_x86
def test_quant_mul_evaluates_as_the_kernel_and_trains_on_the_float_product():
    quantizers = [_quantizer(0.0123, 7), _quantizer(1 / 255, 0), _quantizer(0.0091, 3)]
    mul = QuantMul(quantizers[:2])
    mul.__dict__["requantizer"] = quantizers[2]
    codes = torch.arange(256.0)
    a, b = (codes - 7) * quantizers[0].scale.detach(), codes.flip(0) * quantizers[1].scale.detach()
    with torch.no_grad():
        evaluated = mul(a, b)
    assert torch.equal(evaluated, qlinear_mul(a, b, *quantizers))
    trained = mul(a.requires_grad_(), b)
    assert torch.equal(trained, a * b) and trained.requires_grad


def _exact_fma32(x: float, y: float, z: float) -> float:
    """Round ``x * y + z`` (exact rationals) to the nearest float32, ties to even."""
    exact = Fraction(x) * Fraction(y) + Fraction(z)
    low = float(np.float32(float(exact)))  # within one float32 step of the exact value
    candidates = [float(np.nextafter(np.float32(low), np.float32(-np.inf))), low,
                  float(np.nextafter(np.float32(low), np.float32(np.inf)))]
    best = min(candidates, key=lambda c: (abs(Fraction(c) - exact), int(np.float32(c).view(np.int32)) & 1))
    return best


def test_fma32_rounds_once_like_a_fused_multiply_add():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4000).astype(np.float32)
    y = rng.standard_normal(4000).astype(np.float32)
    z = (rng.standard_normal(4000) * 2.0 ** rng.integers(-30, 30, 4000)).astype(np.float32)
    # x * y = 1 + 2**-11 + 2**-24, a float32 tie; + 2**-80 rounds (in float64) onto the tie, and a second
    # rounding would then go to even (down) where the exact sum is above the tie (up)
    x[:3] = np.float32(1 + 2**-12)
    y[:3] = np.float32(1 + 2**-12)
    z[:3] = np.float32([2.0**-80, -(2.0**-80), 0.0])
    ours = fma32(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(z)).numpy()
    expected = np.array([_exact_fma32(float(a), float(b), float(c)) for a, b, c in zip(x, y, z, strict=True)], np.float32)
    assert np.array_equal(ours, expected)


def _ort_global_average_pool(codes: np.ndarray, grids) -> np.ndarray:
    """ONNX Runtime's com.microsoft.QLinearGlobalAveragePool (NCHW) on uint8 codes; ``grids`` = ((s_x, z_x), (s_y, z_y))."""
    initializers = []
    for name, (scale, zero) in zip("xy", grids, strict=True):
        initializers += [helper.make_tensor(f"{name}_scale", TensorProto.FLOAT, [], [scale]),
                         helper.make_tensor(f"{name}_zero", TensorProto.UINT8, [], [zero])]
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "x_scale", "x_zero", "y_scale", "y_zero"], ["y"],
                            domain="com.microsoft", channels_last=0)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": codes.astype(np.uint8)})[0].astype(np.int64)


def _pool_against_onnx_runtime(codes: np.ndarray, grids) -> int:
    """``qlinear_global_average_pool`` on the dequantized codes against ONNX Runtime; returns how many
    outputs the plain float mean (rounded by the output quantizer) gets wrong, for the caller to judge."""
    quantizers = [_quantizer(scale, zero) for scale, zero in grids]
    x = torch.from_numpy(codes - grids[0][1]).float() * quantizers[0].scale.detach()
    output_step = quantizers[1].scale.detach()
    ours = torch.round(qlinear_global_average_pool(x, *quantizers) / output_step).long().numpy() + grids[1][1]
    theirs = _ort_global_average_pool(codes, grids)
    assert np.array_equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.size} codes differ"
    float_mean = quantizers[1](x.mean(dim=(2, 3), keepdim=True))
    return int((torch.round(float_mean / output_step).long().numpy() + grids[1][1] != theirs).sum())


@needs_x86_pool
@pytest.mark.parametrize("size", [1, 2, 7, 8, 14])
def test_qlinear_global_average_pool_equals_onnx_runtime(size):
    """Random maps over random grids, and maps on one shared grid (an SE block's pool feeding its fc1 on the
    grid of the block's activations), where a mean lands exactly on a tie once in ``size * size`` channels."""
    rng = np.random.default_rng(size)
    for seed in range(6):
        (step_x, zero_x), (step_y, zero_y), _ = _random_grids(200 + seed, 0.06)
        codes = rng.integers(0, 256, (4, 512, size, size))
        _pool_against_onnx_runtime(codes, [(step_x, zero_x), (step_y, zero_y)])
        _pool_against_onnx_runtime(codes, [(step_x, zero_x), (step_x, zero_x)])


@needs_x86_pool
def test_the_float_mean_misses_ties_the_kernel_rounds_half_to_even():
    """On one shared grid, an 8x8 map whose codes sum to 32 mod 64 has an exact .5 mean: the kernel rounds
    it half to even, a float mean lands a float32 ulp either side."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (64, 256, 8, 8))
    codes[..., 0, 0] += 32 - codes.sum(axis=(2, 3)) % 64  # every channel's sum on a tie
    codes = np.clip(codes, 0, 255)
    wrong = _pool_against_onnx_runtime(codes, [(0.0173, 3), (0.0173, 3)])
    assert wrong > 0


@needs_x86_pool
def test_quant_pool_evaluates_as_the_kernel_and_trains_on_the_float_mean():
    quantizers = [_quantizer(0.0173, 3), _quantizer(0.0173, 3)]
    pool = QuantAdaptiveAvgPool2d.from_float(torch.nn.AdaptiveAvgPool2d(1), quantizers[0])
    pool.__dict__["requantizer"] = quantizers[1]
    x = (torch.randint(0, 256, (2, 8, 8, 8)).float() - 3) * quantizers[0].scale.detach()
    with torch.no_grad():
        evaluated = pool(x)
    assert torch.equal(evaluated, qlinear_global_average_pool(x, *quantizers))
    trained = pool(x.requires_grad_())
    assert torch.equal(trained, x.mean(dim=(2, 3), keepdim=True)) and trained.requires_grad


def _ort_average_pool(codes: np.ndarray, grids, pool: torch.nn.AvgPool2d) -> np.ndarray:
    """ONNX Runtime's com.microsoft.QLinearAveragePool (NCHW) on uint8 codes with ``pool``'s attributes."""
    kernel, stride, padding = (torch.nn.modules.utils._pair(value) for value in (pool.kernel_size, pool.stride,
                                                                                 pool.padding))
    initializers = []
    for name, (scale, zero) in zip("xy", grids, strict=True):
        initializers += [helper.make_tensor(f"{name}_scale", TensorProto.FLOAT, [], [scale]),
                         helper.make_tensor(f"{name}_zero", TensorProto.UINT8, [], [zero])]
    node = helper.make_node("QLinearAveragePool", ["x", "x_scale", "x_zero", "y_scale", "y_zero"], ["y"],
                            domain="com.microsoft", kernel_shape=list(kernel), strides=list(stride),
                            pads=[*padding, *padding], count_include_pad=int(pool.count_include_pad),
                            ceil_mode=int(pool.ceil_mode))
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": codes.astype(np.uint8)})[0].astype(np.int64)


# (kernel, stride, padding, ceil_mode, count_include_pad) as torchvision, timm and hand-written nets use them
AVERAGE_POOLS = [(2, 2, 0, False, True), (3, 2, 1, False, True), (3, 2, 1, False, False), (3, 1, 1, False, False),
                 (2, 2, 0, True, False), (3, 2, 1, True, True), (3, 2, 1, True, False), (5, 3, 2, True, False)]


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, count_include_pad", AVERAGE_POOLS)
def test_qlinear_average_pool_equals_onnx_runtime(kernel, stride, padding, ceil_mode, count_include_pad):
    """Odd maps (so ceil-mode windows overhang) on random grids with non-zero zero points."""
    pool = torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
    for seed in range(6):
        (step_x, zero_x), (step_y, zero_y), _ = _random_grids(2 * seed + 1, 0.06)  # odd seeds: zero points not 0
        codes = rng.integers(0, 256, (4, 64, 9, 9))
        x = torch.from_numpy(codes - zero_x).float() * np.float32(step_x)
        ours = qlinear_average_pool(x, pool, _quantizer(step_x, zero_x), _quantizer(step_y, zero_y))
        ours_codes = torch.round(ours / np.float32(step_y)).long().numpy() + zero_y
        theirs = _ort_average_pool(codes, [(step_x, zero_x), (step_y, zero_y)], pool)
        assert ours_codes.shape == theirs.shape and np.array_equal(ours_codes, theirs), \
            f"{int((ours_codes != theirs).sum())} of {theirs.size} codes differ"


def test_the_float_formula_misses_codes_the_average_pool_kernel_rounds_the_other_way():
    """``round(mean / s_y) + z_y`` on a float mean against the kernel's ``round(mean / s_y + z_y)``: near a
    tie the zero point's float32 add moves the value across it."""
    pool, grids = torch.nn.AvgPool2d(2), [(0.0173, 3), (0.0119, 131)]
    codes = np.random.default_rng(0).integers(0, 256, (64, 64, 8, 8))
    x = torch.from_numpy(codes - 3).float() * np.float32(0.0173)
    theirs = _ort_average_pool(codes, grids, pool)
    ours = qlinear_average_pool(x, pool, *(_quantizer(*grid) for grid in grids))
    assert np.array_equal(torch.round(ours / np.float32(0.0119)).long().numpy() + 131, theirs)
    float_codes = np.clip(torch.round(pool(x) / np.float32(0.0119)).long().numpy() + 131, 0, 255)
    assert (float_codes != theirs).sum() > 0


@needs_x86_pool
def test_a_window_over_the_whole_image_runs_the_global_kernel_as_onnx_runtime_does():
    codes = np.random.default_rng(1).integers(0, 256, (4, 64, 7, 7))
    grids = [(0.0173, 3), (0.0173, 3)]
    x = torch.from_numpy(codes - 3).float() * np.float32(0.0173)
    ours = qlinear_average_pool(x, torch.nn.AvgPool2d(7), *(_quantizer(*grid) for grid in grids))
    assert np.array_equal(torch.round(ours / np.float32(0.0173)).long().numpy() + 3,
                          _ort_average_pool(codes, grids, torch.nn.AvgPool2d(7)))


def test_quant_avg_pools_evaluate_as_the_kernel_and_train_on_the_float_mean():
    quantizers = [_quantizer(0.0173, 3), _quantizer(0.0119, 131)]
    x = (torch.randint(0, 256, (2, 8, 9, 9)).float() - 3) * quantizers[0].scale.detach()
    window = torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)
    pool = QuantAvgPool2d.from_float(window, quantizers[0])
    pool.__dict__["requantizer"] = quantizers[1]
    with torch.no_grad():
        assert torch.equal(pool(x), qlinear_average_pool(x, window, *quantizers))
    trained = pool(x.requires_grad_())
    assert torch.equal(trained, window(x)) and trained.requires_grad
    adaptive = QuantAdaptiveAvgPool2d.from_float(torch.nn.AdaptiveAvgPool2d(3), quantizers[0])  # 9x9 -> 3x3
    adaptive.__dict__["requantizer"] = quantizers[1]
    with torch.no_grad():
        assert torch.equal(adaptive(x), qlinear_average_pool(x, torch.nn.AvgPool2d(3), *quantizers))
        assert torch.equal(QuantAdaptiveAvgPool2d.from_float(torch.nn.AdaptiveAvgPool2d(2), quantizers[0])(x),
                           torch.nn.AdaptiveAvgPool2d(2)(x))  # 9 / 2: no AveragePool to match, the float mean
