"""Per-layer sensitivity: how much the KD loss rises when one layer alone goes to a narrower width.

The reference is the student with every layer at the widest allowed widths (``prepare`` and
calibration, no training). For each quantized layer and each narrower weight width, and for each
quantized layer or op and each narrower activation width, the student is prepared again with only
that layer changed (a ``quant.overrides`` entry), and the KD loss against the teacher (the recipe's
``distill`` temperature and alpha) is measured on held-out batches: training batches that follow
the calibration ones, so neither calibration nor the later choice (validation) nor the report
(test) sees them. Sensitivity is that loss minus the reference loss; widths are assumed to add up
(the allocation sums them), which is what HAWQ-style methods assume too.
"""

from __future__ import annotations

import glob
import itertools
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qdistill.batch import split_batch
from qdistill.errors import DataError
from qdistill.kd import KDLoss
from qdistill.quant import layer_table, prepare
from qdistill.quant.modules import is_quantized
from qdistill.recipe import QuantSpec, Recipe


def widest_spec(spec: QuantSpec, weight_widths: list[int], act_widths: list[int],
                overrides: dict[str, dict[str, int]] | None = None) -> QuantSpec:
    """``spec`` with every layer at the widest allowed widths (no first/last rule), then ``overrides``
    (``{layer: {weight_bits?, act_bits?}}``, exact layer names).

    Example:
        >>> widest_spec(QuantSpec(), [2, 4, 8], [4, 8], {"fc": {"weight_bits": 2}}).overrides["fc"].weight_bits
        2
    """
    data = spec.model_dump(mode="json")
    data.update(weight_bits=max(weight_widths), act_bits=max(act_widths), first_last_bits=None,
                overrides={glob.escape(name): bits for name, bits in (overrides or {}).items()})
    return Recipe(quant=data).quant


def held_out_batches(loader: Iterable[Any], skip: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``count`` batches of ``loader`` after the first ``skip`` (those calibrate); fewer if it runs out, at least one."""
    batches = [split_batch(batch) for batch in itertools.islice(loader, skip, skip + count)]
    if not batches:  # a small training split: reuse its first batches rather than measure nothing
        batches = [split_batch(batch) for batch in itertools.islice(loader, 0, count)]
    if not batches:
        raise DataError("search sensitivity: the training loader yielded no batches; at least one is needed")
    return batches


def first_epoch(loader: Iterable[Any]) -> Iterable[Any]:
    """``loader`` set to yield its first epoch's batches (as ``distill`` calibrates), so every prepare sees the same."""
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(0)
    return loader


def _kd_loss(student: nn.Module, batches, teacher_logits, loss: KDLoss, device) -> float:
    total, samples = 0.0, 0
    with torch.no_grad():
        for (inputs, labels), logits in zip(batches, teacher_logits, strict=True):
            out = student(inputs.to(device))
            labels = labels.to(device) if labels is not None else None
            total += loss(out, logits, labels).total.item() * len(inputs)
            samples += len(inputs)
    return total / samples


def layer_sensitivity(teacher: nn.Module, float_student: nn.Module, recipe: Recipe, calibration: Iterable[Any],
                      weight_widths: list[int], act_widths: list[int], batches: int) -> dict[str, Any]:
    """report.json ``search.sensitivity``: ``{reference_kd_loss, batches, samples, seconds, layers:
    {name: {params, weight: {bits: rise}, act: {bits: rise}}}}``; ``params`` is the weight count
    (None for ops without weights), and the widest width's rise is 0 by definition.
    """
    started = time.perf_counter()
    device = next(teacher.parameters()).device
    loss = KDLoss(recipe.distill.temperature, recipe.distill.alpha)
    held_out = held_out_batches(first_epoch(calibration), recipe.quant.calibration_batches, batches)
    with torch.no_grad():
        teacher_logits = [teacher.eval()(inputs.to(device)) for inputs, _ in held_out]

    def measured(overrides: dict[str, dict[str, int]] | None = None) -> tuple[nn.Module, float]:
        spec = widest_spec(recipe.quant, weight_widths, act_widths, overrides)
        student = prepare(float_student, spec, calibration_data=first_epoch(calibration)).eval()
        return student, _kd_loss(student, held_out, teacher_logits, loss, device)

    reference, reference_loss = measured()
    layers = {}
    for name, row in layer_table(reference).items():
        module = reference.get_submodule(name)
        entry: dict[str, Any] = {"params": module.weight.numel() if is_quantized(module) else None}
        if row["weight_bits"] is not None:
            entry["weight"] = _rises(name, "weight_bits", weight_widths, measured, reference_loss)
        if row["act_bits"] is not None:
            entry["act"] = _rises(name, "act_bits", act_widths, measured, reference_loss)
        layers[name] = entry
    return {"reference_kd_loss": reference_loss, "batches": len(held_out),
            "samples": sum(len(inputs) for inputs, _ in held_out), "layers": layers,
            "seconds": round(time.perf_counter() - started, 2)}


def _rises(name: str, key: str, widths: list[int], measured, reference_loss: float) -> dict[str, float]:
    widest = max(widths)
    return {str(bits): 0.0 if bits == widest else measured({name: {key: bits}})[1] - reference_loss
            for bits in sorted(widths)}
