"""Import a user's ``module:function`` factory, the only user code a recipe can run."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from qdistill.errors import RecipeError

FACTORIES_RUN: list[str] = []  # every factory called in this process, recorded in report.json


def load_factory(spec: str, field: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:function"``; a clear error when it is not there."""
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise RecipeError(f"{field}: {spec!r} is not a factory; expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(f"{field}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH?") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RecipeError(f"{field}: module {module_name!r} has no callable {attribute!r}")
    return function


def call_factory(spec: str, field: str, **kwargs: Any) -> Any:
    """Call the factory and record that it ran."""
    result = load_factory(spec, field)(**kwargs)
    if spec not in FACTORIES_RUN:
        FACTORIES_RUN.append(spec)
    return result
