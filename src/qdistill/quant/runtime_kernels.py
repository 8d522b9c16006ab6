"""The arithmetic of ONNX Runtime's integer kernels that do not requantize in one exact rounding.

A quantized op whose float formula rounds differently from the kernel the int8 file runs on
flips a code wherever the exact value lies within a few float32 ulps of a rounding tie. The
inputs are codes, so one near-tie pair of codes recurs at every position that holds it, and a
deep network amplifies each flip (ResNet-34, the first residual add: 20 flipped codes in 262144,
the logits at 38 dB). The student evaluates such ops with the kernel's own float32 steps, so the
two agree code for code; training keeps the float formula and its gradients.

``qlinear_add`` follows MLAS's AVX2 ``QLinearAdd`` (``onnxruntime/core/mlas/lib/intrinsics/avx2/
qladd_avx2.cpp``), which ONNX Runtime runs on every x86 CPU with AVX2:
``round_half_even(fma(a, r_ac, fma(b, r_bc, fixed)))`` with ``r_ac = s_a / s_c``, ``r_bc = s_b / s_c``
and ``fixed = z_c - fma(r_ac, z_a, r_bc * z_b)`` (the compiler contracts that product sum), each
step rounded to float32 once. ``tests/quant/test_runtime_kernels.py`` checks it against ONNX
Runtime over every pair of codes. Other CPUs (ONNX Runtime's SSE2 and NEON kernels) keep the float
formula: ``QLINEAR_ADD_EXACT`` says which applies here.

``qlinear_mul`` follows MLAS's x86 ``QLinearMul`` (``onnxruntime/core/mlas/lib/qlmul.cpp``, the SSE2
kernel of every x86 build): the integer product ``(a - z_a) * (b - z_b)`` converted to float32, times
``s_a * s_b / s_c`` (float32, left to right), plus ``z_c``, as two separately rounded float32 steps
(intrinsics, not contracted), then rounded half to even and saturated. A squeeze-excite gate
(RegNetY, EfficientNet, MobileNetV3) multiplies in it. ``QLINEAR_MUL_EXACT`` says whether this CPU
runs that kernel (ONNX Runtime's NEON kernel on Arm rounds its own way).

``qlinear_global_average_pool`` follows MLAS's x86 ``QLinearGlobalAveragePool``
(``onnxruntime/core/mlas/lib/qlgavgpool.cpp``): the int32 sum of ``x - z_x`` over the image, converted
to float32, times ``s_x / (s_y * N)`` (float32: the product, then the quotient), rounded half to even
and saturated. A float mean rounds the same value its own way: with ``N`` even and equal steps the
exact mean lies on a tie (sum = 32 mod 64 on an 8x8 map) once in ``N`` channels, and the summation
order of the float mean (which changes with the thread count) decides which side it falls on.
EfficientNet-B0 at one thread: every squeeze-excite ``fc1`` after the first block diverged
(61 dB, falling to 21 dB at the logits). ``QLINEAR_GLOBAL_AVERAGE_POOL_EXACT`` says whether this CPU
runs that kernel (the NEON kernel uses a fixed-point multiplier).

``qlinear_average_pool`` follows ONNX Runtime's ``QLinearAveragePool`` for windows smaller than the
image (``onnxruntime/contrib_ops/cpu/quantization/qlinear_pool.cc``, plain C++ on every CPU): each code
dequantized as ``s_x * (x - z_x)`` (float32), the window summed in float32 row by row, divided by the
element count (the whole kernel with ``count_include_pad``, else the elements inside the image), then
``round_half_even(y / s_y + z_y)``: the zero point is added before the rounding, so a value near a tie
can round the other way than ``round(y / s_y) + z_y``. A window that covers the whole unpadded image
runs the global kernel above, as ONNX Runtime falls back to it.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from qdistill.quant.fake_quant import MIN_SCALE
from qdistill.quant.float_kernels import fma32
from qdistill.quant.quantizer import Quantizer

# the CPU ONNX Runtime runs on here takes MLAS's AVX2 kernels (torch reports AVX512 for a superset)
QLINEAR_ADD_EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
QLINEAR_MUL_EXACT = X86  # MLAS's SSE2 kernel, on every x86 build
QLINEAR_GLOBAL_AVERAGE_POOL_EXACT = X86  # likewise


def _scalar(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(()).float()


def _grids(*quantizers: Quantizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The quantizers' steps (clamped as the fake quantization clamps them) and zero points, as float32 scalars."""
    return ([_scalar(q.scale).clamp_min(MIN_SCALE) for q in quantizers], [_scalar(q.zero_point) for q in quantizers])


def qlinear_add(a: torch.Tensor, b: torch.Tensor, a_quantizer: Quantizer, b_quantizer: Quantizer,
                output_quantizer: Quantizer) -> torch.Tensor:
    """``a + b`` of equal shapes quantized by ``output_quantizer`` as ONNX Runtime's ``QLinearAdd``
    computes it on an AVX2 CPU, dequantized.

    ``a`` and ``b`` are on their quantizers' grids (fake-quantized values); the result is on the
    output grid, so the output quantizer leaves it unchanged.

    Example:
        >>> from qdistill.quant.modules import ActivationQuantizer
        >>> qa, qb, qc = (ActivationQuantizer(8) for _ in range(3))
        >>> for quantizer, step in ((qa, 0.5), (qb, 0.25), (qc, 1.0)):
        ...     _ = quantizer.scale.data.fill_(step); _ = quantizer.initialized.fill_(True)
        >>> qlinear_add(torch.tensor([1.0, 1.5]), torch.tensor([0.25, 1.0]), qa, qb, qc)   # 1.25 -> 1, 2.5 -> 2 (half to even)
        tensor([1., 2.])
    """
    (scale_a, scale_b, scale_c), (zero_a, zero_b, zero_c) = _grids(a_quantizer, b_quantizer, output_quantizer)
    codes_a = torch.round(a.float() / scale_a) + zero_a  # the stored codes, exactly (integers below 2^24)
    codes_b = torch.round(b.float() / scale_b) + zero_b
    ratio_a, ratio_b = scale_a / scale_c, scale_b / scale_c  # float32 divisions, as the kernel's setup
    fixed = zero_c - fma32(ratio_a, zero_a, ratio_b * zero_b)
    value = fma32(codes_a, ratio_a, fma32(codes_b, ratio_b, fixed))
    qrange = output_quantizer.qrange
    codes = torch.round(value).clamp_(qrange.qmin, qrange.qmax)  # cvtps: round half to even; pack: saturate
    return ((codes - zero_c) * scale_c).to(a.dtype)


def qlinear_mul(a: torch.Tensor, b: torch.Tensor, a_quantizer: Quantizer, b_quantizer: Quantizer,
                output_quantizer: Quantizer) -> torch.Tensor:
    """``a * b`` (broadcasting) quantized by ``output_quantizer`` as ONNX Runtime's ``QLinearMul``
    computes it on an x86 CPU, dequantized.

    ``a`` and ``b`` are on their quantizers' grids (fake-quantized values); the result is on the
    output grid, so the output quantizer leaves it unchanged.

    Example:
        >>> from qdistill.quant.modules import ActivationQuantizer
        >>> qa, qb, qc = (ActivationQuantizer(8) for _ in range(3))
        >>> for quantizer, step in ((qa, 0.5), (qb, 0.25), (qc, 0.25)):
        ...     _ = quantizer.scale.data.fill_(step); _ = quantizer.initialized.fill_(True)
        >>> qlinear_mul(torch.tensor([1.5, 2.5]), torch.tensor([0.25]), qa, qb, qc)   # 1.5 -> 1.5 codes -> 2 (half to even)
        tensor([0.5000, 0.5000])
    """
    (scale_a, scale_b, scale_c), (_, _, zero_c) = _grids(a_quantizer, b_quantizer, output_quantizer)
    centred_a = torch.round(a.float() / scale_a)  # codes - zero point, exactly
    centred_b = torch.round(b.float() / scale_b)
    product = centred_a * centred_b  # the kernel's int32 product, exact in float32 for codes of at most 8 bits
    ratio = scale_a * scale_b / scale_c  # float32, left to right, as the kernel's setup
    value = product * ratio + zero_c  # two float32 roundings (mul_ps, add_ps)
    qrange = output_quantizer.qrange
    codes = torch.round(value).clamp_(qrange.qmin, qrange.qmax)  # cvtps: round half to even; packs: saturate
    return ((codes - zero_c) * scale_c).to(a.dtype)


def qlinear_global_average_pool(x: torch.Tensor, input_quantizer: Quantizer, output_quantizer: Quantizer) -> torch.Tensor:
    """The mean of ``x`` (B, C, H, W) over H and W quantized by ``output_quantizer`` as ONNX Runtime's
    ``QLinearGlobalAveragePool`` computes it on an x86 CPU, dequantized: (B, C, 1, 1).

    ``x`` is on ``input_quantizer``'s grid (fake-quantized values); the result is on the output grid,
    so the output quantizer leaves it unchanged.

    Example:
        >>> from qdistill.quant.modules import ActivationQuantizer
        >>> qx, qy = ActivationQuantizer(8), ActivationQuantizer(8)
        >>> for quantizer in (qx, qy):
        ...     _ = quantizer.scale.data.fill_(1.0); _ = quantizer.initialized.fill_(True)
        >>> x = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 5.0]).reshape(2, 1, 2, 2)   # means 1.75 and 4.25
        >>> qlinear_global_average_pool(x, qx, qy).flatten()
        tensor([2., 4.])
    """
    (scale_x, scale_y), (_, zero_y) = _grids(input_quantizer, output_quantizer)
    image_size = torch.tensor(float(x.shape[-2] * x.shape[-1]))  # float32, as the kernel casts it
    centred = torch.round(x.double() / scale_x.double())  # codes - zero point, exactly
    total = centred.sum(dim=(-2, -1), keepdim=True).float()  # the int32 sum, exact in float32 below 2^24
    ratio = scale_x / (scale_y * image_size)  # float32: product, then quotient, as the kernel's setup
    qrange = output_quantizer.qrange
    codes = (torch.round(total * ratio) + zero_y).clamp_(qrange.qmin, qrange.qmax)  # cvtps (half to even), + z_y, pack
    return ((codes - zero_y) * scale_y).to(x.dtype)


def qlinear_average_pool(x: torch.Tensor, pool: torch.nn.AvgPool2d, input_quantizer: Quantizer,
                         output_quantizer: Quantizer) -> torch.Tensor:
    """``pool`` (its kernel, stride, padding, ``ceil_mode`` and ``count_include_pad``) applied to ``x``
    (B, C, H, W) and quantized by ``output_quantizer`` as ONNX Runtime's ``QLinearAveragePool`` computes
    it, dequantized. ``x`` is on ``input_quantizer``'s grid; the result is on the output grid.

    Example:
        >>> from qdistill.quant.modules import ActivationQuantizer
        >>> qx, qy = ActivationQuantizer(8), ActivationQuantizer(8)
        >>> for quantizer, (step, zero) in ((qx, (1.0, 0)), (qy, (1.0, 3))):
        ...     _ = quantizer.scale.data.fill_(step); _ = quantizer.zero_point.data.fill_(zero)
        ...     _ = quantizer.initialized.fill_(True)
        >>> x = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 5.0, 0.0]).reshape(1, 1, 3, 3)
        >>> qlinear_average_pool(x, torch.nn.AvgPool2d(2, stride=1), qx, qy).flatten()  # 1.75, 2.75, 3.5 -> 4.5 + 3: even
        tensor([2., 3., 4., 3.])
    """
    kernel, stride, padding = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
    if tuple(x.shape[-2:]) == kernel and padding == (0, 0):
        return qlinear_global_average_pool(x, input_quantizer, output_quantizer)
    (scale_x, scale_y), (_, zero_y) = _grids(input_quantizer, output_quantizer)
    values = torch.round(x.double() / scale_x.double()).float() * scale_x  # the kernel's s_x * (x - z_x), float32
    sizes = [_pooled_size(x.shape[-2 + axis], kernel[axis], stride[axis], padding[axis], pool.ceil_mode)
             for axis in (0, 1)]
    borders = [padding[1], _tail(x.shape[-1], sizes[1], kernel[1], stride[1], padding[1]),
               padding[0], _tail(x.shape[-2], sizes[0], kernel[0], stride[0], padding[0])]
    windows = F.unfold(F.pad(values, borders), kernel, stride=stride).unflatten(1, (x.shape[1], -1))
    total = windows[:, :, 0]
    for position in range(1, windows.shape[2]):  # one float32 add at a time, in the kernel's row-major order
        total = total + windows[:, :, position]  # a padded position adds 0.0: exact
    if pool.count_include_pad:
        count = torch.tensor(float(kernel[0] * kernel[1]))
    else:  # the elements inside the image: small integers, exact
        count = F.unfold(F.pad(torch.ones_like(x[:1, :1]), borders), kernel, stride=stride).sum(dim=1)
    mean = total / count  # float32 division by the float32 count
    qrange = output_quantizer.qrange
    codes = torch.round(mean / scale_y + zero_y).clamp_(qrange.qmin, qrange.qmax)  # nearbyintf(y / s_y + z_y)
    return ((codes - zero_y) * scale_y).reshape(*x.shape[:2], *sizes).to(x.dtype)


def _pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's pooled length (the one the exported graph records): a ceil-mode window must start inside
    the image or its leading padding."""
    span = size + 2 * padding - kernel
    pooled = (-(-span // stride) if ceil_mode else span // stride) + 1
    return pooled - 1 if ceil_mode and (pooled - 1) * stride >= size + padding else pooled


def _tail(size: int, pooled: int, kernel: int, stride: int, padding: int) -> int:
    """Zeros to append so that every window lies inside the padded tensor (ceil mode overhangs the end)."""
    return max(padding, (pooled - 1) * stride + kernel - size - padding)
