"""Edge validation: check an ONNX model (or a device bundle) on the device itself.

Imports only numpy, onnxruntime and the standard library (plus zstandard to open a
bundle) — never torch — so it runs where the model will run. It measures output parity
against reference outputs from the pipeline, accuracy when labels exist, latency
percentiles, peak memory and model size, and checks them against limits.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import DataError, InputError, ModelLoadError

log = logging.getLogger(__name__)

VALIDATE_REPORT_VERSION = 1


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _check_input(session, x: np.ndarray) -> np.ndarray:
    spec = session.get_inputs()[0]
    want = {"tensor(float)": np.float32, "tensor(int64)": np.int64}.get(spec.type)
    if want is not None:
        x = x.astype(want, copy=False)
    if len(spec.shape) != x.ndim or any(isinstance(d, int) and d != n for d, n in zip(spec.shape[1:], x.shape[1:])):
        raise DataError(f"data samples have shape {list(x.shape[1:])}; the model's input {spec.name!r} is {spec.shape}")
    return np.ascontiguousarray(x)


def _check_named_inputs(session, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    want = {i.name: i for i in session.get_inputs()}
    if set(arrays) != set(want):
        raise DataError(f"the model's inputs are {sorted(want)}; the data has {sorted(arrays)}")
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise DataError(f"the named inputs have different sample counts: { {k: len(v) for k, v in arrays.items()} }")
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
    return {k: np.ascontiguousarray(v.astype(types.get(want[k].type, v.dtype), copy=False)) for k, v in arrays.items()}


def check_limits(
    min_agreement: float | None = None,
    max_latency_ms: float | None = None,
    max_abs_error: float | None = None,
    expect_sha256: str | None = None,
) -> None:
    """Refuse impossible limits before any work starts."""
    import math
    import re

    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise InputError(f"--min-agreement must be a fraction between 0 and 1, got {min_agreement}")
    if max_latency_ms is not None and not (math.isfinite(max_latency_ms) and max_latency_ms > 0):
        raise InputError(f"--max-latency-ms must be a positive number of milliseconds, got {max_latency_ms}")
    if max_abs_error is not None and not (math.isfinite(max_abs_error) and max_abs_error >= 0):
        raise InputError(f"--max-abs-error must be a finite number >= 0, got {max_abs_error}")
    if expect_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expect_sha256):
        raise InputError(f"--expect-sha256 must be 64 hexadecimal digits, got {expect_sha256!r}")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _numeric(name: str, a: np.ndarray, where: Path | str) -> np.ndarray:
    if a.dtype.kind not in "fiub":
        raise DataError(f"{where}: array {name!r} must be numeric, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DataError(f"{where}: array {name!r} holds NaN or infinite values")
    return a


def validate(
    path: Path,
    data: Path | None = None,
    reference: Path | None = None,
    threads: int = 1,
    max_latency_ms: float | None = None,
    min_agreement: float | None = None,
    max_abs_error: float | None = None,
    runs: int = 100,
    warmup: int = 10,
    expect_sha256: str | None = None,
) -> dict[str, Any]:
    """Validate ``path`` (an ``.onnx`` file or a device bundle from ``compress run``).

    A bundle brings its own inputs, reference outputs, labels, session settings and
    limits; explicit arguments override its limits. A bundle's checksums prove it is
    intact, not who made it: anyone can re-pack a self-consistent bundle with relaxed
    limits. ``expect_sha256`` (the value ``report.json`` records) ties the file to the run
    that made it.

    Returns:
        The report: ``{"passed", "checks", "parity", "accuracy", "latency", ...}``.
    """
    from compress.bundle import is_bundle, open_bundle
    from compress.lossless.files import onnx_external_data
    from compress.runtime import measure_latency, ort_predict, ort_session, row_cosine

    path = Path(path)
    check_limits(min_agreement, max_latency_ms, max_abs_error, expect_sha256)
    if not path.is_file():
        raise InputError(f"not found: {path}")
    digest = _sha256(path)
    if expect_sha256 is not None and digest != expect_sha256.lower():
        raise InputError(
            f"{path}: SHA-256 is {digest}, expected {expect_sha256.lower()}; this is not the file the run produced"
        )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compress-validate-") as tmp:
        manifest: dict[str, Any] = {}
        labels = ref = None
        if is_bundle(path):
            bundle = open_bundle(path, Path(tmp))
            model, x, ref, labels, manifest = (
                bundle.model,
                bundle.inputs,
                bundle.outputs,
                bundle.labels,
                bundle.manifest,
            )
            limits = manifest.get("limits", {})
            min_agreement = limits.get("min_agreement") if min_agreement is None else min_agreement
            max_latency_ms = limits.get("max_latency_ms") if max_latency_ms is None else max_latency_ms
            max_abs_error = limits.get("max_abs_error") if max_abs_error is None else max_abs_error
        else:
            model = path
            if data is None:
                raise InputError(
                    f"{path} is not a bundle: give the inputs with --data DATA.npz (array 'x', optional labels 'y')"
                )
            arrays = _load_npz(Path(data), "data")
            if "x" in arrays:
                x = arrays["x"]
            elif arrays and {k for k in arrays if k != "y"}:
                x = {k: v for k, v in arrays.items() if k != "y"}  # one array per named ONNX input
            else:
                raise DataError(f"{data}: no array named 'x' (found: {', '.join(sorted(arrays)) or 'nothing'})")
            if isinstance(x, dict):
                x = {k: _numeric(k, v, data) for k, v in x.items()}
            else:
                x = _numeric("x", x, data)
            labels = arrays.get("y")
            if labels is not None and labels.dtype.kind not in "iu":
                raise DataError(f"{data}: labels 'y' must be integers, got dtype {labels.dtype}")
            if reference is not None:
                refs = _load_npz(Path(reference), "reference")
                if "outputs" not in refs:
                    raise DataError(f"{reference}: no array named 'outputs'")
                ref = _numeric("outputs", refs["outputs"], reference)
                if len(ref) != len(x):
                    raise DataError(f"{reference} has {len(ref)} outputs for {len(x)} inputs")
        session_settings = manifest.get("session", {})
        # A model over 2 GB keeps its weights in a data file beside it: a missing or cut
        # file is named here, not left to onnxruntime's message about an offset.
        data_files = [model.with_name(name) for name in onnx_external_data(model)]
        try:
            session = ort_session(
                model,
                threads=threads,
                config=session_settings.get("config"),
                disabled_optimizers=tuple(session_settings.get("disabled_optimizers", ())),
            )
        except Exception as err:
            raise ModelLoadError(
                f"{path}: onnxruntime cannot load the model ({str(err).splitlines()[0][:300]})"
            ) from None
        feeds: Callable[[np.ndarray], dict] | None = None
        if isinstance(x, dict):  # several named inputs: feed rows of each by sample index
            named = _check_named_inputs(session, x)
            x = np.arange(len(next(iter(named.values()))))

            def named_feeds(idx: np.ndarray, named: dict = named) -> dict:
                return {k: v[idx] for k, v in named.items()}

            feeds = named_feeds
        else:
            x = _check_input(session, x)
        out = ort_predict(session, x, feeds=feeds)
        latency = measure_latency(session, x[:1], runs, warmup, feeds=feeds)
        model_bytes = model.stat().st_size + sum(f.stat().st_size for f in data_files)

    report: dict[str, Any] = {
        "report_version": VALIDATE_REPORT_VERSION,
        "model": str(path),
        "model_bytes": model_bytes,
        "file_bytes": path.stat().st_size,
        "samples": len(out),
        "latency": {k: v for k, v in latency.items() if not k.endswith("samples")},
        "environment": {
            "onnxruntime": __import__("onnxruntime").__version__,
            "numpy": np.__version__,
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": threads,
            "platform": platform.platform(),
        },
    }
    report["sha256"] = digest
    checks: list[dict[str, Any]] = []
    if labels is not None:
        if len(labels) != len(out):
            raise DataError(f"{len(labels)} labels for {len(out)} outputs")
        report["accuracy"] = float((out.argmax(1) == labels).mean())
    if ref is not None and ref.shape != out.shape:
        raise DataError(
            f"the model's outputs have shape {list(out.shape)} but the reference outputs {list(ref.shape)}: "
            "the model does not match the reference it is checked against"
        )
    if ref is not None:
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        cos = row_cosine(out, ref)
        parity = {"max_abs_error": float(diff.max()), "cosine": float(cos.mean())}
        if out.ndim == 2 and out.shape[1] > 1:
            parity["agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
        report["parity"] = parity
        if min_agreement is not None and "agreement" in parity:
            checks.append(
                _check("min_agreement", parity["agreement"], min_agreement, parity["agreement"] >= min_agreement)
            )
        if max_abs_error is not None:
            checks.append(
                _check(
                    "max_abs_error", parity["max_abs_error"], max_abs_error, parity["max_abs_error"] <= max_abs_error
                )
            )
    elif min_agreement is not None:
        raise InputError("--min-agreement needs reference outputs (--reference REF.npz, or a bundle)")
    if max_latency_ms is not None:
        p50 = latency["latency_p50_ms"]
        checks.append(_check("max_latency_ms", p50, max_latency_ms, p50 <= max_latency_ms))
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report["peak_rss_mb"] = rss / (1 << 20) if platform.system() == "Darwin" else rss / 1024
    report["checks"] = checks
    report["passed"] = all(c["passed"] for c in checks)
    report["seconds"] = time.perf_counter() - started
    return report


def _check(gate: str, measured: float, limit: float, passed: bool) -> dict[str, Any]:
    return {"gate": gate, "measured": float(measured), "limit": float(limit), "passed": bool(passed)}
