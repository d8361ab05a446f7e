"""The pipeline runner: stages in order, measured, cached, gated.

The run has four steps: plan (check everything that needs no loading), load (model and
data, checked against each other), execute (every stage, or its cached result) and report
(final artifacts, device bundle and reports, published together; see
``compress.outdir``).

Per stage it writes ``<out>/stages/NN-name/`` holding the stage's model (reloadable even
after the architecture changed), its artifacts and ``stage.json``. ``stage.json`` is written
last and records the stage's cache key and the hashes of its files: a stage folder without
it, or whose files no longer match it, is never reused. A re-run with the same input, data
and config reuses finished stages; ``force`` redoes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

import compress
from compress.artifacts import atomic_write_json, code_fingerprint, file_hash, module_fingerprint, text_hash
from compress.data import DataBundle, load_split
from compress.distributed import broadcast_from_main, is_main, rank_and_world
from compress.errors import (
    CompressError,
    DataError,
    InputError,
    ModelLoadError,
    RecipeError,
    StageError,
)
from compress.fake_quant import ACTIVATIONS_KEY, quantized_inputs
from compress.logs import captured_warnings
from compress.metrics import PeakRSS, compact_heap, evaluate, model_size, predict, score_outputs
from compress.model_io import (
    LoadedModel,
    check_forward,
    load_model,
    load_state,
    save_state,
)
from compress.outdir import ENVIRONMENT_ERRNOS, OutputFolder, disk_error
from compress.precision import float32_compute
from compress.recipe import EXTRA_PREFIX, Recipe
from compress.registry import StageEntry, get_stage, methods
from compress.state import ModelState, StageContext, StageOutputs

log = logging.getLogger(__name__)

STAGE_RECORD = "stage.json"
REPORT_VERSION = 1


class Reporter(Protocol):
    def stage_started(self, index: int, total: int, name: str) -> None: ...

    def stage_finished(self, index: int, total: int, row: dict[str, Any]) -> None: ...


class _SilentReporter:
    def stage_started(self, index: int, total: int, name: str) -> None:
        pass

    def stage_finished(self, index: int, total: int, row: dict[str, Any]) -> None:
        pass


# ----------------------------------------------------------------------------- records


@dataclass
class Check:
    """One pass/fail check: a recipe gate or a check a stage made.

    ``measured`` is None when the quantity could not be measured (then ``passed`` is
    False and ``reason`` says why).
    """

    gate: str
    measured: float | None
    limit: float | None
    passed: bool
    reason: str | None = None
    stage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"gate": self.gate, "measured": self.measured, "limit": self.limit, "passed": self.passed}
        if self.reason:
            d["reason"] = self.reason
        if self.stage:
            d["stage"] = self.stage
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], stage: str | None = None) -> Check:
        measured = d.get("measured")
        if isinstance(measured, float) and not math.isfinite(measured):
            measured = None
        return cls(
            gate=str(d["gate"]),
            measured=None if measured is None else float(measured),
            limit=None if d.get("limit") is None else float(d["limit"]),
            passed=bool(d["passed"]) and measured is not None,
            reason=d.get("reason"),
            stage=stage or d.get("stage"),
        )


@dataclass
class StageRow:
    """One row of the report's stage table (docs/report-schema.md, "row")."""

    stage: str
    seconds: float
    parameters: int
    nonzeros: int
    sparsity: float
    size_bytes: int
    weight_bits: float
    quantized_fraction: float = 0.0
    cached: bool = False
    config_hash: str | None = None
    method: str | None = None
    state_file_bytes: int | None = None
    quality: dict[str, float] = field(default_factory=dict)  # accuracy, agreement, cosine, ...
    eval_extra: dict[str, dict[str, float]] = field(default_factory=dict)  # the same on each data.eval_extra set
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_vs_float: float | None = None
    latency_vs_float_b32: float | None = None
    final_size_bytes: int | None = None
    peak_rss_bytes: int | None = None  # the step's peak resident memory (input row: the load step)
    peak_rss_method: str | None = None  # how it was measured (compress.metrics.PeakRSS)
    metrics: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "stage": self.stage,
            "seconds": self.seconds,
            "parameters": self.parameters,
            "nonzeros": self.nonzeros,
            "sparsity": self.sparsity,
            "size_bytes": self.size_bytes,
            "weight_bits": self.weight_bits,
            "quantized_fraction": self.quantized_fraction,
        }
        d.update(self.quality)
        optional = {
            "state_file_bytes": self.state_file_bytes,
            "config_hash": self.config_hash,
            "metrics": self.metrics,
            "method": self.method,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p90_ms": self.latency_p90_ms,
            "latency_vs_float": self.latency_vs_float,
            "latency_vs_float_b32": self.latency_vs_float_b32,
            "final_size_bytes": self.final_size_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_method": self.peak_rss_method,
        }
        d.update({k: v for k, v in optional.items() if v is not None or k == "config_hash"})
        if self.eval_extra:
            d["eval_extra"] = self.eval_extra
        d["cached"] = self.cached
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRow:
        known = {f for f in cls.__dataclass_fields__ if f != "quality"}
        return cls(**{k: v for k, v in d.items() if k in known}, quality={k: v for k, v in d.items() if k not in known})


@dataclass
class RunResult:
    out_dir: Path
    report: dict[str, Any]
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class _Plan:
    """What the run will do, validated before any work starts."""

    recipe: Recipe
    model_path: Path
    out_dir: Path
    entries: list
    base_dir: Path
    device: torch.device
    memory: str  # "low" or "fast", resolved from the run's ``memory`` option


@dataclass
class _Loaded:
    """The inputs of the run, loaded and checked."""

    model: LoadedModel
    data: DataBundle
    reference_out: torch.Tensor | None
    example: torch.Tensor | None
    input_row: StageRow  # the model as given; its seconds and peak RSS are the load step's
    extra_references: dict[str, torch.Tensor] = field(default_factory=dict)  # data.eval_extra sets


@dataclass
class _Executed:
    """What the stages produced."""

    state: ModelState
    rows: list[StageRow]
    checks: list[Check]
    artifacts: dict[str, Path]
    outputs: StageOutputs


# ----------------------------------------------------------------------------- the run


def run(
    recipe: Recipe,
    model_path: Path,
    out_dir: Path,
    *,
    force: bool = False,
    trust_model: bool = False,
    reporter: Reporter | None = None,
    device: str = "cpu",
    memory: str = "auto",
) -> RunResult:
    """Run ``recipe`` on ``model_path``; write artifacts and reports into ``out_dir``.

    Args:
        device: ``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (CUDA when available):
            where stages compute. Artifacts and reports are the same either way.
        memory: ``low`` trades time for peak memory (:func:`compress.metrics.compact_heap`,
            for the rest of the process), ``fast`` leaves the C allocator as it is, ``auto``
            (the default) is ``low`` for model files of 256 MB or more. Results are the same.

    Raises:
        InputError: bad recipe, model, data or output folder (nothing is run), a full
            disk or another OS error while writing (the message names the path), a stale
            artifact in the recipe's order.
        StageError: a stage failed.
    Gate failures do not raise: they are in ``RunResult.failures`` and the report.
    """
    started = time.perf_counter()
    model_path, out_dir = Path(model_path), Path(out_dir)
    main = is_main()
    plan = _plan(recipe, model_path, out_dir, device, memory)
    if plan.memory == "low" and not compact_heap():
        log.info("memory: low has no effect without glibc")
    if not main:
        # Other ranks of a multi-process run train alongside rank 0 but write into
        # scratch; they follow rank 0's cache decisions and publish nothing.
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"compress-rank{rank_and_world()[0]}-") as scratch:
            plan.out_dir = Path(scratch)
            loaded = _measured_load(plan, trust_model)
            executed = _execute(plan, loaded, force, _SilentReporter(), main=False)
            return RunResult(out_dir, {"passed": True, "stages": [r.to_dict() for r in executed.rows]}, [])
    folder = OutputFolder(out_dir)
    with folder:
        try:
            folder.remove_previous_results()
            loaded = _measured_load(plan, trust_model)
            executed = _execute(plan, loaded, force, reporter or _SilentReporter(), main=True)
            return _report(plan, loaded, executed, folder, started)
        except OSError as err:
            if err.errno in ENVIRONMENT_ERRNOS:
                raise disk_error(err, out_dir) from None
            raise


def _plan(recipe: Recipe, model_path: Path, out_dir: Path, device: str, memory: str = "auto") -> _Plan:
    """Everything that can be checked without loading anything."""
    entries = [get_stage(s.name) for s in recipe.stages]
    recipe.check_plan()
    if not model_path.is_file():
        raise ModelLoadError(f"model file not found: {model_path}")
    if is_main():
        _prepare_out_dir(out_dir)
    base_dir = recipe.path.parent if recipe.path else Path.cwd()
    return _Plan(
        recipe, model_path, out_dir, entries, base_dir, resolve_device(device), resolve_memory(memory, model_path)
    )


MEMORY_MODES = ("auto", "low", "fast")
LOW_MEMORY_MODEL_BYTES = 256 * 10**6  # memory "auto" is "low" from this model file size up


def resolve_memory(mode: str, model_path: Path) -> str:
    """``auto``, ``low`` or ``fast`` as ``low`` or ``fast`` (see :func:`run`); InputError otherwise."""
    if mode not in MEMORY_MODES:
        raise InputError(f"unknown memory mode {mode!r}; use {', '.join(MEMORY_MODES)}")
    if mode == "auto":
        return "low" if model_path.stat().st_size >= LOW_MEMORY_MODEL_BYTES else "fast"
    return mode


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``auto`` as a torch device; InputError when unavailable."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun process
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}; use cpu, cuda or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {name!r} is not supported; use cpu, cuda or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    return dev


def _measured_load(plan: _Plan, trust_model: bool) -> _Loaded:
    """``_load``, its wall time and peak memory recorded on the input row."""
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        loaded = _load(plan, trust_model)
    loaded.input_row.seconds = round(time.perf_counter() - t0, 3)
    loaded.input_row.peak_rss_bytes, loaded.input_row.peak_rss_method = peak.bytes, peak.method
    return loaded


def _load(plan: _Plan, trust_model: bool) -> _Loaded:
    """Load the model and the data; check they fit each other; measure the model as given.

    The loaded module becomes the first stage's input: no copy of it is kept (stages that
    need the input model read ``ctx.reference``, which loads it again from the file).
    """
    spec = plan.recipe.doc
    trusted = frozenset(spec.trusted_callables)
    input_shape = tuple(spec.model.input_shape)
    loaded = load_model(plan.model_path, spec.model.factory, spec.model.kwargs, trust_model, trusted)
    if loaded.kind == "torchscript" and isinstance(loaded.module, torch.jit.ScriptModule) and plan.recipe.stages:
        raise ModelLoadError(
            f"{plan.model_path} is a TorchScript archive and the recipe names no model.factory: the stages need an "
            "eager nn.Module. Name the architecture in model.factory (the archive's weights are loaded into it), "
            "or give a state_dict saved with torch.save(model.state_dict(), path)"
        )
    data = DataBundle(
        {name: load_split(name, s, plan.base_dir, input_shape, trusted) for name, s in spec.data.splits()}
    )
    want = torch.int64 if spec.model.input_dtype == "int64" else torch.float32
    for name, split in data.splits.items():
        if split.x.dtype != want:
            raise DataError(
                f"data split {name!r} holds {split.x.dtype} inputs but model.input_dtype is {spec.model.input_dtype}"
            )
    first = next(iter(data.splits.values()), None)
    check_forward(loaded.module, input_shape, first.x[: input_shape[0]] if first is not None else None)

    torch.manual_seed(spec.seed)
    for p in loaded.module.parameters():
        p.requires_grad_(False)
    eval_split = data.splits.get("eval")
    reference_out = predict(loaded.module, eval_split.x, eval_split.batch_size) if eval_split is not None else None
    if reference_out is not None and not torch.isfinite(reference_out).all():
        raise ModelLoadError(f"{plan.model_path}: the model's outputs on data.eval hold NaN or infinite values")
    _check_labels(loaded.module, data, reference_out, first)
    extra = {}
    for name, split in data.splits.items():
        if name.startswith(EXTRA_PREFIX):
            extra[name] = predict(loaded.module, split.x, split.batch_size)
            if not torch.isfinite(extra[name]).all():
                raise ModelLoadError(
                    f"{plan.model_path}: the model's outputs on data.eval_extra.{name[len(EXTRA_PREFIX) :]} hold NaN "
                    "or infinite values"
                )
    example = first.x[:2] if first is not None else None
    size = model_size(loaded.module)
    row = StageRow(
        stage="input",
        seconds=0.0,
        parameters=size["parameters"],
        nonzeros=size["nonzeros"],
        sparsity=size["sparsity"],
        size_bytes=plan.model_path.stat().st_size,
        weight_bits=size["weight_bits"],
        quantized_fraction=size["quantized_fraction"],
    )
    if reference_out is not None and eval_split is not None:  # the reference scored against itself
        row.quality = score_outputs(reference_out, eval_split.y, reference_out)
    for key, ref in extra.items():
        row.eval_extra[key[len(EXTRA_PREFIX) :]] = score_outputs(ref, data[key].y, ref)
    return _Loaded(loaded, data, reference_out, example, row, extra)


def _check_labels(module, data: DataBundle, reference_out, first) -> None:
    """Labels must be class indices the model can output."""
    if reference_out is not None:
        classes = reference_out.shape[-1] if reference_out.dim() == 2 else None
    elif first is not None:
        out = predict(module, first.x[:1])
        classes = out.shape[-1] if out.dim() == 2 else None
    else:
        return
    for name, split in data.splits.items():
        if split.y is None or classes is None or not len(split.y):
            continue
        top = int(split.y.max())
        if top >= classes:
            raise DataError(
                f"data split {name!r}: label {top} is out of range for a model with {classes} outputs "
                f"(labels must be 0..{classes - 1})"
            )


def _execute(plan: _Plan, loaded: _Loaded, force: bool, reporter: Reporter, main: bool) -> _Executed:
    """Run (or reuse) every stage in order."""
    recipe, spec = plan.recipe, plan.recipe.doc
    input_shape = tuple(spec.model.input_shape)
    state = ModelState(module=_take_module(loaded.model), input_shape=input_shape, example=loaded.example)
    rows = [loaded.input_row]
    key = text_hash(
        code_fingerprint(),  # not only the version: an edited or upgraded install redoes its stages
        file_hash(plan.model_path),
        spec.model.model_dump_json(),
        spec.data.model_dump_json(),
        _data_files_hash(recipe, plan.base_dir),
        str(spec.seed),
    )
    checks: list[Check] = []
    artifacts: dict[str, Path] = {}
    made_by: dict[str, int] = {}  # artifact name -> index of the stage that wrote it
    stale: dict[str, tuple[int, int]] = {}  # artifact -> (stage that wrote it, later stage that changed the model)
    outputs = StageOutputs()
    total = len(recipe.stages)
    for stage_spec, entry in zip(recipe.stages, plan.entries):
        i = stage_spec.index
        key = text_hash(key, stage_spec.name, stage_spec.config_hash(), _plugin_code(entry))
        folder = plan.out_dir / "stages" / f"{i + 1:02d}-{stage_spec.name}"
        reporter.stage_started(i + 1, total, stage_spec.name)
        before = _fingerprint(state) if main and artifacts else None
        record = None if force or not main else _reusable(folder, key)
        reuse = broadcast_from_main(record is not None)  # every rank must make rank 0's choice
        if reuse:
            # Rank 0 reloads the cached state and sends it; other ranks have no cache.
            state = broadcast_from_main(load_state(folder, loaded.model.rebuild) if main else None)
            record = broadcast_from_main(record)
            state.example = loaded.example
            row = StageRow.from_dict(record["row"])
            row.cached = True
            stage_checks = [Check.from_dict(c, stage_spec.name) for c in record["checks"]]
            stage_outputs = StageOutputs.from_dict(record.get("outputs"))
            stage_artifacts = {k: folder / v for k, v in record["artifacts"].items()}
        else:
            row, stage_checks, stage_artifacts, stage_outputs, state = _run_stage(
                state, stage_spec, entry, folder, key, loaded, spec.seed, plan.device
            )
        if before is not None and _fingerprint(state) != before:
            for name in artifacts.keys() - stage_artifacts.keys():
                stale.setdefault(name, (made_by[name], i))
        rows.append(row)
        artifacts.update(stage_artifacts)
        made_by.update({n: i for n in stage_artifacts})
        for name in stage_artifacts:
            stale.pop(name, None)  # written again after the change: current
        outputs = _merge_outputs(outputs, stage_outputs)
        checks += stage_checks
        reporter.stage_finished(i + 1, total, row.to_dict())
    if stale:
        # Publishing them would describe a model that is not the final one (e.g. an ONNX
        # file exported before quantization, measured by the size and latency gates).
        name, (wrote, changed) = min(stale.items(), key=lambda kv: kv[1])
        names = ", ".join(sorted(n for n, v in stale.items() if v == (wrote, changed)))
        w, c = recipe.stages[wrote].name, recipe.stages[changed].name
        raise RecipeError(
            f"stage {changed + 1} ({c}) changes the model after stage {wrote + 1} ({w}) wrote {names}, and no later "
            f"stage writes it again: it would describe the old model. Move {w} after {c}, or add {w} again at the end"
        )
    return _Executed(state, rows, checks, artifacts, outputs)


def _merge_outputs(old: StageOutputs, new: StageOutputs) -> StageOutputs:
    """The latest stage that set a field wins."""
    return StageOutputs(
        latency_p50_ms=new.latency_p50_ms if new.latency_p50_ms is not None else old.latency_p50_ms,
        latency_p90_ms=new.latency_p90_ms if new.latency_p90_ms is not None else old.latency_p90_ms,
        bundle_limits=new.bundle_limits or old.bundle_limits,
        runtime_session=new.runtime_session if new.runtime_session is not None else old.runtime_session,
    )


def _plugin_code(entry: StageEntry) -> str:
    """The source of a plugin stage and of its plugin methods (compress's own are in
    :func:`~compress.artifacts.code_fingerprint`): editing a plugin redoes its stage."""
    targets = [entry.apply_path, *(m.apply_path for m in methods(entry.name).values())]
    return text_hash(*(module_fingerprint(t) for t in targets))


def _fingerprint(state: ModelState) -> str:
    """A hash of the model's weights and quantization: did a stage change the model?"""
    h = hashlib.sha256()
    for name, t in state.module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    h.update(json.dumps(sorted(state.quant)).encode())
    return h.hexdigest()


def _report(plan: _Plan, loaded: _Loaded, executed: _Executed, folder: OutputFolder, started: float) -> RunResult:
    """Write the final artifacts, the bundle and the reports; publish them as one set."""
    recipe, state, rows = plan.recipe, executed.state, executed.rows
    eval_split = loaded.data.splits.get("eval")
    staged = folder.staging()
    try:
        names = {}
        for name, src in executed.artifacts.items():
            shutil.copyfile(src, staged / name)
            names[name] = staged / name
        if "model.onnx" in names and eval_split is not None:
            names["bundle.czip"] = _write_bundle(
                staged / "bundle.czip", names["model.onnx"], state, eval_split, recipe, executed.outputs
            )
        if "model.onnx" in names:
            # a model over 2 GB keeps its weights in model.onnx.data (ONNX external data)
            onnx_files = [names[n] for n in ("model.onnx", "model.onnx.data") if n in names]
            rows[-1].final_size_bytes = sum(p.stat().st_size for p in onnx_files)
        sha256 = {name: file_hash(p) for name, p in names.items()}
        gate_results = _check_gates(recipe.doc.gates, rows, executed.outputs)
        failures = [c for c in executed.checks + gate_results if not c.passed]
        report = {
            "report_version": REPORT_VERSION,
            "compress_version": compress.__version__,
            "recipe": recipe.name,
            "recipe_path": str(recipe.path) if recipe.path else None,
            "model": str(plan.model_path),
            "model_kind": loaded.model.kind,
            "out_dir": str(plan.out_dir),
            "passed": not failures,
            "failures": [c.to_dict() for c in failures],
            "checks": [c.to_dict() for c in executed.checks],
            "gates": [c.to_dict() for c in gate_results],
            "stages": [r.to_dict() for r in rows],
            "layers": layer_table(state),
            "artifacts": {k: str(plan.out_dir / k) for k in names},
            "artifact_sha256": sha256,
            "device": str(plan.device),
            "warnings": captured_warnings(),
            "wall_seconds": time.perf_counter() - started,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "threads": torch.get_num_threads(),
                "memory": plan.memory,
            },
        }
        if "bundle.czip" in sha256:
            report["bundle_sha256"] = sha256["bundle.czip"]
        report = json_safe(report)
        from compress.html_report import render_html
        from compress.report import render_markdown

        (staged / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        (staged / "report.md").write_text(render_markdown(report))
        (staged / "report.html").write_text(render_html(report))
    except OSError as err:
        shutil.rmtree(staged, ignore_errors=True)
        raise disk_error(err, staged) from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    # The report goes last: a report.json exists only next to every artifact it names.
    folder.publish(staged, [*names, "report.md", "report.html", "report.json"])
    return RunResult(plan.out_dir, report, report["failures"])


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return json_safe(obj.item())
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    return obj


def _take_module(loaded: LoadedModel) -> torch.nn.Module:
    """The loaded module, handed to the stages: ``loaded`` keeps no reference to it (the
    run holds one full model; the reference model is read from the file when needed)."""
    module = loaded.take()
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise InputError(f"output folder {out_dir} is not writable: {err.strerror or err}") from None


def _data_files_hash(recipe: Recipe, base_dir: Path) -> str:
    parts = []
    for _, s in recipe.doc.data.splits():
        if s.source in ("file", "text") and s.path:
            p = Path(s.path) if Path(s.path).is_absolute() else base_dir / s.path
            parts.append(file_hash(p) if p.is_file() else "missing")
    return text_hash(*parts)


def _reusable(folder: Path, key: str) -> dict | None:
    record_path = folder / STAGE_RECORD
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        if record.get("key") != key:
            return None
        for name, digest in record["files"].items():
            if not (folder / name).is_file() or file_hash(folder / name) != digest:
                log.warning("stage folder %s: %s changed since it was written; redoing the stage", folder, name)
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_stage(state, stage_spec, entry, folder, key, loaded: _Loaded, seed: int, device: torch.device):
    # Remove the completion record first: if this run is interrupted, the folder is not
    # trusted. Other files stay, so a long stage can resume from its own checkpoints
    # (which it must key by its config, as lottery-ticket rounds do).
    (folder / STAGE_RECORD).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    with PeakRSS() as peak:
        row, checks, stage_artifacts, outputs, state, files = _apply_stage(
            state, stage_spec, entry, folder, loaded, seed, device
        )
    row.peak_rss_bytes, row.peak_rss_method = peak.bytes, peak.method
    atomic_write_json(
        folder / STAGE_RECORD,
        json_safe(
            {
                "key": key,
                "row": row.to_dict(),
                "checks": [c.to_dict() for c in checks],
                "outputs": outputs.to_dict(),
                "artifacts": {n: p.relative_to(folder).as_posix() for n, p in stage_artifacts.items()},
                "files": files,
            }
        ),
    )
    return row, checks, stage_artifacts, outputs, state


def _apply_stage(state, stage_spec, entry, folder, loaded: _Loaded, seed: int, device: torch.device):
    """The stage itself, saving its state and measuring it: what its peak-RSS row covers."""
    ctx = StageContext(
        data=loaded.data,
        out_dir=folder,
        device=device,
        reference=None,
        reference_loader=loaded.model.reload,  # built only if the stage reads ctx.reference
        seed=seed + stage_spec.index,
        log=logging.getLogger(f"compress.stage.{stage_spec.name}"),
    )
    torch.manual_seed(ctx.seed)
    apply = entry.resolve()
    t0 = time.perf_counter()
    state.module.to(device)
    try:
        # a bf16 checkpoint computes in float32 on the CPU, one layer at a time (no-grad passes)
        with float32_compute(state.module):
            state = apply(state, stage_spec.config, ctx)
    except CompressError:
        raise
    except OSError as err:
        if err.errno in ENVIRONMENT_ERRNOS:
            raise disk_error(err, folder) from None
        raise StageError(
            f"stage {stage_spec.index + 1} ({stage_spec.name}) failed: {type(err).__name__}: {err}"
        ) from err
    except Exception as err:
        raise StageError(
            f"stage {stage_spec.index + 1} ({stage_spec.name}) failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        ctx.release_reference()
    state.module.cpu()
    seconds = time.perf_counter() - t0
    state.module.eval()
    state.lineage.append(
        {"stage": stage_spec.name, "config": stage_spec.config_dict(), "config_hash": stage_spec.config_hash()}
    )
    written = save_state(state, folder)
    stage_artifacts = {name: Path(p) for name, p in ctx.artifacts.items()}
    primary = next(iter(stage_artifacts.values()), None)
    size = primary.stat().st_size if primary else model_size(state.module, state.quant)["stored_bytes"]
    row = _measure(state, stage_spec.name, loaded.data, loaded.reference_out, seconds, size, loaded.extra_references)
    row.state_file_bytes = sum(p.stat().st_size for p in written)
    row.config_hash = stage_spec.config_hash()
    row.metrics = ctx.metrics
    row.method = getattr(stage_spec.config, "method", None)
    row.latency_p50_ms = ctx.outputs.latency_p50_ms
    row.latency_p90_ms = ctx.outputs.latency_p90_ms
    row.latency_vs_float = ctx.outputs.latency_vs_float
    row.latency_vs_float_b32 = ctx.outputs.latency_vs_float_b32
    checks = [Check.from_dict(c, stage_spec.name) for c in ctx.checks]
    files = {p.relative_to(folder).as_posix(): file_hash(p) for p in [*written, *stage_artifacts.values()]}
    return row, checks, stage_artifacts, ctx.outputs, state, files


def _measure(
    state: ModelState,
    name: str,
    data: DataBundle,
    reference_out,
    seconds: float,
    size_bytes: int,
    extra_references: dict[str, torch.Tensor] | None = None,
) -> StageRow:
    size = model_size(state.module, state.quant)
    row = StageRow(
        stage=name,
        seconds=round(seconds, 3),
        parameters=size["parameters"],
        nonzeros=size["nonzeros"],
        sparsity=size["sparsity"],
        size_bytes=size_bytes,
        weight_bits=size["weight_bits"],
        quantized_fraction=size["quantized_fraction"],
    )
    # Measured as the model ships: with quantized activations (state.extras), the layers see
    # 8-bit inputs rounded as onnxruntime rounds them, so accuracy and fidelity gates judge
    # the deployed model, not its float-activation twin.
    with quantized_inputs(state.module, state.extras.get(ACTIVATIONS_KEY)):
        if data.has("eval"):
            split = data["eval"]
            row.quality = evaluate(state.module, split.x, split.y, reference_out, split.batch_size)
        for key, ref in (extra_references or {}).items():
            split = data[key]
            row.eval_extra[key[len(EXTRA_PREFIX) :]] = evaluate(state.module, split.x, split.y, ref, split.batch_size)
    return row


def layer_table(state: ModelState) -> list[dict[str, Any]]:
    """Per weight tensor of the final model: shape, parameters, sparsity, stored bits."""
    rows = []
    for name, p in state.module.named_parameters():
        if p.dim() < 2:
            continue
        qt = state.quant.get(name)
        nonzero = int(torch.count_nonzero(p).item())
        rows.append(
            {
                "name": name,
                "shape": list(p.shape),
                "parameters": p.numel(),
                "nonzeros": nonzero,
                "sparsity": 1 - nonzero / p.numel(),
                "bits": qt.bits if qt is not None else 32,
                "quantization": (qt.method or qt.granularity) if qt is not None else None,
            }
        )
    return rows


BUNDLE_MAX_SAMPLES = 1000


def _write_bundle(dst: Path, onnx_path: Path, state: ModelState, split, recipe: Recipe, outputs: StageOutputs) -> Path:
    """The device bundle: the final ONNX, reference inputs/outputs from the final PyTorch
    model, labels, the runtime settings the model was checked with, and the limits to re-check."""
    from compress.bundle import write_bundle
    from compress.onnx_signature import onnx_signature_of

    x = split.x[:BUNDLE_MAX_SAMPLES]
    with state.computing_in_float32():  # as the ONNX computes (a bf16 model is exported in float32)
        out = predict(state.module, x, split.batch_size).numpy()
    limits = dict(outputs.bundle_limits)
    if recipe.doc.gates.max_latency_ms is not None:
        limits["max_latency_ms"] = recipe.doc.gates.max_latency_ms
    manifest = {
        "recipe": recipe.name,
        "input_shape": list(state.input_shape),
        "session": outputs.runtime_session or {},
        "limits": limits,
        "lineage": [e["stage"] for e in state.lineage],
    }
    labels = split.y[:BUNDLE_MAX_SAMPLES].numpy() if split.y is not None else None
    signature = onnx_signature_of(state.module)
    # A model exported with named inputs gets one array per input, as the device feeds it.
    inputs = signature.feeds(x.numpy()) if signature is not None else x.numpy()
    return write_bundle(onnx_path, dst, inputs, out, labels, manifest)


def _check_gates(gates, rows: list[StageRow], outputs: StageOutputs) -> list[Check]:
    first, final = rows[0], rows[-1]
    results: list[Check] = []

    def add(gate: str, measured: float | None, limit: float, ok) -> None:
        if measured is None or (isinstance(measured, float) and not math.isfinite(measured)):
            results.append(Check(gate, None, limit, False, reason="not measured"))
        else:
            results.append(Check(gate, measured, limit, bool(ok(measured, limit))))

    # Accuracy and fidelity gates hold on data.eval and on every data.eval_extra set.
    sets = [("", first.quality, final.quality)] + [
        (f"[{name}]", first.eval_extra.get(name, {}), q) for name, q in final.eval_extra.items()
    ]
    for suffix, q0, q1 in sets:
        if gates.max_accuracy_drop is not None:
            a0, a1 = q0.get("accuracy"), q1.get("accuracy")
            add(
                f"max_accuracy_drop{suffix}",
                a0 - a1 if a0 is not None and a1 is not None else None,
                gates.max_accuracy_drop,
                lambda m, lim: m <= lim + 1e-12,
            )
        if gates.min_accuracy is not None:
            add(f"min_accuracy{suffix}", q1.get("accuracy"), gates.min_accuracy, lambda m, lim: m >= lim)
        if gates.min_agreement is not None:
            add(f"min_agreement{suffix}", q1.get("agreement"), gates.min_agreement, lambda m, lim: m >= lim)
        if gates.min_cosine is not None:
            add(f"min_cosine{suffix}", q1.get("cosine"), gates.min_cosine, lambda m, lim: m >= lim)
        if gates.min_cosine_p05 is not None:
            add(f"min_cosine_p05{suffix}", q1.get("cosine_p05"), gates.min_cosine_p05, lambda m, lim: m >= lim)
    if gates.max_size_bytes is not None:
        size = final.final_size_bytes if final.final_size_bytes is not None else final.size_bytes
        add("max_size_bytes", size, gates.max_size_bytes, lambda m, lim: m <= lim)
    if gates.max_latency_ms is not None:
        add("max_latency_ms", outputs.latency_p50_ms, gates.max_latency_ms, lambda m, lim: m <= lim)
    if gates.min_quantized_fraction is not None:
        add(
            "min_quantized_fraction",
            final.quantized_fraction,
            gates.min_quantized_fraction,
            lambda m, limit: m >= limit,
        )
    return results
