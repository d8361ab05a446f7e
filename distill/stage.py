"""The ``distill`` stage: train a student from the model entering the stage.

The teacher is a frozen copy of ``state.module`` (the model entering the stage), not
``ctx.reference`` (the pipeline's input model): the two coincide when distill runs first,
and after other stages the stage distils what those stages produced. The returned state
holds the student; masks and quantization of the incoming model do not carry over (the
student's weights are new), except that ``quantized`` and ``differentiable_quantization``
fill ``state.quant`` with the student's stored integer weights.

Metrics (``ctx.metrics``): teacher and student accuracy on the eval split (when present),
student parameters, stored bits and size, training time; born-again adds every generation's
accuracy and the ensemble's.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from torch import nn

from compress.distill.config import BornAgainConfig, DiffQuantConfig, KDConfig, QuantizedDistillConfig
from compress.distill.kd import frozen_copy
from compress.metrics import count_parameters, evaluate, model_size
from compress.qtensor import QuantizedTensor
from compress.registry import method_for
from compress.state import ModelState, StageContext

log = logging.getLogger(__name__)


def storage_bytes(module: nn.Module, quant: dict[str, QuantizedTensor]) -> int:
    """Bytes to store ``module``: quantized weights at their width (plus scales/codebooks), the rest at their dtype's."""
    return int(model_size(module, quant)["stored_bytes"])


def _describe(module: nn.Module, quant: dict[str, QuantizedTensor]) -> dict:
    params, _ = count_parameters(module)
    q_weights = sum(qt.numel for qt in quant.values())
    return {
        "student_parameters": params,
        "student_quantized_parameters": q_weights,
        "student_bits": sorted({qt.bits for qt in quant.values()}) or [32],
        "student_size_bytes": storage_bytes(module, quant),
    }


def apply(
    state: ModelState, config: KDConfig | QuantizedDistillConfig | DiffQuantConfig | BornAgainConfig, ctx: StageContext
) -> ModelState:
    """Distil ``state.module`` into a student with ``config.method``.

    Args:
        state: the model entering the stage (the teacher).
        config: the config of a registered distill method; the method's function gets
            ``(state, teacher, config, ctx)`` and returns ``(student, quant, summary)`` with
            ``summary`` holding at least ``seconds`` and ``final_loss``.
        ctx: the train split (``ctx.data["train"]``), the eval split if any, the seed, the metrics sink.

    Returns:
        A new state whose module is the student (quantized methods: with ``quant`` filled).
    """
    start = time.perf_counter()
    has_eval = ctx.data.has("eval")
    ev = ctx.data["eval"] if has_eval else None
    teacher = frozen_copy(state.module)
    if state.masks or state.quant:
        log.info("distill: the student is a new set of weights; incoming masks/quantization are not carried over")
    metrics = ctx.metrics
    metrics["method"] = config.method
    if ev is not None and ev.y is not None:
        metrics["teacher_accuracy"] = evaluate(teacher, ev.x, ev.y)["accuracy"]

    student, quant, summary = method_for("distill", config)(state, teacher, config, ctx)
    student.eval()
    metrics["train_seconds"] = round(summary["seconds"], 3)
    metrics["final_loss"] = summary["final_loss"]
    metrics.update(_describe(student, quant))
    if ev is not None and ev.y is not None:
        metrics["student_accuracy"] = evaluate(student, ev.x, ev.y)["accuracy"]
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    log.info("distill %s: %s", config.method, {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    # everything else the state carries (input shape, lineage, extras, example inputs) passes on
    return dataclasses.replace(
        state, module=student, quant=quant, masks={}, lineage=list(state.lineage), extras=dict(state.extras)
    )
