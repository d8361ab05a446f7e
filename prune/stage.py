"""The prune stage: dispatch on ``method`` and report the model's size honestly.

Unstructured methods (magnitude, lottery) leave shapes alone and set ``state.masks``: the
dense size does not change, the zeros pay off only through the lossless stage or sparse
formats. Variance pruning replaces Linear modules by smaller ones: parameters drop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torch import nn

from compress.registry import method_for

if TYPE_CHECKING:
    from compress.prune.config import LotteryConfig, MagnitudeConfig, VarianceConfig
    from compress.state import ModelState, StageContext

log = logging.getLogger(__name__)


def size_metrics(module: nn.Module) -> dict[str, Any]:
    """Parameters, nonzeros, sparsity and dense bytes (every state tensor at its dtype's width)."""
    from compress.metrics import model_size

    size = model_size(module)
    return {k: size[k] for k in ("parameters", "nonzeros", "sparsity", "dense_bytes")}


def apply(state: ModelState, config: MagnitudeConfig | VarianceConfig | LotteryConfig, ctx: StageContext) -> ModelState:
    """Prune ``state`` as ``config`` says; fills ``ctx.metrics``.

    Raises:
        ValueError: an unknown method or a config the model cannot satisfy.
    """
    from compress.prune.training import evaluate_split

    method_fn = method_for("prune", config)
    method = config.method
    before = size_metrics(state.module)
    ctx.metrics["method"] = method
    ctx.metrics["accuracy_before"] = evaluate_split(state.module, ctx)
    ctx.metrics["before"] = before
    state = method_fn(state, config, ctx)
    after = size_metrics(state.module)
    ctx.metrics.update(after)
    ctx.metrics["accuracy_after"] = evaluate_split(state.module, ctx)
    ctx.metrics["parameter_reduction"] = 1 - after["parameters"] / before["parameters"] if before["parameters"] else 0.0
    state.extras["prune"] = {
        "method": method,
        "parameters": after["parameters"],
        "nonzeros": after["nonzeros"],
        "sparsity": after["sparsity"],
    }
    log.info(
        "prune (%s): %d -> %d parameters, %d nonzero (sparsity %.1f%%), accuracy %s -> %s",
        method,
        before["parameters"],
        after["parameters"],
        after["nonzeros"],
        100 * after["sparsity"],
        ctx.metrics["accuracy_before"],
        ctx.metrics["accuracy_after"],
    )
    return state
