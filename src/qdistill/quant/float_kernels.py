"""ONNX Runtime's float arithmetic where a quantizer reads its result: exact float32 steps of its kernels.

A float op between quantized layers (a transformer's GELU) that PyTorch and ONNX Runtime compute
with different float32 approximations makes the next quantizer round some values differently: a
code flips wherever the value lies within a few ulps of a rounding tie. The student keeps
PyTorch's fast op and marks its result (``attach_runtime_values``); a quantizer that reads a
marked tensor while the student evaluates recomputes the runtime's exact value only where the
two could round differently (``refine_near_ties``), a few elements in 10^4, so its codes are the
runtime's. Training is untouched.

- ``fma32``: a fused multiply-add rounded to float32 once (the kernels' FMA instructions).
- ``mlas_erf``: MLAS's error function (``onnxruntime/core/mlas/lib/erf.cpp`` and its FMA3 kernel),
  the polynomial algorithm of its vector path, without clamping the input.
- ``ort_gelu``: ONNX Runtime's ``Gelu`` kernel (com.microsoft ``Gelu``, which its graph optimiser
  fuses the exported erf formula into at ``ORT_ENABLE_EXTENDED`` and above, and ONNX opset-20
  ``Gelu``): ``(0.5 * x) * (erf(x * float32(1/sqrt 2)) + 1)``.

``tests/quant/test_float_kernels.py`` checks both against ONNX Runtime on millions of values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SQRT1_2 = 0.7071067811865476  # M_SQRT1_2, used by ONNX Runtime's Gelu as a float32 multiplier
# |F.gelu(x) - ort_gelu(x)| <= 5.4 * 2^-24 * (|x| + 1) on 6 million values (normal(0, 3) and uniform(-12, 12));
# twelve times that is the bound refine_near_ties trusts
GELU_BOUND = 64 * 2.0**-24

_ERF_SPLIT = 0.921875
_ERF_SMALL = (-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1, 1.28379151e-1)
_ERF_BIG = (1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1, 6.34846687e-1,
            1.28717512e-1)
_EXP_LOWER, _EXP_LOG2_RECIPROCAL, _EXP_LOG2_HI, _EXP_LOG2_LO = -88.3762626647949, 1.44269504088896341, -6.93145752e-1, -1.42860677e-6
_EXP_POLY = (1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1, 1.0, 1.0)
_ROUNDING_CONSTANT = 1.25829120e7  # 1.5 * 2^23: adding and subtracting it rounds to an integer


def fma32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``x * y + z`` of float32 tensors rounded to float32 once, as a fused multiply-add instruction.

    The product of two float32 values is exact in float64; the float64 sum may round, and a
    second rounding to float32 can then land on the wrong side of a float32 tie. The sum's
    exact error (Knuth's two-sum) nudges it one float64 step towards the true value first, which
    keeps every float32 rounding correct.

    Example:
        >>> x = torch.tensor([1 + 2**-12], dtype=torch.float32)
        >>> fma32(x, x, torch.tensor([-1.0])) - (x * x - 1)   # the fused form keeps the 2**-24 the product loses
        tensor([5.9605e-08])
    """
    product = x.double() * y.double()
    addend = z.double()
    total = product + addend
    virtual = total - addend
    error = (product - virtual) + (addend - (total - virtual))
    towards = torch.where(error > 0, torch.inf, -torch.inf).to(total)  # total + error would round back to total
    total = torch.where(error != 0, torch.nextafter(total, towards), total)
    return total.float()


def _horner(coefficients: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    result = torch.full_like(x, coefficients[0])
    for coefficient in coefficients[1:]:
        result = fma32(result, x, torch.full_like(x, coefficient))
    return result


def mlas_erf(x: torch.Tensor) -> torch.Tensor:
    """The error function as MLAS computes it in float32 (float32 in and out).

    Example:
        >>> mlas_erf(torch.tensor([0.0, 0.5, -3.0, 10.0]))
        tensor([ 0.0000,  0.5205, -1.0000,  1.0000])
    """
    x = x.float()
    a = x.abs()
    small = fma32(_horner(_ERF_SMALL, a * a), a, a)
    big = fma32(_horner(_ERF_BIG, a), a, a)
    exponent = torch.maximum(-big, torch.tensor(_EXP_LOWER, dtype=torch.float32))
    rounding = torch.full_like(x, _ROUNDING_CONSTANT)
    whole = fma32(torch.full_like(x, _EXP_LOG2_RECIPROCAL), exponent, rounding) - rounding  # round(exponent / ln 2)
    fraction = fma32(whole, torch.full_like(x, _EXP_LOG2_HI), exponent)
    fraction = fma32(whole, torch.full_like(x, _EXP_LOG2_LO), fraction)
    power = _horner(_EXP_POLY, fraction) * torch.exp2(whole)  # times a power of two: exact
    result = torch.where(a > _ERF_SPLIT, 1.0 - power, small)
    return torch.where(x < 0, -result, result)  # the sign bit of x, or-ed into the result


def ort_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU as ONNX Runtime's ``Gelu`` kernel computes it in float32.

    Example:
        >>> ort_gelu(torch.tensor([-1.0, 0.0, 1.0]))
        tensor([-0.1587,  0.0000,  0.8413])
    """
    x = x.float()
    return (0.5 * x) * (mlas_erf(x * torch.tensor(SQRT1_2, dtype=torch.float32)) + 1.0)


def attach_runtime_values(approximate: torch.Tensor, exact: Callable[[torch.Tensor], torch.Tensor],
                          bound: torch.Tensor) -> torch.Tensor:
    """Mark ``approximate`` (returned) as PyTorch's value of an op whose runtime value differs by at most
    ``bound`` (elementwise); ``exact(mask)`` gives the runtime's values of the elements ``mask`` selects.

    Example:
        >>> x = torch.tensor([0.3, 1.7])
        >>> y = attach_runtime_values(torch.nn.functional.gelu(x), lambda mask: ort_gelu(x[mask]), x.abs() * 1e-6)
        >>> hasattr(y, "_qdistill_runtime")
        True
    """
    approximate._qdistill_runtime = (exact, bound)
    return approximate


def refine_near_ties(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` with the runtime's exact values (``attach_runtime_values``) where rounding ``x / scale``
    could come out differently for them; ``x`` itself when it carries none.

    An element is recomputed when ``(x -+ m) / scale`` round to different integers, with ``m`` the
    attached bound plus a margin for the division's own rounding: every element whose code could
    differ, and only a few in 10^4 of the others.

    Example (0.24999997 lies just below the tie 0.25 of the grid 0.5, its "runtime" value just above):
        >>> y = torch.tensor([0.24999997, 0.1])
        >>> y = attach_runtime_values(y, lambda mask: torch.tensor([0.25000003, 0.1])[mask], torch.full((2,), 1e-7))
        >>> refine_near_ties(y, torch.tensor(0.5)).tolist()   # only the element next to the tie is recomputed
        [0.2500000298023224, 0.10000000149011612]
    """
    runtime = getattr(x, "_qdistill_runtime", None)
    if runtime is None:
        return x
    exact, bound = runtime
    margin = bound + x.abs() * 2.0**-22
    step = scale.detach().reshape(())
    near = torch.floor((x - margin) / step + 0.5) != torch.floor((x + margin) / step + 0.5)
    if not bool(near.any()):
        return x
    refined = x.clone()
    refined[near] = exact(near)
    return refined


def scale_channels(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``x * factors`` (per last-dimension channel), keeping the runtime values ``x`` carries (``attach_runtime_values``).

    ONNX Runtime's float ``Mul`` rounds each product once, as PyTorch does, so the runtime's product is
    the product of the runtime's ``x``; its bound scales with ``|factors|``, plus one rounding.

    Example:
        >>> x = attach_runtime_values(torch.tensor([0.5, 2.0]), lambda mask: torch.tensor([0.5, 2.0])[mask], torch.zeros(2))
        >>> y = scale_channels(x, torch.tensor([2.0, 0.25]))
        >>> y.tolist(), hasattr(y, "_qdistill_runtime")
        ([1.0, 0.5], True)
    """
    product = x * factors
    runtime = getattr(x, "_qdistill_runtime", None)
    if runtime is None:
        return product
    exact, bound = runtime
    expanded = factors.expand_as(x)
    return attach_runtime_values(product, lambda mask: exact(mask) * expanded[mask],
                                 bound * expanded.abs() + product.abs() * 2.0**-23)
