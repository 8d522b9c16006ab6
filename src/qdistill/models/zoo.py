"""Architectures from the torchvision and timm model zoos (the ``vision`` extra), never with downloaded weights.

A recipe names one with ``model: {torchvision: resnet18}`` or ``model: {timm: mobilenetv3_small_050}``;
the Python API calls ``create_zoo_model``. Both zoos are built with ``weights=None`` /
``pretrained=False``, and keyword arguments that would download weights are refused: weights come
only from a local checkpoint (``model.checkpoint``). The results are ordinary ``nn.Module``s.

The data's arguments for built-in models (``in_channels``, ``num_classes``, ``image_size``) are
translated, not passed on blindly (``zoo_kwargs``): ``num_classes`` is passed; timm takes
``in_channels`` as ``in_chans`` (it builds the stem for it), torchvision models take 3-channel images
only; ``image_size`` is not passed (a ViT needs ``kwargs: {image_size: N}`` in torchvision,
``{img_size: N}`` in timm).
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Any

from torch import nn

from qdistill.errors import ModelError

ZOOS = ("torchvision", "timm")
INSTALL = "pip install 'qdistill[vision]'"
LIST_NAMES = {"torchvision": "python -c 'import torchvision; print(torchvision.models.list_models())'",
              "timm": "python -c 'import timm; print(timm.list_models())'"}
# keyword arguments that would fetch weights from the network (None / False are harmless and allowed)
DOWNLOADING = {"torchvision": ("weights", "weights_backbone", "pretrained", "pretrained_backbone"),
               "timm": ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")}


def import_zoo(zoo: str, field: str = "model") -> ModuleType:
    """The zoo's module; one-line ``ModelError`` when it is not installed or does not import.

    Example:
        >>> import_zoo("keras")
        Traceback (most recent call last):
        ...
        qdistill.errors.ModelError: model: zoo 'keras' is not supported; allowed: torchvision, timm
    """
    if zoo not in ZOOS:
        raise ModelError(f"{field}: zoo {zoo!r} is not supported; allowed: {', '.join(ZOOS)}")
    try:
        return importlib.import_module("torchvision.models" if zoo == "torchvision" else "timm")
    except ImportError:
        raise ModelError(f"{field}.{zoo}: {zoo} is not installed; install the vision extra: {INSTALL}") from None
    except (RuntimeError, OSError) as error:  # e.g. a torchvision built for another torch: "operator torchvision::nms does not exist"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{field}.{zoo}: {zoo} is installed but does not import ({reason}); install a {zoo} built "
                         "for this torch (see docs/vision.md)") from None


def zoo_names(zoo: str) -> list[str]:
    """Every architecture name the installed zoo can build.

    Example:
        >>> import pytest; _ = pytest.importorskip("torchvision")   # needs the vision extra
        >>> "resnet18" in zoo_names("torchvision")
        True
    """
    return list(import_zoo(zoo).list_models())


def check_no_download(zoo: str, kwargs: dict[str, Any], field: str = "model") -> None:
    """Refuse keyword arguments that would download weights (``weights``, ``pretrained: true``, ...).

    Example:
        >>> check_no_download("timm", {"pretrained": False, "drop_rate": 0.1})
        >>> check_no_download("torchvision", {"weights": "IMAGENET1K_V1"})
        Traceback (most recent call last):
        ...
        qdistill.errors.ModelError: model.kwargs: weights='IMAGENET1K_V1' would download weights; qdistill never downloads: give the weights as a local file in model.checkpoint
    """
    for key in DOWNLOADING.get(zoo, ()):
        if kwargs.get(key) not in (None, False):
            raise ModelError(f"{field}.kwargs: {key}={kwargs[key]!r} would download weights; qdistill never downloads: "
                             f"give the weights as a local file in {field}.checkpoint")


def zoo_kwargs(zoo: str, name: str, data_kwargs: dict[str, Any], kwargs: dict[str, Any],
               field: str = "model") -> dict[str, Any]:
    """The zoo constructor's arguments: the data's (translated) first, the recipe's ``kwargs`` win.

    Example:
        >>> zoo_kwargs("timm", "resnet18", {"in_channels": 1, "num_classes": 10, "image_size": 28}, {"drop_rate": 0.1})
        {'num_classes': 10, 'in_chans': 1, 'drop_rate': 0.1}
        >>> zoo_kwargs("torchvision", "resnet18", {"in_channels": 3, "num_classes": 10, "image_size": 32}, {})
        {'num_classes': 10}
    """
    translated = {"num_classes": data_kwargs["num_classes"]} if data_kwargs.get("num_classes") else {}
    channels = data_kwargs.get("in_channels", 3)
    if zoo == "timm":
        translated["in_chans"] = channels
    elif channels != 3:
        raise ModelError(f"{field}.torchvision: {name} takes 3-channel images but the data has {channels}; use 3-channel "
                         "data (e.g. data.image_folder, decoded as RGB) or a timm model (it builds the stem for in_chans)")
    return {**translated, **kwargs}


def create_zoo_model(zoo: str, name: str, *, field: str = "model", **kwargs: Any) -> nn.Module:
    """Build ``name`` from the ``torchvision`` or ``timm`` zoo without pretrained weights.

    Unknown names, arguments that would download, a missing extra and bad arguments are one-line
    ``ModelError``s naming ``field``.

    Example:
        >>> import pytest, torch; _ = pytest.importorskip("torchvision")   # needs the vision extra
        >>> model = create_zoo_model("torchvision", "resnet18", num_classes=10)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    check_no_download(zoo, kwargs, field)
    module = import_zoo(zoo, field)
    _check_name(zoo, name, module, field)
    try:
        if zoo == "torchvision":
            return module.get_model(name, **{**kwargs, "weights": None})
        return module.create_model(name, **{**kwargs, "pretrained": False})
    except (TypeError, ValueError, AssertionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{field}.{zoo}: {name} cannot be built with arguments {kwargs} ({reason})") from None


def _check_name(zoo: str, name: str, module: ModuleType, field: str) -> None:
    known = list(module.list_models())
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelError(f"{field}.{zoo}: {name!r} is not a {zoo} model; {hint}every name: {LIST_NAMES[zoo]}")
