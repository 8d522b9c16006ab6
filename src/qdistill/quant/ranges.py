"""Range initialisation from data: min-max, MSE-optimal clipping, percentile.

Each function returns ``(scale, zero_point)`` for a grid; per-channel functions work along dim 0.
MSE search tries clipping ratios of the observed range and keeps, per channel, the one whose
quantize-dequantize error is smallest (the approach of NNCF/AIMET-style "MSE" range setting).
"""

from __future__ import annotations

import torch

from qdistill.quant.fake_quant import MIN_SCALE, IntRange, reference_fake_quantize

CLIP_RATIOS = torch.linspace(0.2, 1.0, 41)


def symmetric_scale(max_abs: torch.Tensor, qrange: IntRange) -> torch.Tensor:
    """Step size that maps ``max_abs`` onto ``qmax`` (zero point 0)."""
    return (max_abs / qrange.qmax).clamp_min(MIN_SCALE)


def asymmetric_params(low: torch.Tensor, high: torch.Tensor, qrange: IntRange) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering ``[low, high]``, widened to include 0 exactly."""
    low = torch.minimum(low, torch.zeros_like(low))
    high = torch.maximum(high, torch.zeros_like(high))
    scale = ((high - low) / (qrange.qmax - qrange.qmin)).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(torch.round(qrange.qmin - low / scale), qrange.qmin, qrange.qmax).to(torch.int32)
    return scale, zero_point


def weight_scale(weight: torch.Tensor, qrange: IntRange, method: str, per_channel: bool, percentile: float) -> torch.Tensor:
    """Symmetric step size(s) for a weight tensor, shape ``(C,)`` per channel or ``()``."""
    flat = weight.detach().reshape(weight.shape[0], -1) if per_channel else weight.detach().reshape(1, -1)
    if method == "percentile":
        max_abs = torch.quantile(flat.abs().float(), percentile / 100.0, dim=1)
    else:
        max_abs = flat.abs().amax(dim=1)
    scale = symmetric_scale(max_abs, qrange)
    if method == "mse":
        scale = _mse_symmetric(flat, scale, qrange)
    return scale if per_channel else scale.reshape(())


def _mse_symmetric(flat: torch.Tensor, full_scale: torch.Tensor, qrange: IntRange) -> torch.Tensor:
    """Per row of ``flat`` (C, K), the clipped scale with the smallest squared error."""
    best_error = torch.full_like(full_scale, float("inf"))
    best_scale = full_scale.clone()
    zero = torch.zeros_like(full_scale, dtype=torch.int32)
    for ratio in CLIP_RATIOS:
        candidate = (full_scale * ratio).clamp_min(MIN_SCALE)
        error = (reference_fake_quantize(flat, candidate, zero, qrange, axis=0) - flat).pow(2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, candidate, best_scale)
    return best_scale


def activation_params(
    sample: torch.Tensor, low: torch.Tensor, high: torch.Tensor, qrange: IntRange, method: str, percentile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(scale, zero_point)`` for activations seen in calibration.

    ``low``/``high`` are the running min and max; ``sample`` is a random subset of the values,
    used by the percentile and MSE methods.
    """
    if method == "percentile":
        low = torch.quantile(sample, 1.0 - percentile / 100.0)
        high = torch.quantile(sample, percentile / 100.0)
    scale, zero_point = asymmetric_params(low, high, qrange)
    if method != "mse":
        return scale, zero_point
    best = (float("inf"), scale, zero_point)
    for ratio in CLIP_RATIOS:
        candidate_scale, candidate_zero = asymmetric_params(low * ratio, high * ratio, qrange)
        quantized = reference_fake_quantize(sample, candidate_scale, candidate_zero, qrange, axis=None)
        error = (quantized - sample).pow(2).sum().item()
        if error < best[0]:
            best = (error, candidate_scale, candidate_zero)
    return best[1], best[2]
