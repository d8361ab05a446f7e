"""Registry of pipeline stages.

A stage is registered under a stable name with its typed config (a pydantic model,
usually a discriminated union over ``method``) and the dotted path of its
``apply(state, config, ctx) -> state`` function. The function path is resolved only when
the stage runs, so validating a recipe or printing the schema never imports torch.

Stage packages register themselves in their (light) ``__init__`` modules; the registry
imports those packages on first use. Import errors are not swallowed: a broken stage
package is a bug and must be loud.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

# Modules whose import registers stages (a stage registers itself next to its config, so
# registering needs neither torch nor the stage's runtime). Order is the pipeline order.
STAGE_PACKAGES = ("distill", "prune", "compress.finetune", "quantize", "compress.lossless.config", "export.config")


@dataclass(frozen=True)
class StageEntry:
    name: str
    config: Any  # a pydantic model class or an Annotated union of them
    apply_path: str  # "package.module:function"
    summary: str
    needs: tuple[str, ...] = ()  # data splits the stage reads: "train", "eval", "calibration"
    order: int = 1 << 30  # position in the pipeline order (STAGE_PACKAGES), for listings

    def resolve(self) -> Callable:
        module_name, _, attr = self.apply_path.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)


_STAGES: dict[str, StageEntry] = {}
_loaded = False


def _pipeline_position(module: str) -> int:
    for i, package in enumerate(STAGE_PACKAGES):
        if module == package or module.startswith(package + "."):
            return i
    return len(STAGE_PACKAGES)


def register_stage(
    name: str, config: Any, apply: str, summary: str, needs: tuple[str, ...] = ()
) -> None:
    """Register a stage. Registering a name twice warns and keeps the newer entry."""
    if name in _STAGES and _STAGES[name].apply_path != apply:
        warnings.warn(f"stage {name!r} registered twice; {apply} replaces {_STAGES[name].apply_path}")
    caller = sys._getframe(1).f_globals.get("__name__", "")
    _STAGES[name] = StageEntry(name, config, apply, summary, tuple(needs), _pipeline_position(caller))


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in STAGE_PACKAGES:
        # A stage package that does not exist yet is skipped; an import error inside an
        # existing one propagates (a broken stage must be loud).
        if importlib.util.find_spec(package.partition(".")[0]) is None:
            log.debug("stage package %s not present", package)
            continue
        importlib.import_module(package)


def stages() -> dict[str, StageEntry]:
    """All registered stages, by name, in pipeline order (the order of STAGE_PACKAGES)."""
    _load()
    return {e.name: e for e in sorted(_STAGES.values(), key=lambda e: e.order)}


def get_stage(name: str) -> StageEntry:
    from compress.errors import RecipeError

    available = stages()
    if name not in available:
        raise RecipeError(
            f"unknown stage {name!r}; available stages: {', '.join(available) or '(none)'}"
        )
    return available[name]
