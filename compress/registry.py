"""Registry of pipeline stages and of the methods inside them.

A stage is registered under a stable name with the dotted path of its
``apply(state, config, ctx) -> state`` function and either a typed config (a pydantic
model) or, for a stage with several methods, nothing: its config is then the union of the
configs registered for it with ``register_method``, discriminated on ``method``. Adding a
method is one config class, one function and one ``register_method`` line; the recipe
parser, ``compress schema`` and ``compress check`` see it at once.

Function paths are resolved only when a stage or method runs, so validating a recipe or
printing the schema never imports torch.

Stage packages are discovered through the ``compress.stages`` entry-point group (each
entry names a light module whose import registers the stage and its methods), so a
third-party package adds a stage the same way the built-in ones do. Import errors are not
swallowed: a broken stage package is a bug and must be loud.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args

if TYPE_CHECKING:
    from pydantic import BaseModel

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "compress.stages"


def _resolve(path: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(path):
        return path
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    fn: Callable[..., Any] = getattr(module, attr)
    return fn


@dataclass(frozen=True)
class MethodEntry:
    """One method of a stage: its tag (the config's ``method`` value), config and function."""

    stage: str
    name: str
    config: type[BaseModel]
    apply_path: str | Callable[..., Any]  # "package.module:function" (resolved lazily) or the function

    def resolve(self) -> Callable[..., Any]:
        return _resolve(self.apply_path)


@dataclass(frozen=True)
class StageEntry:
    name: str
    apply_path: str  # "package.module:function"
    summary: str
    needs: tuple[str, ...] = ()  # data splits the stage reads: "train", "eval", "calibration"
    order: int = 1000  # position in listings and the schema (pipeline order)
    fixed_config: Any = None  # a pydantic model class, for stages without methods
    # What the runner can know before running anything (``compress check`` and the plan):
    provides: tuple[str, ...] = ()  # measurements it publishes for gates, e.g. "latency"
    describes_model: bool = False  # it writes artifacts of the current model (ONNX, packed weights)
    changes_model: bool = True  # it may change the model (False: reads it only)

    @property
    def config(self) -> Any:
        """The stage's config type: its own model, or the union of its methods' configs."""
        if self.fixed_config is not None:
            return self.fixed_config
        configs = tuple(m.config for m in methods(self.name).values())
        if not configs:
            raise LookupError(f"stage {self.name!r} has neither a config nor registered methods")
        if len(configs) == 1:
            return configs[0]
        from pydantic import Field

        return Annotated[Union[configs], Field(discriminator="method")]  # noqa: UP007 (a union built at run time)

    def resolve(self) -> Callable[..., Any]:
        return _resolve(self.apply_path)


_STAGES: dict[str, StageEntry] = {}
_METHODS: dict[str, dict[str, MethodEntry]] = {}
_loaded = False


def register_stage(
    name: str,
    config: Any = None,
    *,
    apply: str,
    summary: str,
    needs: tuple[str, ...] = (),
    order: int = 1000,
    provides: tuple[str, ...] = (),
    describes_model: bool = False,
    changes_model: bool = True,
) -> None:
    """Register a stage. ``config`` None: the stage's config is the union of its methods'.

    Args:
        needs: data splits the stage reads ("train", "eval", "calibration").
        provides: measurements it publishes for the gates ("latency": ``max_latency_ms``).
        describes_model: it writes artifacts of the model as it stands (an ONNX file, packed
            weights): a later stage that changes the model would leave them stale.
        changes_model: False when the stage only reads the model.

    The runner refuses a recipe that gates on a measurement no stage provides, or where a
    model-changing stage follows an artifact writer that never runs again, before any stage
    runs. Registering a name twice warns and keeps the newer entry.
    """
    if name in _STAGES and _STAGES[name].apply_path != apply:
        warnings.warn(f"stage {name!r} registered twice; {apply} replaces {_STAGES[name].apply_path}", stacklevel=2)
    _STAGES[name] = StageEntry(
        name, apply, summary, tuple(needs), order, config, tuple(provides), describes_model, changes_model
    )


def register_method(stage: str, config: type[BaseModel], *, apply: str | Callable[..., Any]) -> None:
    """Register ``config`` (a pydantic model with a ``method: Literal[...]`` field) as a method
    of ``stage``, run by the function at ``apply`` ("package.module:function").

    The function's signature is the stage's business (each stage documents what its
    methods receive and return).
    """
    field = getattr(config, "model_fields", {}).get("method")
    tags = get_args(field.annotation) if field is not None else ()
    tag = tags[0] if len(tags) == 1 else None
    if not isinstance(tag, str):
        raise TypeError(f"{config.__name__} needs a field 'method: Literal[\"name\"]' to register as a method")
    table = _METHODS.setdefault(stage, {})
    if tag in table and table[tag].apply_path != apply:
        warnings.warn(
            f"{stage} method {tag!r} registered twice; {apply} replaces {table[tag].apply_path}", stacklevel=2
        )
    table[tag] = MethodEntry(stage, tag, config, apply)


def unregister_method(stage: str, name: str) -> None:
    """Remove a method (for tests and plugins that add one temporarily)."""
    _METHODS.get(stage, {}).pop(name, None)


def _entry_point_modules() -> list[str]:
    from importlib.metadata import entry_points

    seen: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault(ep.name, ep.value)
    return list(seen.values())


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    modules = _entry_point_modules()
    if not modules:
        log.warning(
            "no stages found: the entry-point group %r is empty (is the package installed? pip install -e .)",
            ENTRY_POINT_GROUP,
        )
    for module in modules:
        # An import error inside a stage package propagates: a broken stage must be loud.
        importlib.import_module(module)


def stages() -> dict[str, StageEntry]:
    """All registered stages, by name, in pipeline order."""
    _load()
    return {e.name: e for e in sorted(_STAGES.values(), key=lambda e: (e.order, e.name))}


def methods(stage: str) -> dict[str, MethodEntry]:
    """The methods registered for ``stage``, by tag, in registration order."""
    _load()
    return dict(_METHODS.get(stage, {}))


def stage_config(name: str) -> Any:
    """The config type of stage ``name`` (for ``pydantic.TypeAdapter``)."""
    return get_stage(name).config


def get_stage(name: str) -> StageEntry:
    from compress.errors import RecipeError

    available = stages()
    if name not in available:
        raise RecipeError(f"unknown stage {name!r}; available stages: {', '.join(available) or '(none)'}")
    return available[name]


def method_for(stage: str, config: Any) -> Callable[..., Any]:
    """The function registered for ``config``'s method in ``stage``.

    Raises:
        ValueError: no such method (the message lists the registered ones).
    """
    tag = getattr(config, "method", None)
    table = methods(stage)
    entry = table.get(tag) if isinstance(tag, str) else None
    if entry is None or not isinstance(config, entry.config):
        raise ValueError(f"unknown {stage} method {tag!r}; registered: {', '.join(table) or '(none)'}")
    return entry.resolve()
