"""Deployment files of a run: what ``qdistill run`` exports after training and what ``qdistill export DIR`` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.batch import batch_inputs, cpu_inputs, input_tensors, take_rows
from qdistill.errors import RecipeError
from qdistill.export import export_all, rebuild_info
from qdistill.export.feeds import input_spec
from qdistill.export.latency import BUDGET_SECONDS
from qdistill.export.onnx import OPSET
from qdistill.io import atomic_write_json
from qdistill.recipe import ExportSpec, Recipe
from qdistill.runs.rundir import RunDir, load_recipe, load_run, read_report
from qdistill.runs.stages import RunData, prepare_data, run_kind

FORMATS = ("onnx", "packed", "all")


def export_outputs(student: nn.Module, recipe: Recipe, data: RunData, run: RunDir, spec: ExportSpec | None = None,
                   latency_budget_s: float = BUDGET_SECONDS) -> dict[str, Any]:
    """Write the deployment files ``spec`` (default: the recipe's) asks for; returns report.json's ``export`` section.

    The parity gate runs on the validation split (the export is checked, not tuned, on it); it compares
    class predictions or, for embedding outputs (``stages.run_kind``), cosines and the largest difference.
    """
    spec = spec or recipe.export
    example = take_rows(cpu_inputs(batch_inputs(next(iter(data.train)))), slice(0, 1))  # one sample, any input form
    shape = example.shape if isinstance(example, torch.Tensor) else input_tensors(example)[0].shape
    # what qdistill.runtime.load needs to rebuild model.onnx from the packed file alone
    rebuild = rebuild_info(recipe.student or recipe.model, data.model_kwargs, recipe.quant, shape, OPSET,
                           inputs=input_spec(example))
    example = example if isinstance(example, torch.Tensor) else (example,)  # a batch: a tuple of inputs is its first part
    section = export_all(student, example, data.val, onnx_path=run.onnx if spec.onnx else None,
                         packed_path=run.packed if spec.packed else None, latency_budget_s=latency_budget_s,
                         packed_rebuild=rebuild, output_kind=run_kind(recipe, student))
    return {"export": section} if section else {}


def export_directory(directory: str | Path, fmt: str = "all", latency_budget_s: float = BUDGET_SECONDS) -> dict[str, Any]:
    """Export a saved run (``qdistill run``/``Result.save``) and merge the section into its report.json.

    Example:
        >>> section = export_directory("out/mnist", "onnx")  # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise RecipeError(f"--format: {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    run = RunDir(Path(directory))
    recipe = load_recipe(directory)
    student = load_run(directory)
    spec = ExportSpec(onnx=fmt in ("onnx", "all"), packed=fmt in ("packed", "all"))
    section = export_outputs(student, recipe, prepare_data(recipe), run, spec, latency_budget_s).get("export", {})
    report = read_report(run)
    report["export"] = {**report.get("export", {}), **section}
    atomic_write_json(run.report, report)
    return section
