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
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

# Packages whose import registers stages. Order is the canonical pipeline order.
STAGE_PACKAGES = ("distill", "prune", "compress.finetune", "quantize", "compress.lossless", "export")


@dataclass(frozen=True)
class StageEntry:
    name: str
    config: Any  # a pydantic model class or an Annotated union of them
    apply_path: str  # "package.module:function"
    summary: str
    needs: tuple[str, ...] = ()  # data splits the stage reads: "train", "eval", "calibration"

    def resolve(self) -> Callable:
        module_name, _, attr = self.apply_path.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)


_STAGES: dict[str, StageEntry] = {}
_loaded = False


def register_stage(
    name: str, config: Any, apply: str, summary: str, needs: tuple[str, ...] = ()
) -> None:
    """Register a stage. Registering a name twice warns and keeps the newer entry."""
    if name in _STAGES and _STAGES[name].apply_path != apply:
        warnings.warn(f"stage {name!r} registered twice; {apply} replaces {_STAGES[name].apply_path}")
    _STAGES[name] = StageEntry(name, config, apply, summary, tuple(needs))


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in STAGE_PACKAGES:
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as err:
            # Only a package that does not exist at all is skipped (a stage not built yet);
            # an import error inside an existing package propagates.
            if err.name != package:
                raise
            log.debug("stage package %s not present", package)


def stages() -> dict[str, StageEntry]:
    """All registered stages, by name, in pipeline order (the order of STAGE_PACKAGES)."""
    _load()

    def order(entry: StageEntry) -> int:
        module = entry.apply_path.partition(":")[0]
        matches = [i for i, pkg in enumerate(STAGE_PACKAGES) if module == pkg or module.startswith(pkg + ".")]
        return max(matches, default=len(STAGE_PACKAGES))

    return {e.name: e for e in sorted(_STAGES.values(), key=order)}


def get_stage(name: str) -> StageEntry:
    from compress.errors import RecipeError

    available = stages()
    if name not in available:
        raise RecipeError(
            f"unknown stage {name!r}; available stages: {', '.join(available) or '(none)'}"
        )
    return available[name]
