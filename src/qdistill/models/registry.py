"""The name -> factory registry of built-in models (timm's pattern: a model is one registered function).

Example:
    >>> from torch import nn
    >>> from qdistill import models
    >>> _ = models.register("two_layer_example")(lambda **kwargs: nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    >>> models.create("two_layer_example")[1].out_features
    2
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from qdistill.errors import ModelError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model factory to the registry under ``name``."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return add


def names() -> list[str]:
    """Registered model names."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names and bad arguments are ``ModelError``s."""
    if name not in _REGISTRY:
        raise ModelError(f"model.name: {name!r} is not a built-in model; allowed: {', '.join(names())}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as error:
        raise ModelError(f"model {name!r}: bad arguments {kwargs} ({error})") from None
