"""qdistill: quantization-aware training with knowledge distillation, evaluation and export.

Example:
    >>> import qdistill as qd
    >>> recipe = qd.Recipe(quant={"weight_bits": 4, "act_bits": 4})
    >>> result = qd.distill(teacher, train_loader, val_loader, recipe)
    >>> result.save("out/")
"""

__version__ = "0.1.0"

from qdistill import distill as _distill_package  # noqa: F401  (qd.distill.KDLoss stays reachable below)
from qdistill import quant
from qdistill.api import Result, load
from qdistill.api import distill as _distill_function
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


class _DistillEntry:
    """``qd.distill(...)`` runs QAT + KD; ``qd.distill.KDLoss`` / ``qd.distill.Distiller`` are the parts."""

    def __init__(self) -> None:
        from qdistill.distill import Distiller, KDLoss, LossParts, freeze, soft_kl

        self.KDLoss, self.Distiller, self.LossParts, self.freeze, self.soft_kl = KDLoss, Distiller, LossParts, freeze, soft_kl
        self.__doc__ = _distill_function.__doc__

    def __call__(self, *args, **kwargs):
        return _distill_function(*args, **kwargs)


distill = _DistillEntry()

__all__ = [
    "CheckpointError", "DataError", "ExportError", "FileFormatError", "ModelError", "NonFiniteError", "QdistillError",
    "RecipeError", "Recipe", "Result", "distill", "evaluate", "export_onnx", "load", "load_packed", "quant",
    "save_packed",
]
