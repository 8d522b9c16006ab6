"""qdistill: quantization-aware training with knowledge distillation, evaluation and export.

``qd.distill`` trains a low-bit student of a float teacher; the building blocks live in
subpackages (``qd.quant``, ``qd.kd``, ``qd.export``, ...). The names below are the public API.

Example:
    >>> import qdistill as qd
    >>> recipe = qd.Recipe(quant={"weight_bits": 4, "act_bits": 4})
    >>> recipe.quant.act_bits, recipe.distill.temperature
    (4, 4.0)
"""

from qdistill import kd, quant
from qdistill.api import (
    CheckpointError,
    DataError,
    ExportError,
    FileFormatError,
    ModelError,
    NonFiniteError,
    QdistillError,
    Recipe,
    RecipeError,
    Result,
    distill,
    evaluate,
    export_directory,
    export_onnx,
    load,
    load_packed,
    run_recipe,
    run_search,
    save_packed,
)
from qdistill.version import __version__

__all__ = [
    "CheckpointError", "DataError", "ExportError", "FileFormatError", "ModelError", "NonFiniteError", "QdistillError",
    "Recipe", "RecipeError", "Result", "__version__", "distill", "evaluate", "export_directory", "export_onnx", "kd",
    "load", "load_packed", "quant", "run_recipe", "run_search", "save_packed",
]
