"""Models: the name -> factory registry, the built-in architectures, and building a recipe's model.

Importing this package registers the built-ins: ``mnist_cnn``, ``mnist_cnn_small``, ``mlp``
(``convnet.py``) and ``tiny_resnet``, ``tiny_mobilenetv2``, ``tiny_transformer``, ``tiny_mlp``
(``tiny.py``).

Example:
    >>> from qdistill import models
    >>> "tiny_resnet" in models.names()
    True
"""

from qdistill.models import convnet, tiny  # noqa: F401  (registers the built-in architectures)
from qdistill.models.build import build_model
from qdistill.models.registry import create, names, register
from qdistill.models.tiny import TINY_MODELS

__all__ = ["TINY_MODELS", "build_model", "create", "names", "register"]
