"""The ``quantize`` stage: quantize the weights of Linear/Conv layers (biases stay float).

Fills ``state.quant`` with one ``QuantizedTensor`` per quantized weight, writes the
dequantized values into the module (``state.sync_quantized``) and reports per-layer bits and
errors under ``ctx.metrics["quantize"]``.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from compress.qtensor import QuantizedTensor
from compress.state import ModelState, StageContext
from quantize.config import CodebookConfig, GPFQConfig, RTNConfig
from quantize.gpfq import AUTO_SCALE_FACTORS, QUANTIZABLE, LayerPlan, gpfq_quantize_model
from quantize.rtn import as_matrix, rtn_quantize

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


def _weight_rel_error(qt: QuantizedTensor, weight: torch.Tensor) -> float:
    w = weight.detach().float()
    return ((qt.dequantize() - w).norm() / w.norm().clamp_min(1e-30)).item()


def apply(state: ModelState, config: RTNConfig | GPFQConfig | CodebookConfig, ctx: StageContext) -> ModelState:
    """Quantize ``state.module``'s selected weights with ``config.method``.

    Args:
        state: the model; pruning masks in ``state.masks`` are honoured (pruned weights stay 0).
        config: an ``RTNConfig``, ``GPFQConfig`` or ``CodebookConfig``.
        ctx: calibration data (GPFQ), the train split (codebook fine-tuning), metrics sink.

    Returns:
        ``state`` with ``quant`` filled and the module holding the dequantized weights.
    """
    start = time.perf_counter()
    module = state.module
    params = state.parameters_by_name()
    chosen = select_layers(module, config)
    masks = {name: state.masks.get(f"{name}.weight") for name in chosen}
    report: dict[str, dict] = {}
    new: dict[str, QuantizedTensor] = {}

    if isinstance(config, RTNConfig):
        for name, bits in chosen.items():
            w = params[f"{name}.weight"]
            qt = rtn_quantize(
                w, bits, granularity=config.granularity, group_size=config.group_size,
                symmetric=config.symmetric, mask=masks[name],
            )
            new[f"{name}.weight"] = qt
            report[name] = {"bits": bits, "granularity": qt.granularity, "weight_rel_error": _weight_rel_error(qt, w)}
    elif isinstance(config, GPFQConfig):
        calib = ctx.data.calibration().x
        if config.calibration_samples is not None and config.calibration_samples < len(calib):
            g = torch.Generator().manual_seed(ctx.seed)
            calib = calib[torch.randperm(len(calib), generator=g)[: config.calibration_samples]]
        plans = {
            name: LayerPlan(bits, config.granularity, config.group_size, config.symmetric, masks[name])
            for name, bits in chosen.items()
        }
        new, report = gpfq_quantize_model(
            module, calib, plans,
            scale_factor=AUTO_SCALE_FACTORS if config.scale_factor == "auto" else config.scale_factor,
            range_quantile=config.range_quantile,
            sparsity=config.sparsity, sparsity_lambda=config.sparsity_lambda,
            bias_correction=config.bias_correction, batch_size=config.batch_size,
            max_patches=config.max_patches, block_size=config.block_size, seed=ctx.seed,
        )
    elif isinstance(config, CodebookConfig):
        new, report = _codebook(state, config, ctx, chosen, masks)
    else:
        raise ValueError(f"unknown quantize config {type(config).__name__}; use method rtn, gpfq or codebook")

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


def _codebook(state: ModelState, config: CodebookConfig, ctx: StageContext, chosen: dict[str, int], masks: dict):
    from compress.train import cross_entropy, fit, kd_loss
    from quantize.codebook import codebook_quantize, finetune_codebooks

    params = state.parameters_by_name()
    floats = {name: params[f"{name}.weight"].detach().clone() for name in chosen}
    new: dict[str, QuantizedTensor] = {}
    for name, bits in chosen.items():
        new[f"{name}.weight"] = codebook_quantize(
            params[f"{name}.weight"], bits, mask=masks[name], n_codebooks=config.codebooks_per_layer,
            iterations=config.iterations, init=config.init,
        )
    report = {
        name: {
            "bits": bits,
            "codebooks": int(new[f"{name}.weight"].codebook.shape[0]),
            "weight_rel_error": _weight_rel_error(new[f"{name}.weight"], floats[name]),
        }
        for name, bits in chosen.items()
    }
    if config.finetune is not None and config.finetune.epochs > 0 and new:
        train = ctx.data["train"]
        # Biases and float layers stay as they are: only the centroids move.
        with torch.no_grad():
            for pname, qt in new.items():
                params[pname].copy_(qt.dequantize())
        labelled = train.y is not None
        loss_fn = cross_entropy if labelled else kd_loss()
        teacher = None if labelled else ctx.reference

        def run(model, cb_params, after_step):
            return fit(model, train.x, train.y, config.finetune, loss_fn=loss_fn, teacher=teacher,
                       params=cb_params, after_step=after_step)

        new = finetune_codebooks(state.module, new, run)
        for name in chosen:
            report[name]["finetuned_weight_rel_error"] = _weight_rel_error(new[f"{name}.weight"], floats[name])
    return new, report


def masks_respected(state: ModelState) -> bool:
    """Whether every pruned weight of a quantized parameter dequantizes to exactly 0."""
    for name, qt in state.quant.items():
        mask = state.masks.get(name)
        if mask is not None and (as_matrix(qt.dequantize())[~as_matrix(mask).bool()] != 0).any():
            return False
    return True
