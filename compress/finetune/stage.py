"""Fine-tuning through the shared loop, keeping what earlier stages decided."""

from __future__ import annotations

import copy

from compress.errors import RecipeError
from compress.finetune import FinetuneConfig
from compress.metrics import evaluate
from compress.state import ModelState, StageContext
from compress.train import fit, loss_from_config


def apply(state: ModelState, config: FinetuneConfig, ctx: StageContext) -> ModelState:
    if state.quant:
        raise RecipeError(
            "stage finetune comes after quantize: training would move weights off their integer grid; "
            "fine-tune before quantizing, or use quantize's own fine-tuning options"
        )
    split = ctx.data["train"]
    teacher = None
    if config.loss == "kd":
        teacher = copy.deepcopy(state.module).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    history = fit(
        state.module,
        split.x,
        split.y,
        config.train,
        loss_fn=loss_from_config(config),
        teacher=teacher,
        after_step=state.apply_masks if state.masks else None,
    )
    ctx.metrics.update({"steps": history["steps"], "final_loss": history["final_loss"]})
    if ctx.data.has("eval"):
        ev = ctx.data["eval"]
        ctx.metrics["eval"] = evaluate(state.module, ev.x, ev.y)
    return state
