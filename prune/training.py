"""Fine-tuning and evaluation shared by the pruning methods (all through ``compress.train.fit``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from compress.config import TrainingLoss
    from compress.state import StageContext
    from compress.train import TrainConfig

log = logging.getLogger(__name__)


def steps_per_run(cfg: TrainConfig, n_samples: int) -> int:
    """Optimizer steps ``fit`` takes for ``cfg`` on ``n_samples`` samples."""
    return cfg.epochs * math.ceil(n_samples / cfg.batch_size)


def finetune(
    module: nn.Module,
    cfg: TrainConfig,
    config: TrainingLoss,
    ctx: StageContext,
    *,
    after_step: Callable[[], None] | None = None,
) -> dict:
    """Train ``module`` on the train split with the config's loss (teacher: ``ctx.reference``)."""
    from compress.train import fit, loss_from_config

    train = ctx.data["train"]
    teacher = ctx.reference if config.loss == "kd" else None
    result = fit(
        module, train.x, train.y, cfg, loss_fn=loss_from_config(config), teacher=teacher, after_step=after_step
    )
    log.info("fine-tuned %d steps in %.1fs, final loss %.4f", result["steps"], result["seconds"], result["final_loss"])
    return result


def evaluate_split(module: nn.Module, ctx: StageContext) -> float | None:
    """Accuracy on the eval split, or None when there is no labelled eval split."""
    from compress.metrics import evaluate

    if not ctx.data.has("eval") or ctx.data["eval"].y is None:
        return None
    split = ctx.data["eval"]
    return evaluate(module, split.x, split.y)["accuracy"]
