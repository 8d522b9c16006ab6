"""A float model from a recipe's model section: a built-in name, a factory, a zoo architecture or a Hugging Face
folder, with its checkpoint loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.errors import ModelError
from qdistill.factory import call_factory
from qdistill.io import load_state, load_torch_weights, load_weights
from qdistill.models.hf import load_hf
from qdistill.models.registry import create
from qdistill.models.zoo import create_zoo_model, import_zoo, zoo_kwargs
from qdistill.recipe import ModelSpec

TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # torch state-dict files, read with weights_only (never run code)


def build_model(spec: ModelSpec, model_kwargs: dict[str, Any], field_name: str = "model") -> nn.Module:
    """Build the model ``spec`` names; ``model_kwargs`` (from the data) come first, ``spec.kwargs`` win.

    Zoo models (``torchvision``, ``timm``) get the data's arguments translated (``models.zoo.zoo_kwargs``); a
    Hugging Face folder (``hf``) takes only ``num_classes`` (for ``task: sequence_classification``).

    Example:
        >>> from qdistill.recipe import ModelSpec
        >>> build_model(ModelSpec(name="mlp"), {"in_channels": 1, "num_classes": 3, "image_size": 4}).net[-1].out_features
        3
    """
    if spec.hf is not None:  # a Hugging Face folder: classes from the data, the rest from the spec
        model = load_hf(spec.hf, spec.task or "embedding", spec.pooling or "mean",
                        num_labels=model_kwargs.get("num_classes"), num_layers=spec.num_layers, field=field_name)
    elif spec.zoo is not None:
        name = getattr(spec, spec.zoo)
        import_zoo(spec.zoo, field_name)  # a missing extra first: it is what the user has to fix
        kwargs = zoo_kwargs(spec.zoo, name, model_kwargs, spec.kwargs, field_name)
        model = create_zoo_model(spec.zoo, name, field=field_name, **kwargs)
    elif spec.name is not None:
        model = create(spec.name, **{**model_kwargs, **spec.kwargs})
    else:
        model = call_factory(spec.factory, f"{field_name}.factory", **{**model_kwargs, **spec.kwargs})
        if not isinstance(model, nn.Module):
            raise ModelError(f"{field_name}.factory: {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if spec.checkpoint:
        source = f"{field_name}.checkpoint {spec.checkpoint!r}"
        load_state(model, read_checkpoint(spec.checkpoint, source), source)
    return model


def read_checkpoint(path: str, source: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file (``.pt``, ``.pth``, ``.bin``) read with ``weights_only``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save({"weight": torch.ones(2)}, f"{folder}/w.pth")
        ...     read_checkpoint(f"{folder}/w.pth")["weight"].tolist()
        [1.0, 1.0]
    """
    if Path(path).suffix.lower() not in TORCH_SUFFIXES:
        return load_weights(path)
    state = load_torch_weights(path)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelError(f"{source}: holds {type(state).__name__} of more than tensors; expected a state dict "
                         "(name -> tensor), e.g. torch.save(model.state_dict(), path)")
    return state
