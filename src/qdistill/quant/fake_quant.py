"""Fake quantization math: integer ranges, the LSQ straight-through op, and its ONNX form.

Forward values are ``(clamp(round_half_to_even(x / s) + z, qmin, qmax) - z) * s`` in float32: the
formula of ONNX ``QuantizeLinear`` then ``DequantizeLinear``, which the int8 file runs wherever a
quantizer reads a float tensor (after a float op, a ConvInteger rescale, the model input). It is
written out in tensor ops (``LsqFakeQuantize``) so that one sweep also yields what the backward
needs. Torch's ``fake_quantize_per_{tensor,channel}_affine`` kernels (``reference_fake_quantize``)
multiply by the float32 reciprocal of the step instead; that product differs from the quotient in
the last bit for some ``x``, and an ``x`` within one ulp of a half-integer step then lands one step
apart. On values a network computes such near-ties recur (DenseNet-201: 203 of 671744 codes of
one layer's input, each flipping the ONNX Runtime output against the student), so the student
divides as the runtime does.

The backward pass is the learned-step-size (LSQ, Esser et al. 2020) gradient: straight-through for
the input inside the range, zero outside, and for the step size ``d out / d scale = round(x/s) - x/s``
inside, ``qmin - z`` / ``qmax - z`` at the ends, multiplied by the gradient scale
``g = 1 / sqrt(N * qmax)`` (``Quantizer.elements_per_step`` says what ``N`` is). "Inside" means the
rounded code ``round(x/s) + z`` lies in ``[qmin, qmax]``, the mask torch's kernels compute; the LSQ
paper clips before rounding, which differs only for ``x`` within half a step beyond either end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qdistill.errors import RecipeError

MIN_SCALE = 1e-8  # the smallest step size the forward uses: an optimiser can push a learned step to 0 or below


@dataclass(frozen=True)
class IntRange:
    """The integer grid of a ``bits``-wide quantizer.

    Signed grids are narrow (symmetric, ``[-(2^(b-1)-1), 2^(b-1)-1]``) so that 0 maps to 0 and
    the int8 runtime never meets -128 in a weight; unsigned grids are ``[0, 2^b - 1]``.

    Example:
        >>> IntRange(4, signed=True).qmin, IntRange(4, signed=True).qmax
        (-7, 7)
    """

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise RecipeError(f"bits: {self.bits!r} is not allowed; allowed: an integer from 2 to 8")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


def lsq_grad_factor(elements_per_scale: int, qrange: IntRange) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * qmax)``, which keeps step updates in proportion."""
    return 1.0 / math.sqrt(max(elements_per_scale, 1) * max(qrange.qmax, 1))


def reference_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qrange: IntRange, axis: int | None
) -> torch.Tensor:
    """Torch's reference fake-quantize op for per-tensor (``axis=None``) or per-channel."""
    zero_point = zero_point.to(torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qrange.qmin, qrange.qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qrange.qmin, qrange.qmax)


def _broadcast(values: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return values.reshape(())
    shape = [1] * like.dim()
    shape[axis] = -1
    return values.reshape(shape)


def _lsq_forward(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qrange: IntRange,
                 axis: int | None, need_slope: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(output, inside, slope)`` in one sweep: the fake-quantized values, the float 0/1 "inside" mask
    and, when ``need_slope``, the step-size slope ``d out / d scale`` (before the gradient scale).

    The output is ONNX's QuantizeLinear/DequantizeLinear formula written out:
    ``((clamp(round(x / s) + z) - z) * s``, the codes integer-valued floats (exact), so it is ONNX
    Runtime's float32 result bit for bit for any finite ``x``. The slope is ``round(x/s) - x/s``
    inside and ``qmin - z`` / ``qmax - z`` outside, i.e. ``(clamped code - z) - (x/s) * inside``
    everywhere. Computing it here, while the forward has ``x/s`` and the codes at hand, leaves the
    backward two products and a sum.

    Three tensors of ``x``'s size are allocated and nothing else: the scaled input (rewritten into
    the slope), the codes (rewritten into the mask) and the clamped codes (scaled into the output),
    since on a CPU a fresh large tensor costs more than the arithmetic in it (page faults: a
    weight quantizer's fourth temporary faulted about 1600 pages per step of the demo CNN). The
    mask is ``eq`` written over the codes (1.0/0.0 into a float tensor). ``zero_point=None`` means
    a zero point of 0 (every weight grid, and most activations after a ReLU): adding and
    subtracting it are then two passes over the data that change nothing, and are skipped.
    """
    scaled = x / _broadcast(scale, x, axis)  # the quotient ONNX QuantizeLinear rounds (not x * (1/s))
    code = torch.round(scaled)
    zero = None if zero_point is None else _broadcast(zero_point.to(x.dtype), x, axis)
    if zero is not None:
        code.add_(zero)
    levels = code.clamp(qrange.qmin, qrange.qmax)
    inside = torch.eq(levels, code, out=code)  # 1.0 inside, 0.0 outside, over the codes no longer needed
    if zero is not None:
        levels.sub_(zero)  # q - z: integers, exact
    slope = None
    if need_slope:
        # (q - z) - (x/s) * inside in one pass, over the scaled input: the product with a 0/1 mask is
        # exact, so one rounding as in a multiply then subtract; outside it is (q - z) -+ 0
        slope = torch.addcmul(levels, scaled, inside, value=-1.0, out=scaled)
    output = levels.mul_(_broadcast(scale, x, axis))  # (q - z) * s, the last use of q - z
    return output, inside, slope


def _step_gradient(grad_output: torch.Tensor, slope: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``sum(grad_output * slope)`` over everything but ``axis``: one dot product per step size.

    Per tensor a BLAS dot (no product tensor is made); per channel ``vecdot`` along the rows
    (a batched matmul of 1x1 products is about 5x slower on a CPU).
    """
    if axis is None:
        return torch.dot(grad_output.reshape(-1), slope.reshape(-1))
    if axis == 0:
        rows = slope.shape[0]
        return torch.linalg.vecdot(grad_output.reshape(rows, -1), slope.reshape(rows, -1), dim=1)
    return (grad_output * slope).sum(dim=[dim for dim in range(slope.dim()) if dim != axis])


class LsqFakeQuantize(torch.autograd.Function):
    """Fake quantization with straight-through input gradients and the LSQ step-size gradient.

    Fused: the forward also forms the "inside" mask and the step-size slope (``_lsq_forward``), so
    the backward is ``grad * inside`` and ``sum(grad * slope)``, bit for bit the written-out
    formula's results (tests/quant/test_fake_quant.py).

    A step size below ``MIN_SCALE`` (a high learning rate can drive a learned step to zero or
    negative) is used as ``MIN_SCALE`` in the forward, so the output stays on a valid grid and
    finite. Its gradient is straight-through: the parameter receives the LSQ gradient taken at
    ``MIN_SCALE``, not the zero gradient of ``clamp``, so the next steps can move it back up
    instead of leaving it stuck below the minimum for good.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qrange: IntRange, axis: int | None, grad_factor: float):
        need_slope = scale.requires_grad  # zero_point None: a zero point of 0 (see _lsq_forward)
        scale = scale.clamp_min(MIN_SCALE)  # the values used; the gradient goes straight through (see above)
        output, inside, slope = _lsq_forward(x, scale, zero_point, qrange, axis, need_slope=need_slope)
        ctx.save_for_backward(inside, slope)
        ctx.scale_shape, ctx.axis, ctx.grad_factor = scale.shape, axis, grad_factor
        return output

    @staticmethod
    def backward(ctx, grad_output):
        inside, slope = ctx.saved_tensors
        grad_x = grad_output * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = _step_gradient(grad_output, slope, ctx.axis).reshape(ctx.scale_shape) * ctx.grad_factor
        return grad_x, grad_scale, None, None, None, None


class QdqForExport(torch.autograd.Function):
    """Fake quantization that the TorchScript ONNX exporter writes as QuantizeLinear/DequantizeLinear.

    Grids narrower than int8 keep their width in the file: an integer ``Clip`` on the quantized
    tensor restricts it to ``[qmin, qmax]``, so ONNX Runtime computes with exactly the low-bit
    values the student was trained with, inside int8 kernels.
    """

    @staticmethod
    def forward(ctx, x, scale_values, zero_point_values, qmin, qmax, axis):
        scale = torch.tensor(scale_values, dtype=x.dtype)
        zero_point = torch.tensor(zero_point_values, dtype=torch.int32)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale_values, zero_point_values, qmin, qmax, axis):
        int_dtype = torch.int8 if qmin < 0 else torch.uint8
        scale = g.op("Constant", value_t=torch.tensor(scale_values, dtype=torch.float32))
        zero_point = g.op("Constant", value_t=torch.tensor(zero_point_values, dtype=int_dtype))
        axis_attr = {} if axis is None else {"axis_i": axis}
        quantized = g.op("QuantizeLinear", x, scale, zero_point, **axis_attr)
        full = (-128, 127) if int_dtype == torch.int8 else (0, 255)
        if (qmin, qmax) != full:
            low = g.op("Constant", value_t=torch.tensor(qmin, dtype=int_dtype))
            high = g.op("Constant", value_t=torch.tensor(qmax, dtype=int_dtype))
            quantized = g.op("Clip", quantized, low, high)
        return g.op("DequantizeLinear", quantized, scale, zero_point, **axis_attr)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qrange: IntRange,
    axis: int | None = None,
    grad_factor: float = 1.0,
    zero_is_zero: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` onto ``qrange`` with step ``scale`` (per tensor or along ``axis``).

    ``zero_is_zero=True`` promises that every zero point is 0 (the caller knows it without reading the
    tensor, e.g. a symmetric weight grid), which saves two passes over ``x`` in training.

    Example:
        >>> w = torch.tensor([[0.3, -1.4, 0.65], [0.02, 0.05, -0.1]])
        >>> scale = w.abs().amax(dim=1) / 7          # one step per output channel
        >>> out = fake_quantize(w, scale, torch.zeros(2, dtype=torch.int32), IntRange(4, True), axis=0)
        >>> (out / scale[:, None]).round()           # the integers it stands for
        tensor([[ 2., -7.,  3.],
                [ 1.,  4., -7.]])
    """
    if torch.onnx.is_in_onnx_export():
        scale_values = scale.detach().clamp_min(MIN_SCALE).cpu().reshape(-1 if axis is not None else ()).tolist()
        zero_values = zero_point.detach().cpu().to(torch.int32).reshape(-1 if axis is not None else ()).tolist()
        return QdqForExport.apply(x, scale_values, zero_values, qrange.qmin, qrange.qmax, axis)
    return LsqFakeQuantize.apply(x, scale, None if zero_is_zero else zero_point, qrange, axis, grad_factor)
