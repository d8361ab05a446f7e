"""onnxruntime on the CPU, the way an edge device runs a model.

This module imports only numpy and onnxruntime (never torch or onnx), so the edge
``validate`` path and the pipeline's export checks share one implementation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Turns a batch of samples into the session's feeds (several named inputs); None feeds the
# batch to the model's only input.
Feeds = Callable[[np.ndarray], dict]


def ort_session(
    path: Path,
    threads: int = 1,
    optimized_path: Path | None = None,
    config: dict | None = None,
    disabled_optimizers: tuple[str, ...] = (),
    optimization: str = "all",
):
    """A CPU InferenceSession as an edge device would create it.

    ``optimization`` is onnxruntime's graph optimization level: ``basic`` (portable
    rewrites only), ``extended`` or ``all`` (hardware-specific layouts).
    """
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    return ort.InferenceSession(
        str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers)
    )


def _feed(session, x: np.ndarray, feeds: Feeds | None) -> dict:
    return {session.get_inputs()[0].name: x} if feeds is None else feeds(x)


def ort_predict(session, x: np.ndarray, batch_size: int = 256, feeds: Feeds | None = None) -> np.ndarray:
    """The first output of ``session`` on ``x``, in batches of ``batch_size`` samples.

    ``feeds`` maps a batch to named inputs (a model exported with an ``OnnxSignature``,
    e.g. ``input_ids`` and ``attention_mask``); by default the batch is the only input.
    """
    outs = [session.run(None, _feed(session, x[i : i + batch_size], feeds))[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def measure_latency(
    session, example: np.ndarray, runs: int = 100, warmup: int = 10, feeds: Feeds | None = None
) -> dict[str, Any]:
    """Wall-clock latency percentiles (ms) of single runs on ``example`` (fed as in
    ``ort_predict``), and every sample."""
    feed = _feed(session, example, feeds)
    for _ in range(warmup):
        session.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times[i] = (time.perf_counter() - t0) * 1e3
    return {
        "latency_p50_ms": float(np.percentile(times, 50)),
        "latency_p90_ms": float(np.percentile(times, 90)),
        "latency_p99_ms": float(np.percentile(times, 99)),
        "latency_ms_samples": [round(float(t), 5) for t in times],
    }


def save_ort_format(
    onnx_path: Path, ort_path: Path, config: dict | None = None, disabled_optimizers: tuple[str, ...] = ()
) -> Path:
    """Convert to onnxruntime's ORT format (for minimal/mobile onnxruntime builds).

    The graph is saved after *extended* optimizations: that fuses int4/int8 weights into
    MatMulNBits (the ORT format cannot hold INT4 initializers themselves) but applies none
    of the CPU-specific layout transformations of level ``all``, so the file stays portable
    across CPUs. The write is atomic.
    """
    tmp = ort_path.with_name(ort_path.name + ".tmp")
    entries = dict(config or {})
    entries["session.save_model_format"] = "ORT"
    ort_session(
        onnx_path, optimized_path=tmp, config=entries, disabled_optimizers=disabled_optimizers, optimization="extended"
    )
    tmp.replace(ort_path)
    return ort_path


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened output in ``a`` and ``b`` (float64)."""
    a2 = a.reshape(len(a), -1).astype(np.float64)
    b2 = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return (a2 * b2).sum(1) / np.maximum(norms, 1e-30)
