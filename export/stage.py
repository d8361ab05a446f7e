"""The export stage: ONNX file, checker, onnxruntime parity and latency."""

from __future__ import annotations

import logging

import numpy as np

from compress.errors import InputError
from compress.export.config import ExportConfig
from compress.export.onnx_export import check_model, export_onnx, onnx_files, save_onnx, uses_external_data
from compress.fake_quant import quantized_inputs
from compress.metrics import predict
from compress.onnx_signature import onnx_signature_of
from compress.runtime import measure_latency, ort_predict, ort_session, row_cosine
from compress.state import ModelState, StageContext

log = logging.getLogger(__name__)

BATCH_COMPARE = 32  # the batch of the second float comparison (latency_vs_float_b32)


def apply(state: ModelState, config: ExportConfig, ctx: StageContext) -> ModelState:
    state.module.cpu()  # exported and checked on the CPU, as onnxruntime on the device runs it
    # A bfloat16 / float16 checkpoint is exported in float32: onnxruntime's CPU kernels (and its
    # N-bit and integer ones) compute in float32, and quantized weights are exact only there.
    with state.computing_in_float32():
        _export(state, config, ctx)
    return state


def _export(state: ModelState, config: ExportConfig, ctx: StageContext) -> None:
    path = ctx.out_dir / "model.onnx"
    # A model may declare named ONNX inputs (e.g. input_ids + attention_mask with dynamic
    # batch and sequence axes); parity and latency then feed them through the signature.
    signature = onnx_signature_of(state.module)
    example = state.example_input(batch=2 if config.dynamic_batch or signature is not None else 1)
    try:
        model = export_onnx(state.module, example, path, config.opset, config.exporter, config.dynamic_batch, signature)
    except Exception as err:
        if config.exporter != "dynamo":
            raise
        # torch.export refuses data-dependent control flow and the like: a model property.
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise InputError(
            f"export: the dynamo exporter cannot export {type(state.module).__name__} ({type(err).__name__}: {first}). "
            "Models with data-dependent control flow need export.exporter: legacy (which records the path "
            "taken on the example input; the parity check then tells whether that is enough)"
        ) from err
    fused_attention = 0
    if config.fuse_attention:
        from compress.export.attention import fuse_attention

        # Before the float reference is saved: the latency ratio then measures quantization alone.
        model, fused_attention = fuse_attention(model)
        if fused_attention and not state.quant:
            save_onnx(model, path, base_dir=ctx.out_dir)
    feeds = signature.feeds if signature is not None else None
    session_config: dict[str, str] = {}
    disabled = tuple(config.ort_disabled_fusions)
    float_path = None
    act_mode = state.extras.get("activation_quantization", {}).get("mode", "none")
    # Over EXTERNAL_DATA_THRESHOLD the weights sit in model.onnx.data beside the graph and
    # ``model`` holds only references: every step below streams them, none loads them all.
    external = uses_external_data(model)
    if state.quant and config.compare_float:
        import onnx

        float_path = ctx.out_dir / "float_reference.onnx"
        reference = onnx.ModelProto()
        reference.CopyFrom(model)  # save_onnx moves tensors out of the proto it writes
        save_onnx(reference, float_path, base_dir=ctx.out_dir, external=external)
        del reference
    if state.quant:
        from compress.export.quantized import DISABLED_OPTIMIZERS, quantize_onnx_model, session_config_for_exact_parity

        try:
            model = quantize_onnx_model(
                model,
                state.quant,
                _wrapped_names(state.module, signature),
                activations=state.extras.get("activation_quantization"),
                base_dir=ctx.out_dir,
                weight_only=config.weight_only_kernel,
            )
        except ValueError as err:
            # An architecture whose exported weights we cannot pin down: refuse (exit 2).
            raise InputError(
                f"export: {err}. Quantize only layers whose weights the exporter keeps as they run "
                "(quantize.skip), or try export.exporter: legacy"
            ) from err
        # External again only if the integer model is still over the threshold; the float
        # weights that stay are copied out of the float export's data file piece by piece.
        save_onnx(model, path, base_dir=ctx.out_dir)
        # exact: fp32 compute inside the fused N-bit kernels, parity with the PyTorch model;
        # otherwise onnxruntime's default, which quantizes activations to 8 bits (faster)
        session_config = session_config_for_exact_parity() if config.exact_quantized_kernels else {}
        disabled = tuple(dict.fromkeys(disabled + DISABLED_OPTIMIZERS))
    del model  # the checks below read the files
    check_model(path)
    files = onnx_files(path)
    ctx.artifacts["model.onnx"] = path
    if len(files) > 1:  # the weights' data file travels with the graph (final folder, bundle)
        ctx.artifacts[files[1].name] = files[1]

    split = ctx.data["eval"]
    x = split.x.numpy()
    session = ort_session(path, threads=config.threads, config=session_config, disabled_optimizers=disabled)
    # The PyTorch reference rounds activations as onnxruntime's integer kernels do
    # (compress.fake_quant), so the parity check measures the kernels, not the quantization;
    # dynamic ranges are per sample in both (an edge device runs one sample at a time).
    spec = state.extras.get("activation_quantization")
    # Dynamic activation ranges are per call: both sides run one sample at a time, so the
    # simulated rounding in PyTorch sees the same ranges as onnxruntime's kernels.
    dynamic = act_mode == "dynamic"
    ort_out = ort_predict(session, x, batch_size=1 if dynamic else 256, feeds=feeds)
    with quantized_inputs(state.module, spec):
        torch_out = predict(state.module, split.x, batch_size=1 if dynamic else 512).numpy()
    diff = np.abs(ort_out - torch_out)
    bound = config.atol + config.rtol * np.abs(torch_out)
    agreement = float((ort_out.argmax(1) == torch_out.argmax(1)).mean()) if ort_out.ndim == 2 else 1.0
    within = float((diff <= bound).mean())
    cosine = row_cosine(ort_out, torch_out)
    # Integer activations (fast N-bit kernels, dynamic/static activations) round every layer's
    # input: an elementwise tolerance is the wrong yardstick, the cosine is the honest one.
    fast = bool(state.quant) and (not config.exact_quantized_kernels or act_mode != "none")
    # The session settings the parity was measured with: a device bundle carries them.
    ctx.metrics["ort_session"] = {"config": session_config, "disabled_optimizers": list(disabled)}
    ctx.metrics.update(
        {
            "onnx_bytes": sum(f.stat().st_size for f in files),
            "onnx_external_data_bytes": sum(f.stat().st_size for f in files[1:]),
            "opset": config.opset,
            "fused_attention": fused_attention,
            "ort_max_abs_error": float(diff.max()),
            "ort_within_tolerance": within,
            "ort_agreement": agreement,
            "ort_cosine": float(cosine.mean()),
            "ort_cosine_min": float(cosine.min()),
            "ort_threads": config.threads,
            "ort_fast_kernels": fast,
            "activations": act_mode,
        }
    )
    if fast:
        ctx.checks.append(
            {
                "gate": "onnx_parity_cosine",
                "measured": float(cosine.min()),
                "limit": config.fast_kernel_min_cosine,
                "passed": bool(cosine.min() >= config.fast_kernel_min_cosine),
            }
        )
    else:
        ctx.checks.append(
            {"gate": "onnx_parity_within_tolerance", "measured": within, "limit": 1.0, "passed": within >= 1.0}
        )
    ctx.checks.append(
        {
            "gate": "onnx_top1_agreement",
            "measured": agreement,
            "limit": config.min_agreement,
            "passed": agreement >= config.min_agreement,
        }
    )
    if config.min_cosine is not None:
        ctx.checks.append(
            {
                "gate": "onnx_min_cosine",
                "measured": float(cosine.min()),
                "limit": config.min_cosine,
                "passed": bool(cosine.min() >= config.min_cosine),
            }
        )
    one = x[:1] if config.dynamic_batch or signature is not None else x[: example.shape[0]]
    example_one = np.ascontiguousarray(one)
    if float_path is not None:
        ctx.metrics.update(_latency_vs_float(session, float_path, example_one, config, feeds))
        if len(x) >= BATCH_COMPARE:  # small models are call-overhead bound at batch 1: show a batch too
            batch = np.ascontiguousarray(x[:BATCH_COMPARE])
            small = config.model_copy(update={"latency_runs": max(5, config.latency_runs // 10), "latency_warmup": 1})
            b = _latency_vs_float(session, float_path, batch, small, feeds)
            ctx.metrics[f"latency_b{BATCH_COMPARE}_p50_ms"] = b["latency_p50_ms"]
            ctx.metrics[f"float_latency_b{BATCH_COMPARE}_p50_ms"] = b["float_latency_p50_ms"]
            ctx.metrics[f"latency_vs_float_b{BATCH_COMPARE}"] = b["latency_vs_float"]
        for f in onnx_files(float_path):
            f.unlink()
    else:
        ctx.metrics.update(
            measure_latency(session, example_one, config.latency_runs, config.latency_warmup, feeds=feeds)
        )
    # What the runner acts on: the latency gate and the device bundle's limits and session.
    ctx.outputs.latency_p50_ms = ctx.metrics.get("latency_p50_ms")
    ctx.outputs.latency_p90_ms = ctx.metrics.get("latency_p90_ms")
    ctx.outputs.latency_vs_float = ctx.metrics.get("latency_vs_float")
    ctx.outputs.latency_vs_float_b32 = ctx.metrics.get(f"latency_vs_float_b{BATCH_COMPARE}")
    ctx.outputs.bundle_limits = {"min_agreement": config.min_agreement}
    ctx.outputs.runtime_session = ctx.metrics["ort_session"]
    if config.ort_format:
        from compress.runtime import save_ort_format

        ort_path = save_ort_format(path, ctx.out_dir / "model.ort", session_config, disabled)
        ort_file_out = ort_predict(
            ort_session(ort_path, threads=config.threads, config=session_config),
            x,
            batch_size=1 if act_mode == "dynamic" else 256,
            feeds=feeds,
        )
        if fast:  # the same integer kernels as the .onnx file: compare with its output, judge by cosine
            ort_diff = float(np.abs(ort_file_out - ort_out).max())
            ort_cos = float(row_cosine(ort_file_out, torch_out).min())
            passed, measured, limit = ort_cos >= config.fast_kernel_min_cosine, ort_cos, config.fast_kernel_min_cosine
        else:
            ort_diff = float(np.abs(ort_file_out - torch_out).max())
            passed, measured, limit = bool(np.all(np.abs(ort_file_out - torch_out) <= bound)), ort_diff, config.atol
        ctx.metrics.update({"ort_format_bytes": ort_path.stat().st_size, "ort_format_max_abs_error": ort_diff})
        ctx.checks.append({"gate": "ort_format_parity", "measured": measured, "limit": limit, "passed": bool(passed)})
        ctx.artifacts["model.ort"] = ort_path
    log.info(
        "exported %s (%d bytes), max abs error %.3g, agreement %.4f",
        path,
        ctx.metrics["onnx_bytes"],
        ctx.metrics["ort_max_abs_error"],
        agreement,
    )


def _latency_vs_float(session, float_path, example: np.ndarray, config: ExportConfig, feeds) -> dict:
    """Latency of ``session`` and of the float export, measured in interleaved rounds (so a
    busy machine slows both alike), with the ratio of their medians."""
    # the float twin under the same graph transformers as the model (the export's fusions)
    float_session = ort_session(
        float_path, threads=config.threads, disabled_optimizers=tuple(config.ort_disabled_fusions)
    )
    rounds = 5
    runs = max(1, config.latency_runs // rounds)
    ours: list[float] = []
    ref: list[float] = []
    warm = config.latency_warmup
    for _ in range(rounds):
        ours += measure_latency(session, example, runs, warm, feeds=feeds)["latency_ms_samples"]
        ref += measure_latency(float_session, example, runs, warm, feeds=feeds)["latency_ms_samples"]
        warm = 1
    out = _percentiles(np.asarray(ours))
    out["latency_ms_samples"] = ours
    out["float_latency_p50_ms"] = float(np.percentile(ref, 50))
    out["latency_vs_float"] = out["latency_p50_ms"] / max(out["float_latency_p50_ms"], 1e-12)
    return out


def _percentiles(times: np.ndarray) -> dict:
    return {f"latency_p{p}_ms": float(np.percentile(times, p)) for p in (50, 90, 99)}


def _wrapped_names(module, signature) -> dict[str, str] | None:
    """Parameter name in ``module`` → its name under the signature's export wrapper (by identity)."""
    if signature is None:
        return None
    own = {id(p): n for n, p in module.named_parameters()}
    return {own[id(p)]: n for n, p in signature.module.named_parameters() if id(p) in own}
