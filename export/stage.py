"""The export stage: ONNX file, checker, onnxruntime parity and latency."""

from __future__ import annotations

import logging

import numpy as np

from compress.metrics import predict
from compress.onnx_signature import onnx_signature_of
from compress.state import ModelState, StageContext
from compress.export.config import ExportConfig
from compress.export.onnx_export import check_model, export_onnx
from compress.export.runtime import measure_latency, ort_predict, ort_session, row_cosine

log = logging.getLogger(__name__)


def apply(state: ModelState, config: ExportConfig, ctx: StageContext) -> ModelState:
    path = ctx.out_dir / "model.onnx"
    # A model may declare named ONNX inputs (e.g. input_ids + attention_mask with dynamic
    # batch and sequence axes); parity and latency then feed them through the signature.
    signature = onnx_signature_of(state.module)
    example = state.example_input(batch=2 if config.dynamic_batch or signature is not None else 1)
    model = export_onnx(state.module, example, path, config.opset, config.exporter, config.dynamic_batch, signature)
    feeds = signature.feeds if signature is not None else None
    session_config: dict[str, str] = {}
    disabled: tuple[str, ...] = ()
    if state.quant:
        import onnx

        from compress.export.quantized import DISABLED_OPTIMIZERS, quantize_onnx_model, session_config_for_exact_parity

        model = quantize_onnx_model(model, state.quant, _wrapped_names(state.module, signature),
                                    activations=state.extras.get("activation_quantization"))
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(path)
        # exact: fp32 compute inside the fused N-bit kernels, parity with the PyTorch model;
        # otherwise onnxruntime's default, which quantizes activations to 8 bits (faster)
        session_config = session_config_for_exact_parity() if config.exact_quantized_kernels else {}
        disabled = DISABLED_OPTIMIZERS
    check_model(path)
    ctx.artifacts["model.onnx"] = path

    split = ctx.data["eval"]
    x = split.x.numpy()
    session = ort_session(path, threads=config.threads, config=session_config, disabled_optimizers=disabled)
    ort_out = ort_predict(session, x, feeds=feeds)
    torch_out = predict(state.module, split.x).numpy()
    diff = np.abs(ort_out - torch_out)
    bound = config.atol + config.rtol * np.abs(torch_out)
    agreement = float((ort_out.argmax(1) == torch_out.argmax(1)).mean()) if ort_out.ndim == 2 else 1.0
    within = float((diff <= bound).mean())
    cosine = row_cosine(ort_out, torch_out)
    # The session settings the parity was measured with: a device bundle carries them.
    ctx.metrics["ort_session"] = {"config": session_config, "disabled_optimizers": list(disabled)}
    ctx.metrics.update(
        {
            "onnx_bytes": path.stat().st_size,
            "opset": config.opset,
            "ort_max_abs_error": float(diff.max()),
            "ort_within_tolerance": within,
            "ort_agreement": agreement,
            "ort_cosine": float(cosine.mean()),
            "ort_cosine_min": float(cosine.min()),
            "ort_threads": config.threads,
        }
    )
    ctx.checks.append(
        {"gate": "onnx_parity_within_tolerance", "measured": within, "limit": 1.0, "passed": within >= 1.0}
    )
    ctx.checks.append(
        {"gate": "onnx_top1_agreement", "measured": agreement, "limit": config.min_agreement,
         "passed": agreement >= config.min_agreement}
    )
    if config.min_cosine is not None:
        ctx.checks.append(
            {"gate": "onnx_min_cosine", "measured": float(cosine.min()), "limit": config.min_cosine,
             "passed": bool(cosine.min() >= config.min_cosine)}
        )
    one = x[:1] if config.dynamic_batch or signature is not None else x[: example.shape[0]]
    ctx.metrics.update(
        measure_latency(session, np.ascontiguousarray(one), config.latency_runs, config.latency_warmup, feeds=feeds)
    )
    if config.ort_format:
        from compress.export.runtime import save_ort_format

        ort_path = save_ort_format(path, ctx.out_dir / "model.ort", session_config, disabled)
        ort_file_out = ort_predict(ort_session(ort_path, threads=config.threads, config=session_config), x, feeds=feeds)
        ort_diff = float(np.abs(ort_file_out - torch_out).max())
        ctx.metrics.update({"ort_format_bytes": ort_path.stat().st_size, "ort_format_max_abs_error": ort_diff})
        ctx.checks.append(
            {"gate": "ort_format_parity", "measured": ort_diff, "limit": config.atol,
             "passed": bool(np.all(np.abs(ort_file_out - torch_out) <= bound))}
        )
        ctx.artifacts["model.ort"] = ort_path
    log.info("exported %s (%d bytes), max abs error %.3g, agreement %.4f",
             path, ctx.metrics["onnx_bytes"], ctx.metrics["ort_max_abs_error"], agreement)
    return state


def _wrapped_names(module, signature) -> dict[str, str] | None:
    """Parameter name in ``module`` → its name under the signature's export wrapper (by identity)."""
    if signature is None:
        return None
    own = {id(p): n for n, p in module.named_parameters()}
    return {own[id(p)]: n for n, p in signature.module.named_parameters() if id(p) in own}
