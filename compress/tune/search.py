"""``compress tune``: search the space a recipe's ``search:`` section declares for the smallest
(or fastest) model that passes the recipe's gates.

1. The recipe's stages before ``quantize`` run once per sparsity level through
   ``compress.pipeline.run`` (into a work folder whose stage cache the candidates then reuse).
2. Sensitivity: every searched layer quantized alone at every bit width (cached on disk).
3. Uniform baselines: every bit width for all searched layers, run end to end.
4. Bisection on the divergence budget of the per-layer knapsack: the allocation at a passing
   anchor's budget is never larger than the anchor; a larger budget gives a smaller model,
   until a candidate fails. Every candidate runs through every stage, ONNX export included.
5. The winner is written as a plain recipe (``recipe.tuned.yaml``) and re-run from that file
   into ``<out>/tuned``: the shipped artifacts come from the recipe a CI job will re-run.

Nothing passing is a result, not a crash: the best candidate and its distance to each gate
are reported (exit 1 from the CLI).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import compress
from compress.artifacts import atomic_write, atomic_write_json, code_fingerprint, file_hash, text_hash
from compress.errors import CompressError, InputError, RecipeError, StageError
from compress.recipe import Recipe, parse_recipe
from compress.tune.allocate import ChoiceTable, allocate
from compress.tune.config import FLOAT, SearchSpec

log = logging.getLogger(__name__)

SEARCH_VERSION = 1
ACCURACY_GATES = ("max_accuracy_drop", "min_accuracy", "min_agreement")


@dataclass(frozen=True)
class Variant:
    """A point of the global part of the space: sparsity level, quantize method, options."""

    sparsity: float | None
    method: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.sparsity is not None:
            parts.append(f"sparsity {self.sparsity:g}")
        parts += [f"{k}={v}" for k, v in self.options]
        return ", ".join(parts)


@dataclass
class Candidate:
    """One configuration run end to end, and what it measured."""

    id: int
    kind: str  # "baseline", "search" or "tuned"
    variant: str
    sparsity: float | None
    method: str
    options: dict[str, Any]
    layer_bits: dict[str, int | str]
    proxy_divergence: float
    estimated_bytes: float
    passed: bool = False
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def objective(self, name: str) -> float:
        return self.metrics.get(name, math.inf)

    def shortfall(self) -> float:
        """How far the candidate is from passing: summed relative distance to each failed gate."""
        if self.error is not None:
            return math.inf
        total = 0.0
        for f in self.failures:
            m, limit = f.get("measured"), f.get("limit")
            if m is None or limit is None or not math.isfinite(float(m)):
                total += 1.0
                continue
            total += abs(float(m) - float(limit)) / max(abs(float(limit)), 1e-12)
        return total


@dataclass
class TuneResult:
    out_dir: Path
    objective: str
    candidates: list[Candidate]
    chosen: Candidate | None
    best: Candidate | None
    recipe_path: Path | None
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.chosen is not None


@dataclass
class _Plan:
    recipe: Recipe
    spec: SearchSpec
    quant_index: int
    prune_index: int | None
    objective: str
    metric: str
    variants: list[Variant]
    int_bits: list[int]


class _Budget:
    def __init__(self, spec: SearchSpec):
        self.candidates = spec.budget.candidates
        self.seconds = spec.budget.seconds
        self.start = time.perf_counter()
        self.used = 0

    def left(self) -> bool:
        if self.used >= self.candidates:
            return False
        return self.seconds is None or time.perf_counter() - self.start < self.seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


Progress = Callable[[str, Any], None]


def tune(
    recipe: Recipe,
    model_path: Path,
    out_dir: Path,
    *,
    spec: SearchSpec | None = None,
    trust_model: bool = False,
    progress: Progress | None = None,
) -> TuneResult:
    """Search ``recipe``'s space for the model that passes its gates at the lowest objective.

    Args:
        recipe: the recipe; its ``search:`` section (or ``spec``) declares the space and budget,
            its gates are the constraints.
        model_path: the model file, as for ``compress run``.
        out_dir: where the search writes ``search.json``, ``report.html``, ``recipe.tuned.yaml``
            (``recipe.best.yaml`` when nothing passes), the work folders and ``tuned/``.
        spec: overrides the recipe's ``search:`` section.
        trust_model: as for ``compress run``.
        progress: called with ``("phase", text)`` and ``("candidate", Candidate)`` as the search goes.

    Raises:
        InputError: bad recipe, model, data or search space (nothing is searched).
    """
    notify = progress or (lambda kind, payload: None)
    plan = _plan(recipe, spec or recipe.doc.search or SearchSpec())
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = _Budget(plan.spec)
    candidates: list[Candidate] = []
    tables: dict[str, ChoiceTable] = {}  # by variant label (option values need not be hashable)
    sensitivity: dict[str, Any] = {}
    workdirs: dict[float | None, Path] = {}

    skipped: list[dict[str, Any]] = []
    for level in dict.fromkeys(v.sparsity for v in plan.variants):
        workdir = out_dir / "work" / ("recipe" if level is None else f"sparsity-{level:g}")
        workdirs[level] = workdir
        notify("phase", f"stages before quantize{'' if level is None else f' (sparsity {level:g})'}")
        try:
            state, data, reference, searched = _prefix_state(plan, level, model_path, workdir, trust_model)
        except InputError:
            raise
        except CompressError as err:  # a stage failed at this sparsity level: the others may still work
            log.warning("sparsity %s: %s; its variants are skipped", level, err)
            skipped.append({"sparsity": level, "error": str(err)})
            continue
        for variant in (v for v in plan.variants if v.sparsity == level):
            notify("phase", f"sensitivity: {len(searched)} layers x {len(plan.spec.bits)} widths ({variant.label})")
            measured = _sensitivity(plan, variant, state, data, reference, searched, model_path, out_dir)
            sensitivity[variant.label] = measured
            tables[variant.label] = _choice_table(measured, plan.spec.bits, plan.objective)

    def run_candidate(variant: Variant, picks: list[int], kind: str) -> Candidate:
        table = tables[variant.label]
        bits = {layer: _choice_value(table.choices[p]) for layer, p in zip(table.layers, picks)}
        div, cost = table.total(picks)
        cand = Candidate(
            id=len(candidates),
            kind=kind,
            variant=variant.label,
            sparsity=variant.sparsity,
            method=variant.method,
            options=dict(variant.options),
            layer_bits=bits,
            proxy_divergence=div,
            estimated_bytes=cost,
        )
        _evaluate(plan, cand, model_path, workdirs[variant.sparsity], trust_model)
        candidates.append(cand)
        budget.used += 1
        notify("candidate", cand)
        return cand

    def seen(variant: Variant, picks: list[int]) -> Candidate | None:
        table = tables[variant.label]
        bits = {layer: _choice_value(table.choices[p]) for layer, p in zip(table.layers, picks)}
        return next((c for c in candidates if c.variant == variant.label and c.layer_bits == bits), None)

    plan.variants = [v for v in plan.variants if v.label in tables]
    if not plan.variants:
        raise StageError(
            "no variant of the search space got past the stages before quantize: "
            + "; ".join(f"sparsity {k['sparsity']}: {k['error']}" for k in skipped)
        )

    if plan.spec.baselines:
        notify("phase", "uniform baselines")
        for variant in plan.variants:
            table = tables[variant.label]
            for b in sorted(plan.int_bits, reverse=True):
                if budget.left():
                    run_candidate(variant, [table.choices.index(str(b))] * len(table.layers), "baseline")

    notify("phase", "bisection on the per-layer allocation")
    order = sorted(plan.variants, key=lambda v: _best_size(candidates, v, plan.objective))
    for n, variant in enumerate(order):
        if not budget.left():
            break
        share = math.ceil((plan.spec.budget.candidates - budget.used) / (len(order) - n))
        _bisect(variant, tables[variant.label], candidates, budget, share, run_candidate, seen)

    chosen, best = _choose(candidates, plan.objective)
    result_recipe = chosen or best
    recipe_path = None
    tuned = None
    if result_recipe is not None:
        name = "recipe.tuned.yaml" if chosen is not None else "recipe.best.yaml"
        recipe_path = out_dir / name
        text = candidate_yaml(plan, result_recipe, recipe_path.parent, tuned=True)
        atomic_write(recipe_path, lambda p: p.write_text(text))
        if chosen is not None:
            notify("phase", f"re-running {name} into {out_dir / 'tuned'}")
            tuned = _verify(
                plan, chosen, recipe_path, model_path, out_dir / "tuned", workdirs[chosen.sparsity], trust_model
            )
    report = _report(plan, candidates, sensitivity, tables, chosen, best, tuned, recipe_path, budget, out_dir)
    report["skipped_variants"] = skipped
    atomic_write_json(out_dir / "search.json", report)
    from compress.html_report import render_tune_html

    atomic_write(out_dir / "report.html", lambda p: p.write_text(render_tune_html(report)))
    return TuneResult(out_dir, plan.objective, candidates, chosen, best, recipe_path, report)


# ----------------------------------------------------------------------------- planning


def _plan(recipe: Recipe, spec: SearchSpec) -> _Plan:
    from pydantic import TypeAdapter, ValidationError

    from compress.registry import get_stage, methods

    names = [s.name for s in recipe.stages]
    if "quantize" not in names:
        raise RecipeError(
            f"{_where(recipe)}: compress tune searches the quantize stage's bits; the recipe has none (stages: {', '.join(names) or 'none'})"
        )
    quant_index = names.index("quantize")
    base = recipe.stages[quant_index].config
    prune_index = None
    if spec.sparsity is not None:
        prunes = [i for i, n in enumerate(names[:quant_index]) if n == "prune"]
        if not prunes or not hasattr(recipe.stages[prunes[-1]].config, "amount"):
            raise RecipeError(
                f"{_where(recipe)}: search.sparsity needs a prune stage with 'amount' (magnitude or variance) before quantize"
            )
        prune_index = prunes[-1]
    objective = resolve_objective(recipe, spec)
    needs = {"packed_size": "compress", "onnx_size": "export", "latency": "export"}[objective]
    if needs not in names:
        raise RecipeError(f"{_where(recipe)}: search.objective {objective!r} needs a {needs} stage in the recipe")
    gates = recipe.doc.gates
    if all(v is None for v in gates.model_dump().values()):
        raise RecipeError(
            f"{_where(recipe)}: compress tune needs gates to search against (e.g. gates: {{max_accuracy_drop: 0.01}})"
        )
    metric = spec.sensitivity
    if metric == "auto":
        metric = "kl" if any(getattr(gates, g) is not None for g in ACCURACY_GATES) else "cosine"
    known = methods("quantize")
    for m in spec.methods or []:
        if m not in known:
            raise RecipeError(
                f"{_where(recipe)}: search.methods: unknown quantize method {m!r}; one of: {', '.join(sorted(known))}"
            )
    int_bits = [int(b) for b in spec.bits if b != FLOAT]
    option_items = [[(k, v) for v in values] for k, values in spec.options.items()]
    levels: list[float | None] = [*spec.sparsity] if spec.sparsity else [None]
    variants = [
        Variant(level, method, tuple(opts))
        for level in levels
        for method in (spec.methods or [base.method])
        for opts in itertools.product(*option_items)
    ]
    quant_config = get_stage("quantize").config
    adapter = TypeAdapter(quant_config)
    for v in variants:
        for b in int_bits or [base.bits]:
            try:
                adapter.validate_python(_quant_dict(base, v.method, dict(v.options)) | {"bits": b})
            except ValidationError as err:
                first = err.errors()[0]
                raise RecipeError(
                    f"{_where(recipe)}: search space ({v.label}, {b} bits): {'.'.join(map(str, first['loc']))}: {first['msg']}"
                ) from None
    return _Plan(recipe, spec, quant_index, prune_index, objective, metric, variants, int_bits)


def resolve_objective(recipe: Recipe, spec: SearchSpec) -> str:
    """The objective the search minimises: the spec's, else packed_size with a compress stage, else onnx_size."""
    return spec.objective or ("packed_size" if any(s.name == "compress" for s in recipe.stages) else "onnx_size")


def _where(recipe: Recipe) -> str:
    return str(recipe.path) if recipe.path else "<recipe>"


def _quant_dict(base: Any, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The recipe's quantize config switched to ``method`` (keeping the keys it shares) plus ``options``."""
    from compress.registry import methods

    fields = methods("quantize")[method].config.model_fields
    d = {k: v for k, v in base.model_dump(mode="json").items() if k in fields}
    d["method"] = method
    d.update(options)
    return d


def _doc(plan: _Plan, variant_sparsity: float | None, stages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    d = plan.recipe.doc.model_dump(mode="json", exclude_none=True)
    d.pop("search", None)
    d.pop("output", None)
    d["stages"] = stages if stages is not None else [{s.name: s.config_dict()} for s in plan.recipe.stages]
    if variant_sparsity is not None and plan.prune_index is not None and plan.prune_index < len(d["stages"]):
        d["stages"][plan.prune_index]["prune"]["amount"] = variant_sparsity
    return d


# ----------------------------------------------------------------------------- the prefix and sensitivity


def _prefix_state(plan: _Plan, level: float | None, model_path: Path, workdir: Path, trust_model: bool):
    """The model as the quantize stage receives it, through the pipeline (which caches the
    stages in ``workdir`` for the candidates), plus the data and the searched layer names."""
    import torch

    from compress.data import DataBundle, load_split
    from compress.model_io import load_model, load_state
    from compress.pipeline import run
    from compress.quantize.config import _matches
    from compress.quantize.stage import select_layers
    from compress.state import ModelState

    recipe = plan.recipe
    spec = recipe.doc
    prefix = [{s.name: s.config_dict()} for s in recipe.stages[: plan.quant_index]]
    loaded = load_model(model_path, spec.model.factory, spec.model.kwargs, trust_model)
    if prefix:
        doc = _doc(plan, level, prefix)
        doc["gates"] = {}
        run(
            parse_recipe(
                yaml.safe_dump(doc, sort_keys=False), f"{_where(recipe)} (stages before quantize)", base=recipe.path
            ),
            model_path,
            workdir,
            trust_model=trust_model,
        )
        folder = workdir / "stages" / f"{len(prefix):02d}-{recipe.stages[plan.quant_index - 1].name}"
        state = load_state(folder, loaded.rebuild)
    else:
        import copy

        # The sensitivity pass quantizes layers in place (and restores them): never on the reference.
        scripted = isinstance(loaded.module, torch.jit.ScriptModule)
        module = loaded.rebuild() if scripted else copy.deepcopy(loaded.module)
        state = ModelState(module=module, input_shape=tuple(spec.model.input_shape))
    base_dir = recipe.path.parent if recipe.path else Path.cwd()
    data = DataBundle({n: load_split(n, s, base_dir, tuple(spec.model.input_shape)) for n, s in spec.data.splits()})
    reference = loaded.module.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    quant_cfg = recipe.stages[plan.quant_index].config
    quantized = select_layers(state.module, quant_cfg)
    searched = [name for name in quantized if any(_matches(name, g) for g in plan.spec.layers)]
    if not searched:
        raise RecipeError(
            f"{_where(recipe)}: search.layers {plan.spec.layers} matches none of the quantized layers ({', '.join(quantized) or 'none'})"
        )
    return state, data, reference, searched


def _sensitivity(plan: _Plan, variant: Variant, state, data, reference, layers, model_path, out_dir) -> dict:
    from pydantic import TypeAdapter

    from compress.registry import get_stage
    from compress.tune.sensitivity import measure

    recipe = plan.recipe
    quant_config = get_stage("quantize").config
    cfg = TypeAdapter(quant_config).validate_python(
        _quant_dict(recipe.stages[plan.quant_index].config, variant.method, dict(variant.options))
    )
    bits = [str(b) for b in plan.spec.bits]
    key = text_hash(
        code_fingerprint(),
        file_hash(model_path),
        json.dumps(_doc(plan, variant.sparsity)["stages"][: plan.quant_index], sort_keys=True),
        recipe.doc.model.model_dump_json(),
        recipe.doc.data.model_dump_json(),
        str(recipe.doc.seed),
        cfg.model_dump_json(),
        json.dumps(bits),
        plan.metric,
        str(plan.spec.sensitivity_samples),
        json.dumps(layers),
    )
    cache = out_dir / "sensitivity" / f"{key}.json"
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                log.info("sensitivity of %s reused from %s", variant.label, cache)
                return cached["table"]
        except (OSError, ValueError):
            pass
    table = measure(
        state,
        cfg,
        layers,
        list(plan.spec.bits),
        data,
        reference,
        recipe.doc.seed + plan.quant_index,
        plan.spec.sensitivity_samples,
        plan.metric,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, {"key": key, "variant": variant.label, "metric": plan.metric, "table": table})
    return table


def _choice_table(table: dict, bits: list, objective: str) -> ChoiceTable:
    import numpy as np

    layers = list(table)
    choices = [str(b) for b in bits]
    cost_key = "onnx_size" if objective == "latency" else objective
    div = np.array([[table[layer][c]["divergence"] for c in choices] for layer in layers], dtype=float)
    cost = np.array([[table[layer][c][cost_key] for c in choices] for layer in layers], dtype=float)
    div[~np.isfinite(div)] = np.nan
    return ChoiceTable(layers, choices, div, cost)


def _choice_value(choice: str) -> int | str:
    return FLOAT if choice == FLOAT else int(choice)


# ----------------------------------------------------------------------------- candidates


def candidate_yaml(plan: _Plan, cand: Candidate, dest_dir: Path | None = None, tuned: bool = False) -> str:
    """The candidate as a plain recipe: every searched layer's bits spelled out in
    ``layer_bits``, float layers under ``skip``, the sparsity as the prune stage's amount."""
    recipe = plan.recipe
    doc = _doc(plan, cand.sparsity)
    base = recipe.stages[plan.quant_index].config
    q = _quant_dict(base, cand.method, cand.options)
    ints = [b for b in cand.layer_bits.values() if b != FLOAT]
    if ints:
        q["bits"] = Counter(ints).most_common(1)[0][0]
    from compress.tune.sensitivity import glob_escape

    spelled = {glob_escape(layer): b for layer, b in cand.layer_bits.items() if b != FLOAT}
    q["layer_bits"] = spelled | {k: v for k, v in (q.get("layer_bits") or {}).items() if k not in spelled}
    floats = [glob_escape(layer) for layer, b in cand.layer_bits.items() if b == FLOAT]
    q["skip"] = list(q.get("skip") or []) + [g for g in floats if g not in (q.get("skip") or [])]
    doc["stages"][plan.quant_index] = {"quantize": q}
    if tuned:
        doc["name"] = f"{recipe.name}-tuned"
        if dest_dir is not None:
            _rebase_data_paths(doc, recipe, dest_dir)
    header = ""
    if tuned:
        header = (
            f"# Written by `compress tune` (compress {compress.__version__}) from {recipe.path or recipe.name}: candidate "
            f"{cand.id} ({cand.variant}).\n# A plain recipe: `compress run` reproduces the tuned model without searching.\n"
        )
    return header + yaml.safe_dump(doc, sort_keys=False)


def _rebase_data_paths(doc: dict, recipe: Recipe, dest_dir: Path) -> None:
    """Relative data paths stay valid when the recipe is written into another folder."""
    base = recipe.path.parent if recipe.path else Path.cwd()
    data = doc.get("data") or {}
    splits = [v for k, v in data.items() if k != "eval_extra"] + list((data.get("eval_extra") or {}).values())
    for split in splits:
        if isinstance(split, dict) and split.get("path") and not Path(split["path"]).is_absolute():
            split["path"] = os.path.relpath((base / split["path"]).resolve(), dest_dir.resolve())


def _evaluate(plan: _Plan, cand: Candidate, model_path: Path, workdir: Path, trust_model: bool) -> None:
    from compress.pipeline import run

    started = time.perf_counter()
    text = candidate_yaml(plan, cand)
    try:
        recipe = parse_recipe(text, f"candidate {cand.id}", base=plan.recipe.path)
        result = run(recipe, model_path, workdir, trust_model=trust_model)
        cand.metrics = summarize(result.report)
        cand.gates = result.report["gates"]
        cand.failures = result.report["failures"]
        cand.passed = bool(result.passed)
    except CompressError as err:
        cand.error = f"{type(err).__name__}: {err}"
    except Exception as err:  # one broken candidate must not end the search
        log.warning("candidate %d failed", cand.id, exc_info=True)
        cand.error = f"internal error: {type(err).__name__}: {err}"
    cand.seconds = time.perf_counter() - started


def summarize(report: dict[str, Any]) -> dict[str, float]:
    """The numbers a candidate is judged by, read from a pipeline report (report.json)."""
    rows = report["stages"]
    final = rows[-1]
    out: dict[str, float] = {}
    for k in ("accuracy", "agreement", "cosine", "cosine_p05", "retrieval_agreement", "weight_bits", "sparsity"):
        if k in final and final[k] is not None:
            out[k] = final[k]
    if "accuracy" in rows[0]:
        out["input_accuracy"] = rows[0]["accuracy"]
    out["input_size"] = rows[0]["size_bytes"]
    packed = [r for r in rows if r["stage"] == "compress"]
    if packed:
        out["packed_size"] = packed[-1]["size_bytes"]
    if "final_size_bytes" in final:
        out["onnx_size"] = final["final_size_bytes"]
    out["size"] = final.get("final_size_bytes", final["size_bytes"])
    latency = [r["latency_p50_ms"] for r in rows if r.get("latency_p50_ms") is not None]
    if latency:
        out["latency"] = latency[-1]
    return out


def _best_size(candidates: list[Candidate], variant: Variant, objective: str) -> float:
    sizes = [c.objective(objective) for c in candidates if c.variant == variant.label and c.passed]
    return min(sizes, default=math.inf)


def _bisect(variant, table: ChoiceTable, candidates, budget: _Budget, share: int, run_candidate, seen) -> None:
    """Bisect the summed-divergence budget between a passing and a failing allocation."""
    import numpy as np

    mine = [c for c in candidates if c.variant == variant.label and c.error is None]
    passing = [c for c in mine if c.passed]
    lo = min(
        (c.proxy_divergence for c in passing if c.estimated_bytes == min(p.estimated_bytes for p in passing)),
        default=0.0,
    )
    failing = [c.proxy_divergence for c in mine if not c.passed and c.proxy_divergence > lo]
    finite = table.divergence[np.isfinite(table.divergence)]
    positive = finite[finite > 0]
    # Below the smallest nonzero sensitivity every allocation is the exact one: bisect above it.
    floor = float(positive.min()) if positive.size else 0.0
    hi = min(failing, default=float(finite.sum()) + 1e-12 if finite.size else 1.0)
    spent, steps = 0, 0
    first = True
    while budget.left() and spent < share and steps < 60:
        steps += 1
        if not first and hi <= lo * 1.02 + 1e-15:
            break
        # The first allocation uses the passing anchor's budget: never larger than the anchor.
        target = lo if first else math.sqrt(max(lo, floor) * hi) if max(lo, floor) > 0 else hi / 2
        first = False
        picks = allocate(table, target)
        if picks is None:
            lo = max(lo, target)
            continue
        known = seen(variant, picks)
        if known is not None:
            if known.passed:
                lo = max(lo, target)
            else:
                hi = min(hi, max(known.proxy_divergence, lo))
                if hi <= lo:
                    break
            continue
        cand = run_candidate(variant, picks, "search")
        spent += 1
        if cand.passed:
            lo = max(lo, target)
        else:
            if cand.proxy_divergence <= lo:
                break  # the additive model ranks it safer than a passing one: nothing left to bisect
            hi = cand.proxy_divergence


def _choose(candidates: list[Candidate], objective: str) -> tuple[Candidate | None, Candidate | None]:
    def fidelity(c: Candidate) -> float:
        return -c.metrics.get("accuracy", c.metrics.get("cosine", 0.0))

    passing = [c for c in candidates if c.passed]
    chosen = min(passing, key=lambda c: (c.objective(objective), fidelity(c)), default=None)
    failing = [c for c in candidates if not c.passed]
    best = chosen or min(failing, key=lambda c: (c.shortfall(), c.objective(objective)), default=None)
    return chosen, best


def _verify(
    plan: _Plan, chosen: Candidate, recipe_path: Path, model_path: Path, dest: Path, workdir: Path, trust_model: bool
) -> dict:
    """Re-run the written recipe from its file into ``dest`` and compare with the candidate.

    The stages before quantize are seeded from the search's stage cache (the pipeline checks
    their keys and file hashes before reusing them); every later stage runs again from the
    written recipe.
    """
    import shutil

    from compress.pipeline import run
    from compress.recipe import load_recipe

    if dest.exists():
        shutil.rmtree(dest)
    for i, stage in enumerate(plan.recipe.stages[: plan.quant_index]):
        folder = Path("stages") / f"{i + 1:02d}-{stage.name}"
        if (workdir / folder).is_dir():
            shutil.copytree(workdir / folder, dest / folder)
    try:
        result = run(load_recipe(recipe_path), model_path, dest, trust_model=trust_model)
    except CompressError as err:
        return {"out_dir": str(dest), "error": str(err), "reproduced": False}
    metrics = summarize(result.report)
    exact = ("accuracy", "agreement", "cosine", "packed_size", "onnx_size", "size")
    differences = {
        k: [chosen.metrics[k], metrics[k]] for k in exact if k in chosen.metrics and chosen.metrics[k] != metrics.get(k)
    }
    if differences:
        log.warning("re-running %s did not reproduce the candidate: %s", recipe_path, differences)
    return {
        "out_dir": str(dest),
        "passed": result.passed,
        "metrics": metrics,
        "differences": differences,
        "reproduced": not differences,
    }


# ----------------------------------------------------------------------------- the report


def _report(plan, candidates, sensitivity, tables, chosen, best, tuned, recipe_path, budget, out_dir) -> dict:
    objective = plan.objective
    baselines = [c for c in candidates if c.kind == "baseline"]
    passing_baselines = [c for c in baselines if c.passed]
    smallest_baseline = min(passing_baselines, key=lambda c: c.objective(objective), default=None)
    layers = []
    if best is not None:
        variant = next(v for v in plan.variants if v.label == best.variant)
        table = sensitivity[variant.label]
        for layer, b in best.layer_bits.items():
            layers.append(
                {
                    "layer": layer,
                    "bits": b,
                    "sensitivity": {k: v["divergence"] for k, v in table[layer].items()},
                    "bytes": {
                        k: v[objective if objective != "latency" else "onnx_size"] for k, v in table[layer].items()
                    },
                }
            )
    distance = []
    if chosen is None and best is not None:
        for f in best.failures:
            m, limit = f.get("measured"), f.get("limit")
            distance.append(
                {**f, "missed_by": (float(m) - float(limit)) if m is not None and limit is not None else None}
            )
    return {
        "search_version": SEARCH_VERSION,
        "compress_version": compress.__version__,
        "recipe": plan.recipe.name,
        "recipe_path": str(plan.recipe.path) if plan.recipe.path else None,
        "out_dir": str(out_dir),
        "objective": objective,
        "sensitivity_metric": plan.metric,
        "space": plan.spec.model_dump(mode="json"),
        "gates": plan.recipe.doc.gates.model_dump(exclude_none=True),
        "passed": chosen is not None,
        "chosen": asdict(chosen) if chosen else None,
        "best": asdict(best) if best else None,
        "missed_gates": distance,
        "smallest_passing_baseline": asdict(smallest_baseline) if smallest_baseline else None,
        "tuned_recipe": str(recipe_path) if recipe_path else None,
        "tuned_run": tuned,
        "layers": layers,
        "candidates": [asdict(c) for c in candidates],
        "sensitivity": sensitivity,
        "candidates_run": budget.used,
        "search_seconds": budget.elapsed,
    }
