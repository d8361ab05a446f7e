"""The ``quantize`` stage: quantize the weights of Linear/Conv layers (biases stay float).

Fills ``state.quant`` with one ``QuantizedTensor`` per quantized weight, writes the
dequantized values into the module (``state.sync_quantized``) and reports per-layer bits and
errors under ``ctx.metrics["quantize"]``.
"""

from __future__ import annotations

import logging
import time

from torch import nn

from compress.state import ModelState, StageContext
from compress.quantize.config import CodebookConfig, GPFQConfig, RTNConfig
from compress.quantize.gpfq import QUANTIZABLE
from compress.quantize.rtn import as_matrix
from compress.registry import method_for

log = logging.getLogger(__name__)


def select_layers(module: nn.Module, config: RTNConfig | GPFQConfig | CodebookConfig) -> dict[str, int]:
    """The Linear/Conv layers the config quantizes, by name, with their bit widths."""
    chosen = {
        name: config.bits_for(name)
        for name, mod in module.named_modules()
        if isinstance(mod, QUANTIZABLE) and config.selects(name)
    }
    if not chosen:
        log.warning("quantize: no Linear/Conv layer matches layers=%s skip=%s", config.layers, config.skip)
    return chosen


def apply(state: ModelState, config: RTNConfig | GPFQConfig | CodebookConfig, ctx: StageContext) -> ModelState:
    """Quantize ``state.module``'s selected weights with ``config.method``.

    Args:
        state: the model; pruning masks in ``state.masks`` are honoured (pruned weights stay 0).
        config: the config of a registered quantize method (``rtn``, ``gpfq``, ``codebook``, ...);
            the method's function gets ``(state, config, ctx, chosen, masks)`` and returns the
            new quantized tensors by parameter name plus a report row per layer.
        ctx: calibration data (GPFQ), the train split (codebook fine-tuning), metrics sink.

    Returns:
        ``state`` with ``quant`` filled and the module holding the dequantized weights.
    """
    start = time.perf_counter()
    module = state.module
    chosen = select_layers(module, config)
    masks = {name: state.masks.get(f"{name}.weight") for name in chosen}
    activations = getattr(config, "activations", "none")
    if activations != "none":
        # Ranges come from the float model, before any weight moves; GPFQ then sees the
        # quantized activations in its X̃ (compress.quantize.activations.quantized_inputs).
        from compress.quantize.activations import EXTRAS_KEY, activation_spec

        calib = ctx.data.calibration().x if activations == "static" else None
        state.extras[EXTRAS_KEY] = activation_spec(module, sorted(chosen), calib, config, seed=ctx.seed)
    new, report = method_for("quantize", config)(state, config, ctx, chosen, masks)
    embedding_bits = getattr(config, "embedding_bits", None)
    if embedding_bits is not None:
        from compress.quantize.activations import quantize_embeddings

        tables = quantize_embeddings(module, embedding_bits, state.masks)
        if not tables:
            log.warning("quantize: embedding_bits=%d but the model has no nn.Embedding", embedding_bits)
        new.update({k: v for k, v in tables.items() if k not in new})
        report.update({k.rsplit(".", 1)[0]: {"bits": embedding_bits, "granularity": "per_row"} for k in tables})

    replaced = sorted(set(new) & set(state.quant))
    if replaced:
        log.info("quantize: re-quantizing %s", replaced)
    state.quant.update(new)
    state.sync_quantized()
    if state.masks:
        state.apply_masks()

    quantized = sum(qt.codes.numel() for qt in new.values())
    stored = sum(qt.storage_bits() for qt in new.values())
    ctx.metrics["quantize"] = {
        "method": config.method,
        "seconds": time.perf_counter() - start,
        "layers": report,
        "quantized_weights": quantized,
        "bits_per_weight": stored / quantized if quantized else float("nan"),
        "float_layers": sorted(
            n for n, m in module.named_modules() if isinstance(m, QUANTIZABLE) and n not in chosen
        ),
    }
    log.info("quantize (%s): %d layers, %.2f bits/weight", config.method, len(new), ctx.metrics["quantize"]["bits_per_weight"])
    return state


def masks_respected(state: ModelState) -> bool:
    """Whether every pruned weight of a quantized parameter dequantizes to exactly 0."""
    for name, qt in state.quant.items():
        mask = state.masks.get(name)
        if mask is not None and (as_matrix(qt.dequantize())[~as_matrix(mask).bool()] != 0).any():
            return False
    return True
