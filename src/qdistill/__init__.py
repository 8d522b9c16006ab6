"""qdistill: quantization-aware training with knowledge distillation, evaluation and export.

``qd.distill`` trains a low-bit student of a float teacher; the building blocks live in
subpackages (``qd.quant``, ``qd.kd``, ``qd.export``, ...). The names below are the public API.

Example:
    >>> import qdistill as qd
    >>> recipe = qd.Recipe(quant={"weight_bits": 4, "act_bits": 4})
    >>> recipe.quant.act_bits, recipe.distill.temperature
    (4, 4.0)
"""

from qdistill import api, kd, quant, runtime
from qdistill.api import *  # noqa: F403  (the public names; api.py is their one list)
from qdistill.version import __version__

__all__ = [*api.__all__, "__version__", "kd", "quant", "runtime"]
