"""The pipeline runner: stages in order, measured, cached, gated.

Per stage it writes ``<out>/stages/NN-name/`` holding the stage's model (reloadable even
after the architecture changed), its artifacts and ``stage.json``. ``stage.json`` is written
last and records the stage's cache key and the hashes of its files: a stage folder without
it, or whose files no longer match it, is never reused. A re-run with the same input, data
and config reuses finished stages; ``force`` redoes them.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

import compress
from compress.artifacts import atomic_write, atomic_write_json, file_hash, text_hash
from compress.data import DataBundle, load_split
from compress.distributed import broadcast_from_main, is_main, rank_and_world
from compress.errors import CompressError, DataError, InputError, RecipeError, StageError
from compress.metrics import count_parameters, evaluate, predict
from compress.model_io import LoadedModel, check_forward, load_model, load_state, save_state
from compress.recipe import Recipe
from compress.registry import get_stage
from compress.state import ModelState, StageContext

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


@dataclass
class RunResult:
    out_dir: Path
    report: dict[str, Any]
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def run(
    recipe: Recipe,
    model_path: Path,
    out_dir: Path,
    *,
    force: bool = False,
    trust_model: bool = False,
    reporter: Reporter | None = None,
) -> RunResult:
    """Run ``recipe`` on ``model_path``; write artifacts and reports into ``out_dir``.

    Raises:
        InputError: bad recipe, model, data or output folder (nothing is run).
        StageError: a stage failed.
    Gate failures do not raise: they are in ``RunResult.failures`` and the report.
    """
    if not is_main():
        # Other ranks of a multi-process run train alongside rank 0 but write into scratch.
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"compress-rank{rank_and_world()[0]}-") as scratch:
            return _run(recipe, model_path, Path(scratch), force, trust_model, _SilentReporter(), main=False)
    return _run(recipe, model_path, out_dir, force, trust_model, reporter or _SilentReporter(), main=True)


def _run(recipe, model_path, out_dir, force, trust_model, reporter, main) -> RunResult:
    started = time.perf_counter()
    spec = recipe.doc
    input_shape = tuple(spec.model.input_shape)
    _prepare_out_dir(out_dir)

    entries = [get_stage(s.name) for s in recipe.stages]
    _check_plan(recipe, entries)

    loaded = load_model(model_path, spec.model.factory, spec.model.kwargs, trust_model)
    base_dir = recipe.path.parent if recipe.path else Path.cwd()
    data = DataBundle(
        {name: load_split(name, s, base_dir, input_shape) for name, s in spec.data if s is not None}
    )
    for name, split in data.splits.items():
        want = torch.int64 if spec.model.input_dtype == "int64" else torch.float32
        if split.x.dtype != want:
            raise DataError(
                f"data split {name!r} holds {split.x.dtype} inputs but model.input_dtype is {spec.model.input_dtype}"
            )
    first = next(iter(data.splits.values()), None)
    check_forward(loaded.module, input_shape, first.x[: input_shape[0]] if first is not None else None)

    torch.manual_seed(spec.seed)
    reference = loaded.module
    for p in reference.parameters():
        p.requires_grad_(False)
    eval_split = data.splits.get("eval")
    reference_out = predict(reference, eval_split.x) if eval_split is not None else None

    example = first.x[:2] if first is not None else None
    state = ModelState(module=_copy_module(loaded), input_shape=input_shape, example=example)
    rows = [_measure(state, "input", data, reference_out, seconds=0.0, size_bytes=model_path.stat().st_size)]
    rows[0].update({"cached": False, "config_hash": None})

    key = text_hash(
        compress.__version__, file_hash(model_path), spec.model.model_dump_json(),
        spec.data.model_dump_json(), _data_files_hash(recipe, base_dir), str(spec.seed),
    )
    stage_checks: list[dict[str, Any]] = []
    artifacts: dict[str, Path] = {}
    total = len(recipe.stages)
    for stage_spec, entry in zip(recipe.stages, entries):
        i = stage_spec.index
        key = text_hash(key, stage_spec.name, stage_spec.config_hash())
        folder = out_dir / "stages" / f"{i + 1:02d}-{stage_spec.name}"
        reporter.stage_started(i + 1, total, stage_spec.name)
        record = None if force or not main else _reusable(folder, key)
        record = broadcast_from_main(record)  # every rank must make rank 0's choice
        if record is not None:
            state = broadcast_from_main(load_state(folder, loaded.rebuild) if main else None)
            state.example = example
            row = record["row"] | {"cached": True}
            checks = record["checks"]
            stage_artifacts = {k: folder / v for k, v in record["artifacts"].items()}
        else:
            row, checks, stage_artifacts, state = _run_stage(
                state, stage_spec, entry, folder, key, data, reference, reference_out, spec.seed
            )
        rows.append(row)
        artifacts.update(stage_artifacts)
        stage_checks += [{**c, "stage": stage_spec.name} for c in checks]
        reporter.stage_finished(i + 1, total, row)

    final_artifacts = _publish_artifacts(artifacts, out_dir)
    if main and "model.onnx" in final_artifacts and eval_split is not None:
        final_artifacts["bundle.czip"] = _write_bundle(
            out_dir / "bundle.czip", final_artifacts["model.onnx"], state, eval_split, recipe, rows
        )
    final = rows[-1]
    if "model.onnx" in final_artifacts:
        final["final_size_bytes"] = final_artifacts["model.onnx"].stat().st_size
    layers = layer_table(state)
    gate_results = _check_gates(spec.gates, rows)
    failures = [c for c in stage_checks + gate_results if not c["passed"]]
    report = {
        "report_version": REPORT_VERSION,
        "compress_version": compress.__version__,
        "recipe": recipe.name,
        "recipe_path": str(recipe.path) if recipe.path else None,
        "model": str(model_path),
        "model_kind": loaded.kind,
        "out_dir": str(out_dir),
        "passed": not failures,
        "failures": failures,
        "checks": stage_checks,
        "gates": gate_results,
        "stages": rows,
        "layers": layers,
        "artifacts": {k: str(v) for k, v in final_artifacts.items()},
        "wall_seconds": time.perf_counter() - started,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
    }
    from compress.html_report import render_html
    from compress.report import render_markdown

    atomic_write_json(out_dir / "report.json", report)
    atomic_write(out_dir / "report.md", lambda p: p.write_text(render_markdown(report)))
    atomic_write(out_dir / "report.html", lambda p: p.write_text(render_html(report)))
    return RunResult(out_dir, report, failures)


def _copy_module(loaded: LoadedModel):
    import copy

    if isinstance(loaded.module, torch.jit.ScriptModule):
        return loaded.rebuild()
    module = copy.deepcopy(loaded.module)
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise InputError(f"output folder {out_dir} is not writable: {err.strerror or err}") from None


def _check_plan(recipe: Recipe, entries) -> None:
    """Refuse a recipe whose stages or gates need data or stages it lacks, before running."""
    present = {name for name, s in recipe.doc.data if s is not None}
    for spec, entry in zip(recipe.stages, entries):
        for need in entry.needs:
            ok = need in present or (need == "calibration" and "train" in present)
            if not ok:
                raise RecipeError(
                    f"stage {spec.index + 1} ({spec.name}) needs the data split {need!r}; add data.{need} to the recipe"
                )
    gates = recipe.doc.gates
    if gates.max_latency_ms is not None and not any(s.name == "export" for s in recipe.stages):
        raise RecipeError("gate max_latency_ms needs an export stage (latency is measured on onnxruntime)")
    needs_eval = [g for g in ("max_accuracy_drop", "min_accuracy", "min_agreement", "min_cosine") if getattr(gates, g) is not None]
    if needs_eval and "eval" not in present:
        raise RecipeError(f"gate {needs_eval[0]} needs data.eval in the recipe")


def _data_files_hash(recipe: Recipe, base_dir: Path) -> str:
    parts = []
    for _, s in recipe.doc.data:
        if s is not None and s.source in ("file", "text"):
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


def _run_stage(state, stage_spec, entry, folder, key, data, reference, reference_out, seed):
    # Remove the completion record first: if this run is interrupted, the folder is not
    # trusted. Other files stay, so a long stage can resume from its own checkpoints
    # (which it must key by its config, as lottery-ticket rounds do).
    (folder / STAGE_RECORD).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        data=data, out_dir=folder, device=torch.device("cpu"), reference=reference,
        seed=seed + stage_spec.index, log=logging.getLogger(f"compress.stage.{stage_spec.name}"),
    )
    torch.manual_seed(ctx.seed)
    apply = entry.resolve()
    t0 = time.perf_counter()
    try:
        state = apply(state, stage_spec.config, ctx)
    except CompressError:
        raise
    except Exception as err:
        raise StageError(f"stage {stage_spec.index + 1} ({stage_spec.name}) failed: {type(err).__name__}: {err}") from err
    seconds = time.perf_counter() - t0
    state.module.eval()
    state.lineage.append(
        {"stage": stage_spec.name, "config": stage_spec.config_dict(), "config_hash": stage_spec.config_hash()}
    )
    written = save_state(state, folder)
    stage_artifacts = {name: Path(p) for name, p in ctx.artifacts.items()}
    primary = next(iter(stage_artifacts.values()), None)
    size = primary.stat().st_size if primary else stored_bytes(state)
    row = _measure(state, stage_spec.name, data, reference_out, seconds, size)
    row["state_file_bytes"] = sum(p.stat().st_size for p in written)
    row.update({"config_hash": stage_spec.config_hash(), "metrics": ctx.metrics, "cached": False})
    method = getattr(stage_spec.config, "method", None)
    if method:
        row["method"] = method
    for k in ("latency_p50_ms", "latency_p90_ms", "latency_vs_float", "latency_vs_float_b32"):
        if k in ctx.metrics:
            row[k] = ctx.metrics[k]
    files = {p.relative_to(folder).as_posix(): file_hash(p) for p in [*written, *stage_artifacts.values()]}
    atomic_write_json(
        folder / STAGE_RECORD,
        {
            "key": key,
            "row": row,
            "checks": ctx.checks,
            "artifacts": {n: p.relative_to(folder).as_posix() for n, p in stage_artifacts.items()},
            "files": files,
        },
    )
    return row, ctx.checks, stage_artifacts, state


def _measure(state: ModelState, name: str, data: DataBundle, reference_out, seconds: float, size_bytes: int) -> dict:
    params, nonzeros = count_parameters(state.module)
    row: dict[str, Any] = {
        "stage": name,
        "seconds": round(seconds, 3),
        "parameters": params,
        "nonzeros": nonzeros,
        "sparsity": 1 - nonzeros / params if params else 0.0,
        "size_bytes": size_bytes,
        "weight_bits": _weight_bits(state),
    }
    if data.has("eval"):
        split = data["eval"]
        row.update(evaluate(state.module, split.x, split.y, reference_out))
    return row


def layer_table(state: ModelState) -> list[dict[str, Any]]:
    """Per weight tensor of the final model: shape, parameters, sparsity, stored bits."""
    rows = []
    for name, p in state.module.named_parameters():
        if p.dim() < 2:
            continue
        qt = state.quant.get(name)
        nonzero = int(torch.count_nonzero(p).item())
        rows.append({
            "name": name, "shape": list(p.shape), "parameters": p.numel(), "nonzeros": nonzero,
            "sparsity": 1 - nonzero / p.numel(), "bits": qt.bits if qt is not None else 32,
            "quantization": (qt.method or qt.granularity) if qt is not None else None,
        })
    return rows


def stored_bytes(state: ModelState) -> int:
    """Bytes of the model at its stored precision: quantized tensors as packed integers plus
    their scales/codebooks, everything else at its dtype's width (no entropy coding)."""
    total = 0
    for name, t in state.module.state_dict().items():
        qt = state.quant.get(name)
        total += -(-qt.storage_bits() // 8) if qt is not None else t.numel() * t.element_size()
    return total


def _weight_bits(state: ModelState) -> float:
    """Average stored bits per parameter: quantized ones at their width, the rest at 32."""
    params = dict(state.module.named_parameters())
    total = sum(p.numel() for p in params.values())
    if not total:
        return 0.0
    bits = sum(qt.codes.numel() * qt.bits for qt in state.quant.values())
    bits += 32 * sum(p.numel() for n, p in params.items() if n not in state.quant)
    return round(bits / total, 3)


BUNDLE_MAX_SAMPLES = 1000


def _write_bundle(dst: Path, onnx_path: Path, state: ModelState, split, recipe: Recipe, rows: list[dict]) -> Path:
    """The device bundle: the final ONNX, reference inputs/outputs from the final PyTorch
    model, labels, the onnxruntime settings export checked with, and the limits to re-check."""
    from compress.bundle import write_bundle
    from compress.onnx_signature import onnx_signature_of

    x = split.x[:BUNDLE_MAX_SAMPLES]
    outputs = predict(state.module, x).numpy()
    export_row = next(r for r in reversed(rows) if r["stage"] == "export")
    export_spec = next(s for s in reversed(recipe.stages) if s.name == "export")
    limits = {"min_agreement": export_spec.config.min_agreement}
    if recipe.doc.gates.max_latency_ms is not None:
        limits["max_latency_ms"] = recipe.doc.gates.max_latency_ms
    manifest = {
        "recipe": recipe.name,
        "input_shape": list(state.input_shape),
        "session": export_row["metrics"].get("ort_session", {}),
        "limits": limits,
        "lineage": [e["stage"] for e in state.lineage],
    }
    labels = split.y[:BUNDLE_MAX_SAMPLES].numpy() if split.y is not None else None
    signature = onnx_signature_of(state.module)
    # A model exported with named inputs gets one array per input, as the device feeds it.
    inputs = signature.feeds(x.numpy()) if signature is not None else x.numpy()
    return write_bundle(onnx_path, dst, inputs, outputs, labels, manifest)


def _publish_artifacts(artifacts: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """Copy the final artifacts (the latest stage's of each name) to the top of ``out_dir``."""
    published = {}
    for name, src in artifacts.items():
        dst = out_dir / name
        atomic_write(dst, lambda p, src=src: shutil.copyfile(src, p))
        published[name] = dst
    return published


def _check_gates(gates, rows: list[dict]) -> list[dict]:
    first, final = rows[0], rows[-1]
    results = []

    def add(gate: str, measured: float | None, limit: float, ok) -> None:
        if measured is None:
            results.append({"gate": gate, "measured": float("nan"), "limit": limit, "passed": False,
                            "reason": "not measured"})
        else:
            results.append({"gate": gate, "measured": measured, "limit": limit, "passed": bool(ok(measured, limit))})

    if gates.max_accuracy_drop is not None:
        drop = (first["accuracy"] - final["accuracy"]) if "accuracy" in final and "accuracy" in first else None
        add("max_accuracy_drop", drop, gates.max_accuracy_drop, lambda m, l: m <= l + 1e-12)
    if gates.min_accuracy is not None:
        add("min_accuracy", final.get("accuracy"), gates.min_accuracy, lambda m, l: m >= l)
    if gates.min_agreement is not None:
        add("min_agreement", final.get("agreement"), gates.min_agreement, lambda m, l: m >= l)
    if gates.min_cosine is not None:
        add("min_cosine", final.get("cosine"), gates.min_cosine, lambda m, l: m >= l)
    if gates.max_size_bytes is not None:
        size = final.get("final_size_bytes", final.get("size_bytes"))
        add("max_size_bytes", size, gates.max_size_bytes, lambda m, l: m <= l)
    if gates.max_latency_ms is not None:
        latency = next((r["latency_p50_ms"] for r in reversed(rows) if "latency_p50_ms" in r), None)
        add("max_latency_ms", latency, gates.max_latency_ms, lambda m, l: m <= l)
    return results
