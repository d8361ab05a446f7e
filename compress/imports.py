"""Resolving ``pkg.module:attr`` references named in recipes, with a guard.

A recipe names code to call (``model.factory``, ``data.*.fn``). Anything importable could
be named, including ``os:system`` or ``builtins:eval``, so a reference that resolves into
the standard library or the interpreter's builtins is refused unless the recipe lists it
under ``trusted_callables``. A few third-party callables that load pickles or fetch and
run remote code are refused the same way. This is a guard against a recipe quietly
running a shell, not a sandbox: the factory and tokenizer modules a recipe names run with
the user's rights, so review a recipe from an untrusted source (``compress check`` lists
every import it will make) as you would review code.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

# Third-party callables that unpickle data or fetch and run remote code.
DENIED_THIRD_PARTY = {
    "torch.hub",
    "torch.load",
    "torch.jit.load",
    "torch.serialization",
    "torch.package",
    "numpy.load",
    "numpy.lib.npyio",
    "pandas.read_pickle",
    "joblib",
    "dill",
    "cloudpickle",
}


def split_ref(ref: str) -> tuple[str, str]:
    """``("pkg.module", "attr")`` of ``pkg.module:attr``; ValueError when malformed."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr or not attr.isidentifier():
        raise ValueError(f"{ref!r} must look like 'package.module:function'")
    return module_name, attr


def _is_stdlib(module_name: str) -> bool:
    top = module_name.split(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__"


def _denied_third_party(dotted: str) -> bool:
    return any(dotted == d or dotted.startswith(d + ".") for d in DENIED_THIRD_PARTY)


def refusal(ref: str, trusted: frozenset[str] | set[str] = frozenset()) -> str | None:
    """Why ``ref`` may not be imported (judged from its name alone), or None when it may."""
    if ref in trusted:
        return None
    module_name, attr = split_ref(ref)
    if _is_stdlib(module_name):
        return (
            f"{ref!r} is in Python's standard library or builtins; a recipe may call those only when it "
            f"lists them under trusted_callables"
        )
    if _denied_third_party(module_name) or _denied_third_party(f"{module_name}.{attr}"):
        return (
            f"{ref!r} loads pickles or remote code; a recipe may call it only when it lists it under trusted_callables"
        )
    return None


def import_callable(
    ref: str, what: str, error: type[Exception], trusted: frozenset[str] | set[str] = frozenset()
) -> Callable[..., Any]:
    """Import ``pkg.module:attr``; raise ``error`` naming ``what`` when that fails or is refused.

    The object's own ``__module__`` is checked too, so a third-party module that re-exports
    ``os.system`` does not open the door.
    """
    try:
        module_name, attr = split_ref(ref)
        why = refusal(ref, trusted)
    except ValueError as err:
        raise error(f"{what} {err}") from None
    if why:
        raise error(f"{what} refused: {why}")
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
    origin = getattr(obj, "__module__", None) or ""
    if ref not in trusted and origin and (_is_stdlib(origin) or _denied_third_party(f"{origin}.{attr}")):
        raise error(
            f"{what} refused: {ref!r} is {origin}.{getattr(obj, '__name__', attr)}, from the standard library, "
            "builtins or a pickle loader; list it under trusted_callables if the recipe really means it"
        )
    return obj
