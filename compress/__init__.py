"""compress: model compression and edge-deployment pipeline.

The Python API (what the CLI calls)::

    import compress

    result = compress.run("recipe.yaml", "model.pt", out_dir="runs/x")
    result.passed, result.report["stages"][-1]

    recipe = compress.load_recipe("recipe.yaml")      # typed, validated
    compress.register_stage(...) / compress.register_method(...)   # extend the pipeline

Kept import-light on purpose: ``compress --help`` must not import torch, so the names
below are resolved on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from compress.pipeline import RunResult
    from compress.recipe import Recipe

# public name -> module that defines it (imported on first access)
_LAZY = {
    "load_recipe": "compress.recipe",
    "parse_recipe": "compress.recipe",
    "Recipe": "compress.recipe",
    "RunResult": "compress.pipeline",
    "ModelState": "compress.state",
    "StageContext": "compress.state",
    "UniformTensor": "compress.qtensor",
    "CodebookTensor": "compress.qtensor",
    "register_stage": "compress.registry",
    "register_method": "compress.registry",
    "stages": "compress.registry",
    "methods": "compress.registry",
    "CompressError": "compress.errors",
}

__all__ = ["__version__", "run", *_LAZY]


def run(
    recipe: str | Path | Recipe,
    model: str | Path,
    out_dir: str | Path | None = None,
    **options: Any,
) -> RunResult:
    """Run a recipe on a model file, as ``compress run`` does (without printing).

    Args:
        recipe: a recipe file or an already parsed ``Recipe``.
        model: the model file (state_dict + the recipe's factory, or TorchScript).
        out_dir: output folder; default the recipe's ``output.dir`` or ``runs/<name>``.
        **options: passed to ``compress.pipeline.run`` (``force``, ``trust_model``, ...).

    Returns:
        ``RunResult``: ``passed``, ``failures`` and the ``report`` written to report.json.

    Raises:
        compress.CompressError: bad input (``InputError``/``RecipeError``) or a failed stage.
    """
    from compress.pipeline import run as run_pipeline
    from compress.recipe import Recipe as _Recipe
    from compress.recipe import load_recipe

    parsed = recipe if isinstance(recipe, _Recipe) else load_recipe(recipe)
    out = Path(out_dir) if out_dir is not None else Path(parsed.doc.output.dir or f"runs/{parsed.name}")
    return run_pipeline(parsed, Path(model), out, **options)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
