"""Born-Again Networks (Furlanello et al., ICML 2018).

Generation 0 is the teacher (the model entering the stage). Generation k is a fresh network
of the same architecture trained from generation k−1 with one of the paper's losses:

* ``ban``: cross-entropy between the teacher's softmax and the student's (no label term);
* ``ban_l``: the same plus cross-entropy on the labels;
* ``cwtm``: label cross-entropy weighted per sample by ``w_s = max_i p_{i,s} / Σ_u max_i p_{i,u}``
  (the teacher's confidence, normalised over the batch);
* ``dkpp``: cross-entropy to the teacher's probabilities with every non-argmax probability
  randomly permuted among the non-argmax classes.

BANE, the ensemble, averages the softmax outputs of generations 1..k.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.metrics import evaluate, predict
from compress.train import LossFn, TrainConfig, fit

log = logging.getLogger(__name__)

VARIANTS = ("ban", "ban_l", "cwtm", "dkpp")


def _soft_ce(student: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    return -(target_probs * F.log_softmax(student / temperature, -1)).sum(-1).mean()


def _need_labels(y: torch.Tensor | None, variant: str) -> torch.Tensor:
    if y is None:
        raise ValueError(
            f"born-again variant {variant!r} uses labels, but the train split has none; use 'ban' or 'dkpp'"
        )
    return y


def permute_non_max(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DKPP's targets: each row keeps its argmax probability; the others are permuted at random."""
    n, k = probs.shape
    top = probs.argmax(-1)
    # random keys, the argmax forced first: sorting gives per row [argmax, shuffled others]
    keys = torch.rand(n, k, generator=generator)
    keys[torch.arange(n), top] = -1.0
    order = keys.argsort(-1)
    others = torch.stack([torch.arange(k)] * n)
    others = torch.cat([top[:, None], others[others != top[:, None]].reshape(n, k - 1)], 1)
    # value at position others[:, j] moves to position order[:, j]: argmax stays in place
    out = torch.empty_like(probs)
    out.scatter_(1, order, probs.gather(1, others))
    return out


def ban_loss(variant: str, temperature: float = 1.0, seed: int = 0) -> LossFn:
    """The loss of a born-again generation: ``loss(student_logits, y, teacher_logits)``."""
    if variant not in VARIANTS:
        raise ValueError(f"born-again variant {variant!r} is not one of {', '.join(VARIANTS)}")
    t = temperature
    generator = torch.Generator().manual_seed(seed)

    def loss(student: torch.Tensor, y: torch.Tensor | None, teacher: torch.Tensor | None) -> torch.Tensor:
        if teacher is None:
            raise ValueError("born-again training needs teacher outputs")
        p_teacher = F.softmax(teacher / t, -1)
        if variant == "ban":
            return _soft_ce(student, p_teacher, t)
        if variant == "ban_l":
            return _soft_ce(student, p_teacher, t) + F.cross_entropy(student, _need_labels(y, variant))
        if variant == "cwtm":
            conf = p_teacher.max(-1).values
            weight = conf / conf.sum()
            ce = F.cross_entropy(student, _need_labels(y, variant), reduction="none")
            return (weight * ce).sum()
        return _soft_ce(student, permute_non_max(p_teacher, generator), t)  # dkpp

    return loss


class SoftmaxEnsemble(nn.Module):
    """BANE: the mean of the members' softmax outputs, returned as log-probabilities."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([F.softmax(m(x), -1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-30).log()


def born_again(
    teacher: nn.Module,
    make_student: Callable[[int], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor | None,
    cfg: TrainConfig,
    *,
    generations: int = 2,
    variant: str = "ban",
    temperature: float = 1.0,
    eval_x: torch.Tensor | None = None,
    eval_y: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[list[nn.Module], list[dict]]:
    """Train ``generations`` born-again generations, each from the previous one.

    Args:
        teacher: generation 0 (frozen, not modified).
        make_student: ``make_student(generation) -> fresh network`` (seeded by the caller).
        x, y: the training split (labels needed by ``ban_l`` and ``cwtm``).
        cfg: the training of every generation.
        generations: how many generations after the teacher.
        variant: ``ban``, ``ban_l``, ``cwtm`` or ``dkpp``.
        temperature: softmax temperature (the paper uses 1).
        eval_x, eval_y: when given, each generation's accuracy on them is measured.
        seed: seed of DKPP's permutations.

    Returns:
        (the trained generations 1..k, one summary per generation).
    """
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    members: list[nn.Module] = []
    records: list[dict] = []
    previous = teacher.eval()
    for k in range(1, generations + 1):
        student = make_student(k)
        t0 = time.perf_counter()
        summary = fit(student, x, y, cfg, loss_fn=ban_loss(variant, temperature, seed + k), teacher=previous)
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        record = {"generation": k, "seconds": round(time.perf_counter() - t0, 3), "final_loss": summary["final_loss"]}
        if eval_x is not None:
            record.update(evaluate(student, eval_x, eval_y))
        log.info("born-again generation %d: %s", k, record)
        records.append(record)
        members.append(student)
        previous = student
    for m in members:
        for p in m.parameters():
            p.requires_grad_(True)
    return members, records


def ensemble_accuracy(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the mean softmax of ``members`` on ``(x, y)``."""
    out = predict(SoftmaxEnsemble(members), x)
    return (out.argmax(1) == y).double().mean().item()


def distill_method(state, teacher: nn.Module, config, ctx) -> tuple[nn.Module, dict, dict]:
    """The ``born_again`` method of the distill stage (see ``compress.distill.stage``)."""
    from compress.distill.kd import reinitialize

    ev = ctx.data["eval"] if ctx.data.has("eval") else None
    labelled_eval = ev is not None and ev.y is not None
    train = ctx.data["train"]
    members, records = born_again(
        teacher,
        lambda k: reinitialize(state.module, ctx.seed + k),
        train.x,
        train.y,
        config.train,
        generations=config.generations,
        variant=config.variant,
        temperature=config.temperature,
        eval_x=ev.x if ev is not None and labelled_eval else None,
        eval_y=ev.y if ev is not None and labelled_eval else None,
        seed=ctx.seed,
    )
    ctx.metrics["generations"] = records
    if config.ensemble and ev is not None and labelled_eval:
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
    return student, {}, summary
