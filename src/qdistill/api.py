"""The public surface: the calls a user makes first, re-exported from the modules that own them.

Example:
    >>> import qdistill as qd
    >>> qd.Recipe(quant={"weight_bits": 4, "act_bits": 4}).quant.weight_bits
    4
"""

from qdistill.errors import (
    CheckpointError,
    DataError,
    ExportError,
    FileFormatError,
    ModelError,
    NonFiniteError,
    QdistillError,
    RecipeError,
)
from qdistill.evaluate import evaluate
from qdistill.export import export_onnx, load_packed, save_packed
from qdistill.recipe import Recipe
from qdistill.runs import Result, distill, export_directory, run_recipe, run_search
from qdistill.runs.rundir import load_run as load
from qdistill.runtime import load as load_runtime

__all__ = [
    "CheckpointError", "DataError", "ExportError", "FileFormatError", "ModelError", "NonFiniteError", "QdistillError",
    "Recipe", "RecipeError", "Result", "distill", "evaluate", "export_directory", "export_onnx", "load", "load_packed", "load_runtime",
    "run_recipe", "run_search", "save_packed",
]
