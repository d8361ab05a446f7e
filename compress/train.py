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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.config import TrainConfig

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def kd_loss(temperature: float = 2.0, alpha: float = 0.7) -> LossFn:
    """Hinton et al.'s distillation loss: α·T²·KL(teacher‖student) + (1−α)·CE(labels).

    With no labels in the batch the CE term is dropped (α is taken as 1).
    """

    def loss(student: torch.Tensor, y: torch.Tensor | None, teacher: torch.Tensor | None) -> torch.Tensor:
        if teacher is None:
            raise ValueError("kd_loss needs teacher outputs")
        t = temperature
        kl = F.kl_div(
            F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean"
        )
        if y is None or alpha >= 1:
            return kl * t * t
        return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, y)

    return loss


def loss_from_config(config) -> LossFn:
    """The loss a ``TrainingLoss`` config names: cross-entropy or distillation."""
    if config.loss == "ce":
        return cross_entropy
    if config.loss == "kd":
        return kd_loss(config.temperature, config.alpha)
    raise ValueError(f"unknown loss {config.loss!r}; allowed: ce, kd")


def cross_entropy(student: torch.Tensor, y: torch.Tensor | None, teacher: torch.Tensor | None) -> torch.Tensor:
    if y is None:
        raise ValueError("training on labels needs a split with labels 'y'; use a distillation loss otherwise")
    return F.cross_entropy(student, y)


def reinitialize(module: nn.Module, seed: int) -> nn.Module:
    """A fresh initialisation of ``module`` in place, seeded, leaving the global RNG state as
    it was (lottery tickets' theta_0, KD ``same`` students, born-again students).

    Every module's ``reset_parameters()`` runs, and ``_reset_parameters()`` where a module has
    that instead or as well (``nn.MultiheadAttention``, ``nn.Transformer``), so no parameter
    keeps the teacher's values.

    Raises:
        InputError: some parameter has no reset method on its module: a "fresh" student
            would silently start from the teacher's weights there.
    """
    from compress.errors import InputError

    covered: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            private = getattr(m, "_reset_parameters", None)
            if callable(reset):
                reset()
            if callable(private):
                private()
            if callable(reset) or callable(private):
                covered.update(id(p) for p in m.parameters(recurse=isinstance(m, nn.MultiheadAttention)))
    missed = [n for n, p in module.named_parameters() if id(p) not in covered]
    if missed:
        owners: dict[str, list[str]] = {}
        for mname, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if id(p) not in covered:
                    owners.setdefault(type(m).__name__, []).append(f"{mname}.{pname}" if mname else pname)
        raise InputError(
            "cannot re-initialise the student: no reset_parameters() for "
            + "; ".join(f"{kind} ({', '.join(names)})" for kind, names in owners.items())
            + ". Give those modules a reset_parameters() method, or start from the teacher's weights"
        )
    return module


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
        max_steps: stop after this many optimizer steps. The learning-rate schedule is
            fitted to the shortened run (a cosine schedule anneals to 0 by ``max_steps``);
            to snapshot weights mid-run instead, use ``after_step``.

    Returns:
        ``{"steps", "final_loss", "seconds"}``.
    """
    if cfg.epochs == 0 or (max_steps is not None and max_steps <= 0):
        return {"steps": 0, "final_loss": float("nan"), "seconds": 0.0}
    from compress.distributed import rank_and_world

    start = time.perf_counter()
    opt = make_optimizer(list(params) if params is not None else model.parameters(), cfg)
    rank, world = rank_and_world()
    forward = model
    if world > 1:
        # Same global batch as one process: each rank takes 1/world of every batch, and
        # DDP averages the gradients, so 1 and N processes follow the same recipe.
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model)
    n = len(x) - len(x) % world  # equal shards, or the ranks' step counts diverge
    batch = max(cfg.batch_size // world, 1)
    steps_per_epoch = math.ceil(n / world / batch)
    total = cfg.epochs * steps_per_epoch if max_steps is None else min(max_steps, cfg.epochs * steps_per_epoch)
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        if cfg.schedule == "cosine"
        else None
    )
    g = torch.Generator().manual_seed(cfg.seed)
    # Batches go where the model is (the runner puts it on the stage context's device).
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if teacher is not None:
        teacher.eval()
        teacher.to(device)
    step, loss_value = 0, float("nan")
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)[:n][rank::world]  # same permutation on every rank
        running, batches = 0.0, 0
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            xb = x[idx].to(device, non_blocking=True)
            yb = None if y is None else y[idx].to(device, non_blocking=True)
            if before_step is not None:
                before_step()
            with torch.no_grad():
                tb = teacher(xb) if teacher is not None else None
            loss = loss_fn(forward(xb), yb, tb)
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
