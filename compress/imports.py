"""Resolving ``pkg.module:attr`` references named in recipes."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def import_callable(ref: str, what: str, error: type[Exception]) -> Callable[..., Any]:
    """Import ``pkg.module:attr``; raise ``error`` naming ``what`` when that fails."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{what} {ref!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise error(f"{what} {ref!r}: cannot import module {module_name!r} ({err})") from err
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise error(f"{what} {ref!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise error(f"{what} {ref!r} is not callable")
    return obj
