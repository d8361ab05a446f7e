"""Knowledge distillation (Hinton et al. 2015) and the student/teacher plumbing every
distillation method shares: building a student, freezing a teacher, the loss choice.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.imports import import_callable
from compress.train import LossFn, TrainConfig, cross_entropy, fit, kd_loss
from compress.train import reinitialize as reset_parameters

log = logging.getLogger(__name__)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode with gradients off: a teacher."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def reinitialize(module: nn.Module, seed: int) -> nn.Module:
    """A trainable copy of ``module`` with a fresh seeded initialisation (the global RNG is
    left untouched)."""
    fresh = reset_parameters(copy.deepcopy(module), seed)
    for p in fresh.parameters():
        p.requires_grad_(True)
    return fresh.train()


def build_student(spec: str, kwargs: dict[str, Any], template: nn.Module, seed: int) -> nn.Module:
    """The student a config names.

    Args:
        spec: ``"same"`` (fresh init of ``template``'s architecture), ``"input"`` (a trainable
            copy of ``template``) or a factory ``"package.module:function"``.
        kwargs: the factory's keyword arguments.
        template: the model entering the stage.
        seed: initialisation seed.
    """
    if spec == "same":
        return reinitialize(template, seed)
    if spec == "input":
        student = copy.deepcopy(template)
        for p in student.parameters():
            p.requires_grad_(True)
        return student.train()
    factory = import_callable(spec, what="student factory", error=ValueError)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = factory(**kwargs)
    if not isinstance(student, nn.Module):
        raise ValueError(f"student factory {spec!r} returned {type(student).__name__}, not a torch.nn.Module")
    return student.train()


UNLABELLED = -100  # label of teacher-only samples (cross-entropy's ignore_index)


def kd_loss_partly_labelled(temperature: float = 2.0, alpha: float = 0.7) -> LossFn:
    """Hinton's loss where samples labelled ``UNLABELLED`` (e.g. mixup inputs) only get the
    distillation term: ``α·T²·KL`` over the batch + ``(1 − α)·CE`` over its labelled samples."""
    whole = kd_loss(temperature, alpha)
    only_kl = kd_loss(temperature, 1.0)

    def loss(student: torch.Tensor, y: torch.Tensor | None, teacher: torch.Tensor | None) -> torch.Tensor:
        if y is None or alpha >= 1:
            return only_kl(student, None, teacher)
        labelled = y != UNLABELLED
        if labelled.all():
            return whole(student, y, teacher)
        kl = alpha * only_kl(student, None, teacher)
        if not labelled.any():
            return kl
        return kl + (1 - alpha) * F.cross_entropy(student[labelled], y[labelled])

    return loss


def distillation_loss(temperature: float, alpha: float) -> tuple[LossFn, bool]:
    """The loss for ``alpha`` and whether it needs the teacher (alpha = 0 is labels only)."""
    if alpha == 0:
        return cross_entropy, False
    return kd_loss_partly_labelled(temperature, alpha), True


def mixup_inputs(x: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """``copies × len(x)`` inputs ``λ·x_i + (1 − λ)·x_j`` of random pairs, ``λ ~ U(0, 1)``: inputs
    with no label, on which the teacher's outputs are the only target."""
    g = torch.Generator().manual_seed(seed)
    n = copies * len(x)
    i = torch.randint(0, len(x), (n,), generator=g)
    j = torch.randint(0, len(x), (n,), generator=g)
    lam = torch.rand((n,) + (1,) * (x.dim() - 1), generator=g, dtype=x.dtype)
    return lam * x[i] + (1 - lam) * x[j]


def check_outputs_match(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> None:
    """Refuse a student whose outputs cannot be compared with the teacher's."""
    with torch.no_grad():
        s, t = student.eval()(x[:2]), teacher(x[:2])
    student.train()
    if s.shape != t.shape:
        raise ValueError(
            f"student outputs have shape {tuple(s.shape)[1:]} per sample but the teacher's have {tuple(t.shape)[1:]}"
        )


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor | None,
    cfg: TrainConfig,
    temperature: float = 2.0,
    alpha: float = 0.7,
    mixup: int = 0,
    **hooks: Any,
) -> dict:
    """Train ``student`` in place with Hinton's loss against ``teacher``.

    Args:
        student: trained in place.
        teacher: frozen teacher (unused when ``alpha`` is 0).
        x, y: training inputs and labels (labels may be None when ``alpha`` is 1).
        cfg: training hyper-parameters.
        temperature, alpha: the distillation loss' T and alpha.
        mixup: extra copies of the training inputs made by mixup, targets from the teacher only
            (an epoch then covers ``(1 + mixup)·len(x)`` samples).
        **hooks: passed to ``compress.train.fit`` (``before_step``, ``after_step``, ``params``, ...).

    Returns:
        ``fit``'s summary.
    """
    loss_fn, needs_teacher = distillation_loss(temperature, alpha)
    if needs_teacher and teacher is None:
        raise ValueError("distillation with alpha > 0 needs a teacher")
    if y is None and alpha < 1:
        raise ValueError(f"alpha {alpha} < 1 weighs a label term, but the train split has no labels; set alpha: 1")
    if teacher is not None and needs_teacher:
        check_outputs_match(student, teacher, x)
    if mixup:
        if not needs_teacher:
            raise ValueError("mixup inputs have no labels: they need the teacher (alpha > 0)")
        extra = mixup_inputs(x, mixup, cfg.seed)
        x = torch.cat([x, extra])
        if y is not None:
            y = torch.cat([y, torch.full((len(extra),), UNLABELLED, dtype=y.dtype)])
    return fit(student, x, y, cfg, loss_fn=loss_fn, teacher=teacher if needs_teacher else None, **hooks)


def distill_method(state, teacher: nn.Module, config, ctx) -> tuple[nn.Module, dict, dict]:
    """The ``kd`` method of the distill stage (see ``compress.distill.stage``)."""
    train = ctx.data["train"]
    student = build_student(config.student, config.student_kwargs, state.module, ctx.seed)
    summary = distill(student, teacher, train.x, train.y, config.train, config.temperature, config.alpha, config.mixup)
    return student, {}, summary
