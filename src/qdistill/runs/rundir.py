"""The run folder: every file name a run writes, saving a trained student and loading it back.

One module owns the layout (see ARCHITECTURE.md), so the names live in one place::

    DIR/student.safetensors      fake-quant student weights (metadata: model kwargs)
    DIR/recipe.yaml              the resolved recipe
    DIR/report.json              the report (the contract other tools read)
    DIR/report.html              the human report
    DIR/teacher.safetensors      the teacher trained here
    DIR/teacher_history.json     its training history (a resumed run reports it too)
    DIR/checkpoint/              the newest training checkpoint (resume)
    DIR/model.onnx               int8 ONNX file
    DIR/student.qpack.safetensors  packed low-bit weights
    DIR/tb/                      TensorBoard event files (train.tensorboard)
    DIR/candidates/<name>/       each search candidate's own run folder
    DIR/demo.json, DIR/index.html  the demo's table and its page over the runs
    DIR/tb/                      TensorBoard scalars (train.tensorboard: true)

Example:
    >>> from pathlib import Path
    >>> RunDir(Path("out")).report
    PosixPath('out/report.json')
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from qdistill.errors import FileFormatError
from qdistill.io import (
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    load_state,
    load_weights,
    save_weights,
)
from qdistill.models import build_model
from qdistill.quant import prepare
from qdistill.recipe import Recipe
from qdistill.train.distributed import is_main

FORMAT_VERSION = 1
METADATA_KEY = "qdistill"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder (nothing is created until something is written)."""

    path: Path

    @property
    def student(self) -> Path:
        return self.path / "student.safetensors"

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def report(self) -> Path:
        return self.path / "report.json"

    @property
    def html(self) -> Path:
        return self.path / "report.html"

    @property
    def teacher(self) -> Path:
        return self.path / "teacher.safetensors"

    @property
    def teacher_history(self) -> Path:
        return self.path / "teacher_history.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def onnx(self) -> Path:
        return self.path / "model.onnx"

    @property
    def packed(self) -> Path:
        return self.path / "student.qpack.safetensors"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def demo_table(self) -> Path:
        return self.path / "demo.json"

    @property
    def index(self) -> Path:
        """The page over a folder of runs (the demo's)."""
        return self.path / "index.html"

    def candidate(self, name: str) -> RunDir:
        """The run folder of one search candidate."""
        return RunDir(self.path / "candidates" / name)


@contextlib.contextmanager
def output_dir(path: str | Path) -> Iterator[RunDir]:
    """Create ``path`` for a run; if the run fails before writing anything there, remove it again.

    A bad recipe or bad data then leaves no empty output folder behind, while a folder that held
    files before, or received some, is kept as it is.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as parent:
        ...     try:
        ...         with output_dir(Path(parent) / "run") as run:
        ...             raise ValueError("bad recipe")
        ...     except ValueError:
        ...         pass
        ...     (Path(parent) / "run").exists()
        False
    """
    path = Path(path)
    existed = path.exists()
    run = RunDir(ensure_writable_dir(path))
    try:
        yield run
    except BaseException:
        if not existed and path.is_dir() and not any(path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        raise


def save_run(run: RunDir, student: nn.Module, report: dict[str, Any], recipe: Recipe,
             model_kwargs: dict[str, Any]) -> None:
    """Write the student's weights, the recipe and report.json (each atomically; rank 0 only under torchrun)."""
    if not is_main():
        return
    metadata = {METADATA_KEY: json.dumps({"model_kwargs": model_kwargs, "format_version": FORMAT_VERSION})}
    save_weights(run.student, student.state_dict(), metadata)
    atomic_write_text(run.recipe, recipe.to_yaml())
    atomic_write_json(run.report, report)


def save_teacher(run: RunDir, teacher: nn.Module, history: list[dict[str, Any]]) -> None:
    """The teacher trained in this run, and its training history (so a resumed run reports it too; rank 0 only)."""
    if not is_main():
        return
    atomic_write_json(run.teacher_history, history)  # first: a teacher file always has its history beside it
    save_weights(run.teacher, teacher.state_dict())


def load_teacher(run: RunDir, teacher: nn.Module) -> list[dict[str, Any]] | None:
    """Load the cached teacher's weights into ``teacher``; returns its training history (None if not recorded)."""
    load_state(teacher, load_weights(run.teacher), f"cached teacher {str(run.teacher)!r}")
    if not run.teacher_history.is_file():
        return None
    try:
        return json.loads(run.teacher_history.read_text())
    except json.JSONDecodeError:
        raise FileFormatError(f"{str(run.teacher_history)!r} is not valid JSON; delete it and the teacher to retrain") from None


def _metadata(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return json.loads(metadata.get(METADATA_KEY, "{}"))
    except (OSError, ValueError, json.JSONDecodeError):
        raise FileFormatError(f"weights file {str(path)!r} is truncated or not a safetensors file") from None
    except Exception as error:  # safetensors raises its own error type for damaged headers
        raise FileFormatError(f"weights file {str(path)!r} is truncated or not a safetensors file ({error})") from None


def read_report(run: RunDir) -> dict[str, Any]:
    """report.json of a run folder ({} when there is none yet)."""
    if not run.report.is_file():
        return {}
    try:
        return json.loads(run.report.read_text())
    except json.JSONDecodeError:
        raise FileFormatError(f"report file {str(run.report)!r} is not valid JSON; fix or delete it") from None


def load_run(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a student saved by ``Result.save`` or ``qdistill run``.

    ``model`` is the float architecture; it may be left out when the saved recipe names a built-in
    model or a factory.
    """
    run = RunDir(Path(directory))
    recipe = Recipe.from_yaml(run.recipe)
    state = load_weights(run.student)
    if model is None:
        spec = recipe.student or recipe.model
        model = build_model(spec.model_copy(update={"checkpoint": None}), _metadata(run.student).get("model_kwargs", {}))
    student = prepare(model, recipe.quant)
    load_state(student, state, f"student weights {str(run.student)!r}")
    return student.eval()


def load_recipe(directory: str | Path) -> Recipe:
    """The recipe a run folder was made with."""
    return Recipe.from_yaml(RunDir(Path(directory)).recipe)


__all__ = ["RunDir", "load_recipe", "load_run", "load_teacher", "output_dir", "read_report", "save_run",
           "save_teacher"]
