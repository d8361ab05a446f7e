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

from compress.metrics import count_parameters, evaluate
from compress.qtensor import QuantizedTensor
from compress.state import ModelState, StageContext
from distill.born_again import born_again, ensemble_accuracy
from distill.config import BornAgainConfig, DiffQuantConfig, KDConfig, QuantizedDistillConfig
from distill.diffquant import allocate_bits, differentiable_quantize, layer_gradient_norms
from distill.kd import build_student, distill, distillation_loss, frozen_copy, reinitialize
from distill.quantized import quantizable_layers, quantized_distill

log = logging.getLogger(__name__)


def storage_bytes(module: nn.Module, quant: dict[str, QuantizedTensor]) -> int:
    """Bytes to store ``module``: quantized weights at their width (plus scales/codebooks), the rest float32."""
    bits = sum(qt.storage_bits() for qt in quant.values())
    bits += 32 * sum(p.numel() for n, p in module.named_parameters() if n not in quant)
    return (bits + 7) // 8


def _describe(module: nn.Module, quant: dict[str, QuantizedTensor]) -> dict:
    params, _ = count_parameters(module)
    q_weights = sum(qt.codes.numel() for qt in quant.values())
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
        config: one of the distill configs.
        ctx: the train split (``ctx.data["train"]``), the eval split if any, the seed, the metrics sink.

    Returns:
        A new state whose module is the student (quantized methods: with ``quant`` filled).
    """
    start = time.perf_counter()
    train = ctx.data["train"]
    x, y = train.x, train.y
    has_eval = ctx.data.has("eval")
    ev = ctx.data["eval"] if has_eval else None
    teacher = frozen_copy(state.module)
    if state.masks or state.quant:
        log.info("distill: the student is a new set of weights; incoming masks/quantization are not carried over")
    metrics = ctx.metrics
    metrics["method"] = config.method
    if ev is not None and ev.y is not None:
        metrics["teacher_accuracy"] = evaluate(teacher, ev.x, ev.y)["accuracy"]

    quant: dict[str, QuantizedTensor] = {}
    if isinstance(config, KDConfig):
        student = build_student(config.student, config.student_kwargs, state.module, ctx.seed)
        summary = distill(student, teacher, x, y, config.train, config.temperature, config.alpha, config.mixup)
    elif isinstance(config, QuantizedDistillConfig):
        student = build_student(config.student, config.student_kwargs, state.module, ctx.seed)
        quant, summary = quantized_distill(
            student, teacher, x, y, config.train, bits=config.bits, bucket=config.bucket,
            rounding=config.rounding, keep_first_last_float=config.keep_first_last_float,
            temperature=config.temperature, alpha=config.alpha, mixup=config.mixup,
        )
    elif isinstance(config, DiffQuantConfig):
        student = build_student(config.student, config.student_kwargs, state.module, ctx.seed)
        if config.student != "input":
            pre = distill(student, teacher, x, y, config.pretrain, config.temperature, config.alpha, config.mixup)
            metrics["pretrain_seconds"] = round(pre["seconds"], 3)
            if ev is not None and ev.y is not None:
                metrics["float_student_accuracy"] = evaluate(student, ev.x, ev.y)["accuracy"]
        layers = quantizable_layers(student, config.keep_first_last_float)
        if config.bit_budget is not None:
            loss_fn, needs_teacher = distillation_loss(config.temperature, config.alpha)
            norms = layer_gradient_norms(student, teacher if needs_teacher else None, x, y, layers, loss_fn)
            mods = dict(student.named_modules())
            sizes = {n: mods[n].weight.numel() for n in layers}
            layer_bits = allocate_bits(norms, sizes, config.bit_budget, config.min_bits, config.max_bits)
            metrics["gradient_norms"] = {n: round(v, 6) for n, v in norms.items()}
        else:
            layer_bits = {n: config.bits for n in layers}
        metrics["layer_bits"] = layer_bits
        quant, summary = differentiable_quantize(
            student, teacher, x, y, config.train, layer_bits, points_init=config.points_init,
            learn_points=config.learn_points, temperature=config.temperature, alpha=config.alpha,
            mixup=config.mixup,
        )
    elif isinstance(config, BornAgainConfig):
        student, summary = _born_again(state, teacher, config, ctx)
    else:
        raise ValueError(
            f"distill method {getattr(config, 'method', config)!r} is not one of "
            "'kd', 'quantized', 'differentiable_quantization', 'born_again'"
        )

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


def _born_again(state: ModelState, teacher: nn.Module, config: BornAgainConfig, ctx: StageContext):
    ev = ctx.data["eval"] if ctx.data.has("eval") else None
    labelled_eval = ev is not None and ev.y is not None
    train = ctx.data["train"]
    members, records = born_again(
        teacher,
        lambda k: reinitialize(state.module, ctx.seed + k),
        train.x, train.y, config.train,
        generations=config.generations, variant=config.variant, temperature=config.temperature,
        eval_x=ev.x if labelled_eval else None, eval_y=ev.y if labelled_eval else None, seed=ctx.seed,
    )
    ctx.metrics["generations"] = records
    if config.ensemble and labelled_eval:
        ctx.metrics["ensemble_accuracy"] = ensemble_accuracy(members, ev.x, ev.y)
        ctx.metrics["ensemble_members"] = len(members)
    if config.select == "best":
        if not labelled_eval:
            raise ValueError("born_again select 'best' needs a labelled eval split; use select 'last'")
        chosen = max(range(len(members)), key=lambda i: records[i]["accuracy"])
    else:
        chosen = len(members) - 1
    ctx.metrics["selected_generation"] = chosen + 1
    summary = {
        "seconds": sum(r["seconds"] for r in records),
        "final_loss": records[chosen]["final_loss"],
    }
    student = members[chosen]
    for p in student.parameters():
        p.requires_grad_(True)
    return student, summary
