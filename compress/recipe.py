"""Recipes: versioned YAML parsed in one place into typed objects.

Every error names the file, the line, the key path, the bad value and what is allowed
(with a close match suggested for a misspelt key). Stage configs come from the stage
registry, so adding a stage adds its keys here and to the JSON Schema without touching
this file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from compress.errors import RecipeError
from compress.imports import refusal
from compress.registry import get_stage, stages
from compress.tune.config import SearchSpec

# Limits applied to the YAML text before anything is built from it, so a hostile recipe
# (an alias bomb, a deeply nested or huge document) is refused in bounded time and memory.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_EVENTS = 100_000
MAX_NODES = 100_000  # after alias expansion
MAX_SEED = 2**32 - 1
MAX_INPUT_ELEMENTS = 1 << 24


class _Strict(BaseModel):
    # Non-finite numbers are never a sensible setting: refuse inf/nan in every core model.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """YAML ``true`` is not the number 1 (pydantic's lax mode would accept it)."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                types = set(get_args(field.annotation)) | {field.annotation}
                if isinstance(value, bool) and bool not in types and types & {int, float}:
                    raise ValueError(f"{name}: expected a number, got the boolean {value!r}")
                if name == "version" and isinstance(value, bool):
                    raise ValueError(f"version: expected 1, got the boolean {value!r}")
        return data


class ModelSpec(_Strict):
    """How to build and load the model passed on the command line."""

    input_shape: list[int] = Field(
        ..., min_length=1, description="Example input shape, batch dimension first, e.g. [1, 40]."
    )
    factory: str | None = Field(
        None,
        description="'package.module:function' that builds the architecture; needed when the model file is a state_dict.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    input_dtype: Literal["float32", "int64"] = Field(
        "float32", description="Element type of the model input (int64 for token ids)."
    )

    @model_validator(mode="after")
    def _positive(self) -> ModelSpec:
        if any(d <= 0 for d in self.input_shape):
            raise ValueError(f"input_shape dimensions must be positive, got {self.input_shape}")
        # The runner builds one example input of this shape when the recipe has no data:
        # bound it so a typo cannot ask for a 160 GB tensor.
        if math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"input_shape {self.input_shape} has {math.prod(self.input_shape):,} elements; "
                f"at most {MAX_INPUT_ELEMENTS:,} (one example batch, batch dimension first)"
            )
        return self


class DataSplitSpec(_Strict):
    """One data split: where it comes from and how to batch it."""

    source: Literal["mnist1d", "digits", "file", "callable", "text"] = Field(
        ...,
        description="'mnist1d' (generated locally), 'digits' (scikit-learn), 'file' (.npz/.pt with x and optional y), "
        "'callable', or 'text' (a UTF-8 file of one text per line, turned into x by the tokenizer 'fn').",
    )
    split: Literal["train", "test"] = Field("train", description="Which part of a built-in or callable source.")
    path: str | None = Field(
        None, description="Data file for source 'file', text file for source 'text' (relative to the recipe)."
    )
    fn: str | None = Field(
        None,
        description="'package.module:function': for source 'callable' called as fn(split, **kwargs); for source "
        "'text' the tokenizer, called as fn(lines, **kwargs) and returning x (one row per line).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for fn (e.g. {max_length: 64} for a tokenizer)."
    )
    samples: int | None = Field(None, ge=1, description="Use a seeded random subset of this many samples.")
    batch_size: int = Field(256, ge=1, description="Batch size for evaluation and calibration.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for the subset and for shuffling.")

    @model_validator(mode="after")
    def _source_fields(self) -> DataSplitSpec:
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs 'path'")
        if self.source == "callable" and not self.fn:
            raise ValueError("source 'callable' needs 'fn'")
        if self.source == "text" and not (self.path and self.fn):
            raise ValueError("source 'text' needs 'path' (one text per line) and 'fn' (the tokenizer)")
        return self


class DataSpec(_Strict):
    """Named splits. Stages declare which they need; evaluation uses 'eval'."""

    train: DataSplitSpec | None = Field(None, description="Training data (distillation, fine-tuning).")
    eval: DataSplitSpec | None = Field(None, description="Held-out data every stage is measured on.")
    calibration: DataSplitSpec | None = Field(
        None, description="Calibration data for post-training methods (defaults to 'train')."
    )
    eval_extra: dict[str, DataSplitSpec] = Field(
        default_factory=dict,
        description="More held-out sets, by name (e.g. text of another style than the calibration data): every "
        "stage is measured on each too, and every accuracy/fidelity gate must hold on eval and on each of them "
        "(its check is named gate[name]).",
    )

    @field_validator("eval_extra")
    @classmethod
    def _extra_names(cls, v: dict[str, DataSplitSpec]) -> dict[str, DataSplitSpec]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
                raise ValueError(f"eval_extra set name {name!r}: use 1-40 letters, digits, '_' or '-'")
        return v

    def splits(self) -> list[tuple[str, DataSplitSpec]]:
        """Every split given, by the name the data bundle knows it under (``eval:<name>`` for
        the extra held-out sets)."""
        named = [(n, getattr(self, n)) for n in ("train", "eval", "calibration") if getattr(self, n) is not None]
        return named + [(f"{EXTRA_PREFIX}{n}", s) for n, s in self.eval_extra.items()]


EXTRA_PREFIX = "eval:"  # data bundle name of an eval_extra set


class Gates(_Strict):
    """Limits the final model must meet; a failed gate makes the run exit with code 1."""

    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Largest allowed drop in eval accuracy from the input model (fraction, 0.01 = 1 point).",
    )
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Smallest allowed eval accuracy (fraction).")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="Smallest allowed top-1 agreement with the input model's outputs on eval."
    )
    min_cosine: float | None = Field(
        None, ge=-1, le=1, description="Smallest allowed mean cosine similarity to the input model's outputs on eval."
    )
    min_cosine_p05: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Smallest allowed 5th-percentile per-sample cosine similarity to the input model's outputs on "
        "eval (the worst 5% of samples, which a mean hides).",
    )
    max_size_bytes: int | None = Field(
        None,
        ge=1,
        description="Largest allowed size of the final artifact (ONNX file, else packed weights, else state).",
    )
    max_latency_ms: float | None = Field(
        None, gt=0, description="Largest allowed p50 onnxruntime latency of one sample (needs an export stage)."
    )
    min_quantized_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Smallest allowed share of the final model's parameters held as quantized integers "
        "(fraction; the quantize stage's coverage line lists what stayed float).",
    )


class OutputSpec(_Strict):
    """Where the run's artifacts go."""

    dir: str | None = Field(
        None,
        description="Output folder (relative to the working directory); default runs/<recipe name>. '-o' overrides.",
    )


class RecipeDoc(_Strict):
    """A compression recipe: the model, the data, the ordered stages and the gates."""

    version: Literal[1] = Field(..., description="Recipe format version.")
    name: str | None = Field(None, description="Name of the run (default: the recipe file's stem).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Global seed for every stage.")
    trusted_callables: list[str] = Field(
        default_factory=list,
        description="'module:function' references (model.factory, data.*.fn) that may resolve into Python's standard "
        "library or builtins, or to a pickle loader. Empty by default: such references are refused.",
    )
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[dict[str, Any]] = Field(
        default_factory=list, description="Ordered stages, each a one-key mapping {stage_name: config}."
    )
    gates: Gates = Field(default_factory=Gates)
    output: OutputSpec = Field(default_factory=OutputSpec)
    search: SearchSpec | None = Field(
        None, description="Goal-driven search used by `compress tune` (ignored by `compress run`)."
    )


class StageSpec(BaseModel):
    """One validated stage of a recipe."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    config: Any
    index: int

    def config_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json") if isinstance(self.config, BaseModel) else dict(self.config or {})

    def config_hash(self) -> str:
        blob = json.dumps({"stage": self.name, "config": self.config_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Recipe(BaseModel):
    """A parsed, validated recipe."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    doc: RecipeDoc
    stages: list[StageSpec]
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.doc.name or (self.path.stem if self.path else "recipe")

    def imports(self) -> list[tuple[tuple, str]]:
        """Every ``module:function`` the run will import and call, with its recipe key path."""
        refs: list[tuple[tuple, str]] = []
        if self.doc.model.factory:
            refs.append((("model", "factory"), self.doc.model.factory))
        for name, split in self.doc.data.splits():
            if split.fn and split.source in ("callable", "text"):
                loc = (
                    ("data", "eval_extra", name[len(EXTRA_PREFIX) :])
                    if name.startswith(EXTRA_PREFIX)
                    else ("data", name)
                )
                refs.append(((*loc, "fn"), split.fn))
        return refs

    def check_plan(self) -> None:
        """Refuse what can be known wrong before anything runs (``compress check`` and ``run``):

        a stage that needs a data split the recipe lacks, a gate that needs a measurement no
        stage makes, and a stage that may change the model after an artifact writer (export,
        compress) that no later stage repeats, whose files would describe the old model.
        (The runner checks the last again on the model's fingerprints, for a stage that
        changes the model though it says it does not.)

        Raises:
            RecipeError: the message names the stage, split or gate and the fix.
        """
        entries = [get_stage(s.name) for s in self.stages]
        present = {name for name, _ in self.doc.data.splits()}
        if self.doc.data.eval_extra and "eval" not in present:
            raise RecipeError("data.eval_extra adds held-out sets to data.eval: add data.eval to the recipe")
        for spec, entry in zip(self.stages, entries):
            for need in entry.needs:
                if not (need in present or (need == "calibration" and "train" in present)):
                    raise RecipeError(
                        f"stage {spec.index + 1} ({spec.name}) needs the data split {need!r}; add data.{need} to the recipe"
                    )
        gates = self.doc.gates
        if gates.max_latency_ms is not None and not any("latency" in e.provides for e in entries):
            measured_by = sorted(e.name for e in stages().values() if "latency" in e.provides)
            raise RecipeError(
                f"gate max_latency_ms needs a stage that measures latency: {', '.join(measured_by) or 'none registered'}"
            )
        needs_eval = [
            g
            for g in ("max_accuracy_drop", "min_accuracy", "min_agreement", "min_cosine", "min_cosine_p05")
            if getattr(gates, g) is not None
        ]
        if needs_eval and "eval" not in present:
            raise RecipeError(f"gate {needs_eval[0]} needs data.eval in the recipe")
        planned = list(zip(self.stages, entries))
        for i, (wspec, writer) in enumerate(planned):
            later = planned[i + 1 :]
            changer = next((s for s, e in later if e.changes_model), None) if writer.describes_model else None
            if changer is None or any(s.name == wspec.name and s.index > changer.index for s, _ in later):
                continue
            raise RecipeError(
                f"stage {changer.index + 1} ({changer.name}) may change the model after stage {wspec.index + 1} "
                f"({wspec.name}) writes its files, and no later stage writes them again: they would describe the "
                f"old model. Move {wspec.name} after {changer.name}, or add {wspec.name} again at the end"
            )

    def to_yaml(self) -> str:
        """The recipe written back, every default filled in (round-trips through ``parse_recipe``)."""
        d = self.doc.model_dump(mode="json", exclude_none=True)
        d["stages"] = [{s.name: s.config_dict()} for s in self.stages]
        return yaml.safe_dump(d, sort_keys=False)


# ----------------------------------------------------------------------------- parsing


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: recipe is {size:,} bytes; a recipe may be at most {MAX_RECIPE_BYTES:,}")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read recipe ({err})") from err
    return parse_recipe(text, str(path), base=path)


def _check_shape(text: str, filename: str) -> None:
    """Refuse a document too large or too deeply nested, from its event stream (which
    PyYAML produces without recursion and without expanding aliases)."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{filename}: recipe is {len(text):,} characters; a recipe may be at most {MAX_RECIPE_BYTES:,}"
        )
    depth = 0
    for events, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader), start=1):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise RecipeError(f"{filename}:{line}: recipe nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if events > MAX_EVENTS:
            raise RecipeError(f"{filename}: recipe has more than {MAX_EVENTS:,} YAML elements")


def _check_expansion(node: Any, filename: str) -> None:
    """Count nodes as a consumer would see them, aliases expanded; stop at the limit."""
    seen = 0
    stack = [node]
    while stack:
        n = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise RecipeError(
                f"{filename}: recipe expands to more than {MAX_NODES:,} values (YAML aliases repeat their anchor); "
                "refusing it"
            )
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack += (k, v)
        elif isinstance(n, yaml.SequenceNode):
            stack += n.value


def parse_recipe(text: str, filename: str = "<recipe>", base: Path | None = None) -> Recipe:
    try:
        _check_shape(text, filename)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_expansion(node, filename)
        loader = yaml.SafeLoader("")
        try:
            raw = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise RecipeError(f"{where}: YAML syntax error: {err.problem}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{filename}: YAML error: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{filename}: a recipe must be a mapping with keys version, model, data, stages, gates")
    try:
        doc = RecipeDoc.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, filename, node, ())) from None

    specs = []
    for i, item in enumerate(doc.stages):
        loc = ("stages", i)
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(
                f"{_where(filename, node, loc)}: each stage must be a one-key mapping like '- prune: {{method: magnitude}}', got {item!r}"
            )
        ((name, cfg),) = item.items()
        try:
            entry = get_stage(name)
        except RecipeError as err:
            close = difflib.get_close_matches(str(name), list(stages()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{_where(filename, node, loc)}: {err}{hint}") from None
        try:
            config = TypeAdapter(entry.config).validate_python(cfg if cfg is not None else {})
        except ValidationError as err:
            raise RecipeError(_format_errors(err, filename, node, (*loc, name), entry.config)) from None
        spec = StageSpec(name=name, config=config, index=i)
        # Stage configs come from stage packages: refuse non-finite numbers here, once for all.
        _reject_non_finite(spec.config_dict(), filename, node, (*loc, name))
        specs.append(spec)
    recipe = Recipe(doc=doc, stages=specs, path=base)
    for loc, ref in recipe.imports():
        try:
            why = refusal(ref, set(doc.trusted_callables))
        except ValueError as err:
            raise RecipeError(f"{_where(filename, node, loc)}: {err}") from None
        if why:
            raise RecipeError(f"{_where(filename, node, loc)}: refused: {why}")
    return recipe


def _reject_non_finite(value: Any, filename: str, node: Any, loc: tuple) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{_where(filename, node, loc)}: must be a finite number (got {value})")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_non_finite(v, filename, node, (*loc, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_non_finite(v, filename, node, (*loc, i))


def _line(node: Any, loc: tuple) -> int | None:
    """1-based line of the YAML node at ``loc`` (the deepest that exists)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(key)), None)
            if match is None:
                key_node = next((k for k, _ in node.value if k.value == str(key)), None)
                return key_node.start_mark.line + 1 if key_node is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _where(filename: str, node: Any, loc: tuple) -> str:
    line = _line(node, loc)
    path = ".".join(str(p) for p in loc)
    return f"{filename}:{line}: {path}" if line else f"{filename}: {path}"


def _format_errors(err: ValidationError, filename: str, node: Any, prefix: tuple, model: Any = None) -> str:
    lines = []
    vocab = _property_names(model) if model is not None else _property_names(RecipeDoc)
    for e in err.errors():
        yaml_loc = _yaml_loc(node, (*prefix, *e["loc"]))
        key = yaml_loc[-1] if yaml_loc else ""
        if e["type"] == "extra_forbidden":
            if str(key) in vocab:  # a real key, but not at this place: suggesting itself would not help
                parent = ".".join(str(p) for p in yaml_loc[:-1]) or "the top level"
                msg = f"key {key!r} is not allowed under {parent}"
            else:
                close = difflib.get_close_matches(str(key), vocab, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                msg = f"unknown key {key!r}{hint}"
        elif e["type"] == "missing":
            msg = f"missing required key {key!r}"
        elif e["type"] == "union_tag_not_found":
            field = e["ctx"]["discriminator"].strip("'")
            msg = f"missing key {field!r}; one of: {', '.join(_tags(model))}"
        elif e["type"] == "union_tag_invalid":
            field, tag = e["ctx"]["discriminator"].strip("'"), str(e["ctx"]["tag"])
            close = difflib.get_close_matches(tag, _tags(model), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"unknown {field} {tag!r}; one of: {', '.join(_tags(model))}{hint}"
        else:
            value = e.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            msg = f"{e['msg']} (got {shown[:80]})"
        lines.append(f"{_where(filename, node, yaml_loc)}: {msg}")
    return "\n".join(lines)


def _tags(model: Any) -> list[str]:
    """The values a discriminated union accepts for its tag (a stage's methods)."""
    schema = TypeAdapter(model).json_schema() if model is not None else {}
    return sorted(schema.get("discriminator", {}).get("mapping", {}))


def _yaml_loc(node: Any, loc: tuple) -> tuple:
    """``loc`` without the parts that have no YAML counterpart.

    pydantic puts a discriminated union's tag into the error location
    (``stages.0.prune.magnitude.amount``); the YAML has ``method: magnitude`` instead.
    """
    out: list = []
    cur = node
    for key in loc:
        if isinstance(cur, yaml.MappingNode):
            match = next((v for k, v in cur.value if k.value == str(key)), None)
            if match is None:
                method = next((v.value for k, v in cur.value if k.value == "method"), None)
                if method == key:
                    continue
                cur = None
            else:
                cur = match
        elif isinstance(cur, yaml.SequenceNode) and isinstance(key, int):
            cur = cur.value[key] if key < len(cur.value) else None
        out.append(key)
    return tuple(out)


def _property_names(model: Any) -> list[str]:
    names: set[str] = set()

    def walk(s: Any) -> None:
        if isinstance(s, dict):
            for k, v in s.get("properties", {}).items():
                names.add(k)
                walk(v)
            for v in s.values():
                if isinstance(v, (dict, list)):
                    walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)

    walk(TypeAdapter(model).json_schema())
    return sorted(names)


# ----------------------------------------------------------------------------- schema


def json_schema() -> dict[str, Any]:
    """JSON Schema of recipes, generated from the typed configs of the core and every stage."""
    schema = RecipeDoc.model_json_schema()
    defs = schema.setdefault("$defs", {})
    items = []
    for name, entry in stages().items():
        sub = TypeAdapter(entry.config).json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        items.append(
            {
                "type": "object",
                "title": name,
                "description": entry.summary,
                "properties": {name: sub},
                "required": [name],
                "additionalProperties": False,
            }
        )
    schema["properties"]["stages"]["items"] = {"oneOf": items}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "compress recipe"
    return schema
