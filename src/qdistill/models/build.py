"""A float model from a recipe's model section: a built-in name or a factory, with its checkpoint loaded."""

from __future__ import annotations

from typing import Any

from torch import nn

from qdistill.errors import ModelError
from qdistill.factory import call_factory
from qdistill.io import load_state, load_weights
from qdistill.models.registry import create
from qdistill.recipe import ModelSpec


def build_model(spec: ModelSpec, model_kwargs: dict[str, Any], field_name: str = "model") -> nn.Module:
    """Build the model ``spec`` names; ``model_kwargs`` (from the data) come first, ``spec.kwargs`` win.

    Example:
        >>> from qdistill.recipe import ModelSpec
        >>> build_model(ModelSpec(name="mlp"), {"in_channels": 1, "num_classes": 3, "image_size": 4}).net[-1].out_features
        3
    """
    kwargs = {**model_kwargs, **spec.kwargs}
    if spec.name is not None:
        model = create(spec.name, **kwargs)
    else:
        model = call_factory(spec.factory, f"{field_name}.factory", **kwargs)
        if not isinstance(model, nn.Module):
            raise ModelError(f"{field_name}.factory: {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if spec.checkpoint:
        load_state(model, load_weights(spec.checkpoint), f"{field_name}.checkpoint {spec.checkpoint!r}")
    return model
