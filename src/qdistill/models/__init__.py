"""Models: the name -> factory registry, the built-in architectures, and building a recipe's model.

Importing this package registers the built-ins: ``mnist_cnn``, ``mnist_cnn_small``, ``mlp``
(``convnet.py``) and ``tiny_resnet``, ``tiny_mobilenetv2``, ``tiny_transformer``, ``tiny_mlp``
(``tiny.py``). Architectures of the torchvision and timm zoos (the ``vision`` extra) are built by
``create_zoo_model`` (``zoo.py``), never with downloaded weights.

Example:
    >>> from qdistill import models
    >>> "tiny_resnet" in models.names()
    True
"""

from qdistill.models import convnet, tiny  # noqa: F401  (registers the built-in architectures)
from qdistill.models.build import build_model
from qdistill.models.registry import create, names, register
from qdistill.models.tiny import TINY_MODELS
from qdistill.models.zoo import create_zoo_model, zoo_names

__all__ = ["TINY_MODELS", "build_model", "create", "create_zoo_model", "names", "register", "zoo_names"]
