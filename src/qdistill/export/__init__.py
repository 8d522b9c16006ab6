"""Deployment: int8 ONNX export with a parity gate, packed low-bit files, latency.

``export_all`` writes what a recipe's ``export`` section asks for and returns report.json's
``export`` section (``qdistill.runs.deploy`` calls it for a run folder).

Example (a tiny prepared MLP, one hidden layer; a short ``latency_budget_s`` keeps it quick):
    >>> import tempfile, torch
    >>> from qdistill import models, quant
    >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4, hidden=(16,)),
    ...                         {"weight_bits": 8, "act_bits": 8}, calibration_data=[torch.rand(8, 1, 4, 4)])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     section = export_all(student, torch.rand(1, 1, 4, 4), [torch.rand(16, 1, 4, 4)], onnx_path=f"{folder}/model.onnx",
    ...                          packed_path=f"{folder}/student.qpack.safetensors", latency_budget_s=0.01)
    >>> sorted(section), section["onnx"]["parity_checked"], section["onnx"]["integer_ops"]
    (['onnx', 'packed'], True, {'net.1': 'QGemm', 'net.4': 'QGemm'})
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from qdistill.export.latency import BATCHES, BUDGET_SECONDS, first_samples, measure_latency
from qdistill.export.onnx import (
    check_integer_kernels,
    diagnose_layers,
    export_float_onnx,
    export_onnx,
    integer_kernels,
    verify_onnx,
    wide_weight_layers,
)
from qdistill.export.packed import (
    fp32_safetensors_bytes,
    load_packed,
    pack_bits,
    read_packed,
    rebuild_info,
    save_packed,
    unpack_bits,
    unpack_student,
)
from qdistill.quant.modules import is_quantized
from qdistill.quant.quantizer import Quantizer


def float_copy(student: nn.Module) -> nn.Module:
    """The student in float: quantized layers swapped for float layers (``to_float``), and every
    other quantizer (on adds, pools, ...) switched to pass-through.

    Example:
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 4})
        >>> type(student.net[1]).__name__, type(float_copy(student).net[1]).__name__   # same architecture, float layers
        ('QuantLinear', 'Linear')
    """
    model = copy.deepcopy(student).cpu().eval()
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            model.set_submodule(name, module.to_float())
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.initialized.fill_(False)  # an uninitialised quantizer passes its input through
    return model


PARITY_KEYS = ("accuracy", "agreement_with_student", "max_abs_logit_diff", "flips", "near_tie_flips", "near_tie_margin",
               "logit_sqnr_db", "logit_sqnr_db_all", "logit_sqnr_left_out_samples", "logit_sqnr_gate_db",
               "accuracy_near_ties_excused", "mean_cosine", "min_cosine", "max_abs_diff", "mean_cosine_gate",
               "min_cosine_gate")


def _json_number(value: Any) -> Any:
    """report.json holds no Infinity: an SQNR of equal logits (infinite) is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _onnx_section(student: nn.Module, path: Path, example: Any, val_loader: Iterable[Any] | None,
                  float_model: nn.Module, budget_s: float, output_kind: str = "logits") -> dict[str, Any]:
    info = export_onnx(student, path, example, verify_on=val_loader, output_kind=output_kind)
    # latency on real batches: validation inputs (else the example inputs), cycled only if too few
    samples = first_samples(val_loader if val_loader is not None else [example], max(BATCHES))
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_float_onnx(float_model, Path(folder) / "fp32.onnx", example)
        latency = measure_latency({"int8": info["path"], "fp32": fp32["path"]}, float_model, samples, budget_s=budget_s)
    section = {key: info[key] for key in ("path", "file_bytes") if key in info}
    section["parity_checked"] = info["parity_checked"]
    for key in PARITY_KEYS:
        if key in info:
            section[key] = _json_number(info[key])
    all_threads = latency["all"]
    section["latency_us_per_sample"] = all_threads["int8"]
    section["fp32_latency_us_per_sample"] = all_threads["fp32"]
    section["torch_fp32_latency_us_per_sample"] = all_threads["torch_fp32"]
    section["latency_threads"] = {"1": latency["1"], "all": latency["all"], "all_threads": latency["all_threads"]}
    section["latency_method"] = latency["method"]
    section["fp32_file_bytes"] = fp32["file_bytes"]
    section["output_kind"] = output_kind
    for key in ("student_accuracy", "samples", "integer_ops", "integer_ops_other", "dropped_layers", "wide_weight_layers",
                "opset"):
        if key in info:
            section[key] = info[key]
    return section


def export_all(student: nn.Module, example_input: Any, val_loader: Iterable[Any] | None, *,
               onnx_path: str | Path | None = None, packed_path: str | Path | None = None,
               float_model: nn.Module | None = None, latency_budget_s: float = BUDGET_SECONDS,
               packed_rebuild: dict[str, Any] | None = None, output_kind: str = "logits") -> dict[str, Any]:
    """Write the int8 ONNX file and/or the packed file at the paths given; returns report.json's ``export`` section.

    The caller names the files (a run folder's names belong to ``qdistill.runs.rundir``); a path
    left None is not written, and its key is absent (``{}`` when neither is given).
    ``float_model`` is the fp32 baseline for latency and file size (default: the student's own
    float copy, same architecture). With ``val_loader`` None the ONNX file is written without the
    parity gate and its section says ``parity_checked: false``. ``packed_rebuild``
    (``export.packed.rebuild_info``) goes into the packed file's header, so that
    ``qdistill.runtime.load`` can rebuild the int8 graph from it. ``output_kind`` ("logits" or
    "embedding") picks the parity gate (``export_onnx``) and is recorded in the section.

    Example:
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 4})
        >>> export_all(student, None, None)       # no path given: nothing written
        {}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     sorted(export_all(student, None, None, packed_path=f"{folder}/student.qpack.safetensors")["packed"])
        ['file_bytes', 'fp32_file_bytes', 'path']
    """
    baseline = float_model if float_model is not None else float_copy(student)
    section: dict[str, Any] = {}
    if onnx_path is not None:
        section["onnx"] = _onnx_section(student, Path(onnx_path), example_input, val_loader, baseline, latency_budget_s,
                                        output_kind)
    if packed_path is not None:
        packed = save_packed(student, packed_path, packed_rebuild)
        section["packed"] = {**packed, "fp32_file_bytes": fp32_safetensors_bytes(baseline)}
    return section


def _latency_cells(table: dict[str, dict[str, float]]) -> str:
    labels = {"int8": "int8", "fp32": "fp32", "torch_fp32": "torch"}
    return "  ".join(f"{labels[name]} {table[name]['batch1']:.1f}/{table[name]['batch64']:.1f}"
                     for name in labels if name in table)


def _onnx_lines(onnx_section: dict[str, Any]) -> list[str]:
    # short lines: the CLI's console wraps at 80 columns when not on a terminal
    size = f"  size      {onnx_section['file_bytes']:,} bytes"
    if "fp32_file_bytes" in onnx_section:
        size += f" (fp32 ONNX {onnx_section['fp32_file_bytes']:,})"
    lines = [f"ONNX int8   {onnx_section['path']}", size]
    if onnx_section.get("parity_checked") is False:
        lines.append("  parity    not checked (no validation data)")
    elif "mean_cosine" in onnx_section:  # output_kind "embedding"
        lines.append(f"  parity    cosine mean {onnx_section['mean_cosine']:.5f}, min {onnx_section['min_cosine']:.5f} "
                     f"(bounds {onnx_section['mean_cosine_gate']:g}/{onnx_section['min_cosine_gate']:g})")
        lines.append(f"  embedding max |diff| {onnx_section['max_abs_diff']:.3g}")
    elif "agreement_with_student" in onnx_section:
        accuracy = onnx_section.get("accuracy")
        near_ties = onnx_section.get("near_tie_flips", 0)
        lines.append("  parity    " + (f"accuracy {accuracy:.2%}, " if accuracy is not None else "")
                     + f"agreement {onnx_section['agreement_with_student']:.2%}"
                     + (f" ({near_ties} near-tie flips)" if near_ties else ""))
        logits = f"max |diff| {onnx_section['max_abs_logit_diff']:.3g}"
        if "logit_sqnr_db" in onnx_section:
            sqnr = onnx_section["logit_sqnr_db"]  # None: equal logits (infinite SQNR)
            logits = (f"SQNR {'inf' if sqnr is None else f'{sqnr:.1f}'} dB "
                      f"(bound {onnx_section['logit_sqnr_gate_db']:g} dB), {logits}")
        lines.append(f"  logits    {logits}")
    for label, key in (("layers", "integer_ops"), ("other ops", "integer_ops_other")):
        kernels = onnx_section.get(key, {})
        if kernels:
            counts = {op: list(kernels.values()).count(op) for op in dict.fromkeys(kernels.values())}
            lines.append(f"  kernels   {len(kernels)} {label}: " + ", ".join(f"{n} {op}" for op, n in counts.items()))
    wide = onnx_section.get("wide_weight_layers")
    if wide:  # export.onnx.wide_weight_layers: fast on CPUs with VNNI, on exact slower kernels without it
        lines.append(f"  note      {len(wide)} layers have 8-bit weights beyond [-64, 63]: on x86 without")
        lines.append("            VNNI they run on slower exact kernels (weight_bits 7 keeps them fast)")
    threads = onnx_section.get("latency_threads", {})
    if threads:
        lines.append("  µs/sample at batch 1/64 (ONNX Runtime int8, fp32; PyTorch eager fp32):")
    for key, label in (("1", "1 thread"), ("all", f"{threads.get('all_threads', 'all')} threads")):
        if threads.get(key):
            lines.append(f"    {label:<10} {_latency_cells(threads[key])}")
    return lines


def format_export_summary(section: dict[str, Any]) -> str:
    """Human-readable lines for report.json's ``export`` section (sizes, parity, latencies).

    Example (the sizes depend on the model, so they are elided here):
        >>> from qdistill import models, quant
        >>> student = quant.prepare(models.create("mlp", in_channels=1, num_classes=3, image_size=4), {"weight_bits": 4, "act_bits": 4})
        >>> with tempfile.TemporaryDirectory() as folder:  # doctest: +ELLIPSIS
        ...     print(format_export_summary(export_all(student, None, None, packed_path=f"{folder}/student.qpack.safetensors")))
        packed      .../student.qpack.safetensors
          size      ... bytes (...x smaller than fp32 safetensors ...)
        >>> format_export_summary({})
        'nothing exported (export.onnx and export.packed are both false)'
    """
    lines: list[str] = []
    if "onnx" in section:
        lines += _onnx_lines(section["onnx"])
    if "packed" in section:
        packed = section["packed"]
        ratio = packed["fp32_file_bytes"] / packed["file_bytes"] if packed.get("file_bytes") else float("nan")
        lines += [f"packed      {packed['path']}",
                  f"  size      {packed['file_bytes']:,} bytes ({ratio:.1f}x smaller than fp32 safetensors "
                  f"{packed['fp32_file_bytes']:,})"]
    return "\n".join(lines) if lines else "nothing exported (export.onnx and export.packed are both false)"


__all__ = [
    "check_integer_kernels", "diagnose_layers", "export_all",
    "export_float_onnx", "export_onnx", "float_copy", "format_export_summary", "integer_kernels", "load_packed",
    "pack_bits", "read_packed", "rebuild_info",
    "save_packed", "unpack_bits", "unpack_student", "verify_onnx", "wide_weight_layers",
]
