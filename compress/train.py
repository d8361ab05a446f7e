"""The shared training loop: distillation, fine-tuning after pruning, lottery-ticket
rounds and codebook fine-tuning all train through ``fit``.

Stages customise it through hooks rather than copies: ``loss_fn`` (e.g. distillation
against a teacher), ``before_step`` / ``after_step`` (e.g. quantize shadow weights, enforce
pruning masks) and ``on_epoch_end``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


class TrainConfig(BaseModel):
    """How to train: shared by every stage that trains."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0, description="Passes over the training split.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (L2; decoupled for adamw).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule over all steps.")
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    seed: int = Field(0, description="Seed for initialisation-independent randomness (shuffling).")


def kd_loss(temperature: float = 2.0, alpha: float = 0.7) -> LossFn:
    """Hinton et al.'s distillation loss: α·T²·KL(teacher‖student) + (1−α)·CE(labels).

    With no labels in the batch the CE term is dropped (α is taken as 1).
    """

    def loss(student: torch.Tensor, y: torch.Tensor | None, teacher: torch.Tensor | None) -> torch.Tensor:
        if teacher is None:
            raise ValueError("kd_loss needs teacher outputs")
        t = temperature
        kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean")
        if y is None or alpha >= 1:
            return kl * t * t
        return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, y)

    return loss


def cross_entropy(student: torch.Tensor, y: torch.Tensor | None, teacher: torch.Tensor | None) -> torch.Tensor:
    if y is None:
        raise ValueError("training on labels needs a split with labels 'y'; use a distillation loss otherwise")
    return F.cross_entropy(student, y)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    cfg: TrainConfig,
    *,
    loss_fn: LossFn = cross_entropy,
    teacher: nn.Module | None = None,
    params=None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    max_steps: int | None = None,
) -> dict:
    """Train ``model`` on ``(x, y)``.

    Args:
        model: trained in place.
        x, y: the training split; ``y`` may be None for distillation on unlabelled data.
        cfg: the hyper-parameters.
        loss_fn: ``loss(student_out, y, teacher_out)``.
        teacher: evaluated under ``no_grad`` on every batch when given.
        params: what the optimizer updates (default: all of the model's parameters).
        before_step: called before each forward pass (e.g. swap in quantized weights).
        after_step: called after each optimizer step (e.g. re-apply pruning masks).
        on_epoch_end: called with the epoch index.
        max_steps: stop after this many optimizer steps (lottery rewinding points).

    Returns:
        ``{"steps", "final_loss", "seconds"}``.
    """
    if cfg.epochs == 0 or (max_steps is not None and max_steps <= 0):
        return {"steps": 0, "final_loss": float("nan"), "seconds": 0.0}
    start = time.perf_counter()
    opt = make_optimizer(list(params) if params is not None else model.parameters(), cfg)
    n = len(x)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if max_steps is None else min(max_steps, cfg.epochs * steps_per_epoch)
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        if cfg.schedule == "cosine"
        else None
    )
    g = torch.Generator().manual_seed(cfg.seed)
    if teacher is not None:
        teacher.eval()
    step, loss_value = 0, float("nan")
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        running, batches = 0.0, 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = x[idx]
            yb = None if y is None else y[idx]
            if before_step is not None:
                before_step()
            with torch.no_grad():
                tb = teacher(xb) if teacher is not None else None
            loss = loss_fn(model(xb), yb, tb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if after_step is not None:
                after_step()
            step += 1
            running += loss.item()
            batches += 1
            if max_steps is not None and step >= max_steps:
                break
        loss_value = running / max(batches, 1)
        log.debug("epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, loss_value)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if max_steps is not None and step >= max_steps:
            break
    model.eval()
    return {"steps": step, "final_loss": loss_value, "seconds": time.perf_counter() - start}
