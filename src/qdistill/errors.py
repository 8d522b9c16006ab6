"""Errors that qdistill raises for bad input or failed checks.

Every error names the field, the value and what is allowed, in one line, so the CLI can print it
as is (exit code 2) and a script can catch ``QdistillError`` alone.
"""


class QdistillError(Exception):
    """Base class of every error qdistill raises on purpose.

    Example:
        >>> import qdistill as qd
        >>> try:
        ...     qd.Recipe(quant={"weight_bits": 9})
        ... except qd.QdistillError as error:
        ...     print(error)
        recipe field quant.weight_bits: 9 is not allowed (Input should be less than or equal to 8)
    """


class RecipeError(QdistillError, ValueError):
    """A recipe field has a wrong type, an out-of-range value, or is unknown."""


class DataError(QdistillError, ValueError):
    """The data cannot be used: empty, non-finite, wrong shape or dtype, labels out of range."""


class ModelError(QdistillError, ValueError):
    """A model cannot be built, loaded or paired with another (e.g. output shapes differ)."""


class FileFormatError(QdistillError, ValueError):
    """A file is missing, truncated, corrupt or of an unknown format version."""


class NonFiniteError(QdistillError, RuntimeError):
    """Training produced NaN or Inf in a loss part or a quantizer scale."""


class CheckpointError(QdistillError, ValueError):
    """A checkpoint cannot be resumed (missing, incomplete, or from a different recipe)."""


class ExportError(QdistillError, RuntimeError):
    """An export failed its checks (integer kernels missing or parity gate failed)."""
