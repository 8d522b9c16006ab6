"""Per-layer sensitivity: how much the KD loss rises when one layer alone goes to a narrower width.

The reference is the student with every layer at the widest allowed widths, prepared and
calibrated once (``prepare``, no training). Each variant is a copy of it with one change:

- a weight width: that layer's weight quantizer is replaced by one of the narrower width whose step
  sizes are initialised from the weights, as ``prepare`` does;
- an activation width: the quantizers on that layer's or op's inputs (with every consumer that
  shares them) are replaced by narrower ones, calibrated alone on the calibration batches.

Everything else keeps the reference's calibration, so a variant changes one layer only (as in
HAWQ-style PTQ sensitivity) and costs one calibration at most. The KD loss against the teacher (the
recipe's ``distill`` temperature and alpha) is measured on held-out batches: training batches that
follow the calibration ones, so neither calibration nor the later choice (validation) nor the
report (test) sees them. Sensitivity is the variant's loss minus the reference's; the allocation
adds them up over layers.
"""

from __future__ import annotations

import copy
import glob
import itertools
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qdistill.batch import call_model, input_rows, move_inputs, split_batch
from qdistill.errors import DataError
from qdistill.kd import KDLoss
from qdistill.quant import layer_table, prepare
from qdistill.quant.modules import ActivationQuantizer, input_slots, is_quantized
from qdistill.quant.quantizer import Quantizer
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


def held_out_batches(loader: Iterable[Any], skip: int, count: int) -> list[tuple[Any, torch.Tensor | None]]:
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
            out = call_model(student, move_inputs(inputs, device))
            labels = labels.to(device) if labels is not None else None
            total += loss(out, logits, labels).total.item() * input_rows(inputs)
            samples += input_rows(inputs)
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
        teacher_logits = [call_model(teacher.eval(), move_inputs(inputs, device)) for inputs, _ in held_out]

    spec = widest_spec(recipe.quant, weight_widths, act_widths)
    reference = prepare(float_student, spec, calibration_data=first_epoch(calibration)).eval()
    calibration_inputs = [move_inputs(split_batch(batch)[0], device)
                          for batch in itertools.islice(first_epoch(calibration), spec.calibration_batches)]

    def measured(key: str, name: str, bits: int) -> float:
        variant = copy.deepcopy(reference)
        if key == "weight":
            _narrow_weight(variant, name, bits)
        else:
            _narrow_inputs(variant, name, bits, calibration_inputs)
        return _kd_loss(variant, held_out, teacher_logits, loss, device)

    reference_loss = _kd_loss(reference, held_out, teacher_logits, loss, device)
    layers = {}
    for name, row in layer_table(reference).items():
        module = reference.get_submodule(name)
        entry: dict[str, Any] = {"params": module.weight.numel() if is_quantized(module) else None}
        for key, widths in (("weight", weight_widths), ("act", act_widths)):
            if row[f"{key}_bits"] is not None:
                entry[key] = {str(bits): 0.0 if bits == max(widths) else measured(key, name, bits) - reference_loss
                              for bits in sorted(widths)}
        layers[name] = entry
    return {"reference_kd_loss": reference_loss, "batches": len(held_out),
            "samples": sum(input_rows(inputs) for inputs, _ in held_out), "layers": layers,
            "seconds": round(time.perf_counter() - started, 2)}


def _narrow_weight(student: nn.Module, name: str, bits: int) -> None:
    """Give layer ``name`` a weight quantizer of ``bits``, initialised from its weights (as ``prepare`` does)."""
    layer = student.get_submodule(name)
    old = layer.weight_quantizer
    new = Quantizer(bits, signed=True, channels=old.scale.numel() if old.axis is not None else None,
                    init=old.init_method, percentile=old.percentile, learn_scale=old.scale.requires_grad,
                    role="weight").to(layer.weight.device)
    new.init_from_weight(layer.weight)
    layer.weight_quantizer = new


def _narrow_inputs(student: nn.Module, name: str, bits: int, calibration_inputs: list[Any]) -> None:
    """Give the inputs of layer or op ``name`` quantizers of ``bits`` (shared ones replaced for every
    consumer), and calibrate only those on ``calibration_inputs``."""
    module = student.get_submodule(name)
    olds = {id(quantizer): quantizer for quantizer in (getattr(module, slot) for slot in input_slots(module) if slot)}
    news = []
    for old in olds.values():
        new = ActivationQuantizer(bits, init=old.init_method, percentile=old.percentile,
                                  learn_scale=old.scale.requires_grad,
                                  learn_input_scale=old.learn_input_scale).to(old.scale.device)
        for parent in student.modules():
            for child_name, child in list(parent.named_children()):
                if child is old:
                    setattr(parent, child_name, new)
            if parent.__dict__.get("requantizer") is old:  # quant.sharing.link_requantizers' link follows it
                parent.__dict__["requantizer"] = new
        new.observe()
        news.append(new)
    with torch.no_grad():
        for inputs in calibration_inputs:
            call_model(student, inputs)
    for quantizer in news:
        quantizer.finish_calibration()
