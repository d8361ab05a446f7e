"""Lottery tickets by iterative magnitude pruning with rewinding (Frankle et al. 2019/2020).

From a fresh, seeded initialisation theta_0 of the model's architecture: train, saving
theta_k after ``rewind_to`` = k steps (k = 0: theta_0, the original ticket); then, each
round, prune ``rate`` of the remaining weights globally by |theta_T| (conv/linear weights;
the output layer dense by default), reset the survivors to theta_k and retrain with the mask
fixed. Density after n rounds is (1 - rate)^n. The ``random_reinit`` control trains the
final mask from a different random initialisation.

theta_k is snapshot inside one uninterrupted training run (an ``after_step`` hook), so the
optimizer state and learning-rate schedule up to step k are the real ones. Each retraining
runs the full schedule from theta_k (weight rewinding; the schedule is not rewound).

Each finished round is checkpointed atomically to the stage's folder; re-running the stage
with the same config, seed, model and data resumes after the last finished round.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.errors import InputError
from compress.prune.magnitude import (
    MaskEnforcer,
    default_skip,
    magnitude_masks,
    prunable_weights,
    pruning_coverage,
    select_weights,
)
from compress.train import reinitialize

if TYPE_CHECKING:
    from compress.prune.config import LotteryConfig
    from compress.state import ModelState, StageContext


log = logging.getLogger(__name__)

CHECKPOINT = "lottery.pt"
CONTROLS = ("none", "random_reinit")


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _density(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0


def _weight_density(module: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Density over every conv/linear weight, the dense (skipped) ones included."""
    total = kept = 0
    for pname, _, weight in prunable_weights(module):
        total += weight.numel()
        kept += int(masks[pname].sum()) if pname in masks else weight.numel()
    return kept / total if total else 1.0


def _run_key(config: LotteryConfig, module: nn.Module, ctx: StageContext) -> str:
    train = ctx.data["train"]
    blob = json.dumps(
        {
            "config": config.model_dump(mode="json"),
            "seed": ctx.seed,
            "arch": [(n, list(p.shape)) for n, p in module.named_parameters()],
            "train": [len(train), float(train.x.double().sum())],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: start over rather than fail
        log.warning("ignoring unreadable lottery checkpoint %s (%s)", path, err)
        return None
    if payload.get("key") != key:
        log.info("lottery checkpoint %s is from another config/model; starting over", path)
        return None
    return payload


class _RewindSnapshot:
    """``after_step`` hook that saves the weights after exactly ``k`` steps."""

    def __init__(self, module: nn.Module, k: int, enforce: MaskEnforcer | None = None):
        self.module, self.k, self.enforce = module, k, enforce
        self.step = 0
        self.weights = _snapshot(module) if k == 0 else None

    def __call__(self) -> None:
        if self.enforce is not None:
            self.enforce()
        self.step += 1
        if self.step == self.k:
            self.weights = _snapshot(self.module)


def lottery_prune(state: ModelState, config: LotteryConfig, ctx: StageContext) -> ModelState:
    """Find a lottery ticket for ``state.module``'s architecture; the trained ticket replaces it.

    Sets ``state.module`` (the last round's trained, masked network), ``state.masks``,
    ``state.extras["lottery"]`` (every round's density and accuracy) and ``ctx.metrics``.
    """
    from compress.prune.training import evaluate_split, finetune, steps_per_run

    if config.control not in CONTROLS:
        raise ValueError(f"unknown lottery control {config.control!r}; allowed: {', '.join(CONTROLS)}")
    total_steps = steps_per_run(config.train, len(ctx.data["train"]))
    if config.rewind_to > total_steps:
        raise ValueError(f"rewind_to {config.rewind_to} is past the end of training ({total_steps} steps)")
    skip = config.skip if config.skip is not None else default_skip(state.module, "last")
    names, skipped = select_weights(state.module, skip)
    if not names:
        raise InputError(
            f"lottery: no prunable weight left after skip {skip!r}; prunable: "
            f"{[d for _, d, _ in prunable_weights(state.module)]}. Set prune.skip explicitly (e.g. skip: [])"
        )
    seed = ctx.seed if config.init_seed is None else config.init_seed
    path = Path(ctx.out_dir) / CHECKPOINT
    key = _run_key(config, state.module, ctx)
    net = copy.deepcopy(state.module)
    ckpt = _load(path, key)

    if ckpt is None:
        reinitialize(net, seed)
        snap = _RewindSnapshot(net, config.rewind_to)
        finetune(net, config.train, config, ctx, after_step=snap)
        ckpt = {
            "key": key,
            "round": 0,
            "theta_k": snap.weights,
            "trained": _snapshot(net),
            "masks": {},
            "history": [{"round": 0, "density": 1.0, "weight_density": 1.0, "accuracy": evaluate_split(net, ctx)}],
            "control": None,
        }
        _save(path, ckpt)
        log.info("lottery: dense network trained, accuracy %s", ckpt["history"][0]["accuracy"])
    else:
        log.info("lottery: resuming after round %d from %s", ckpt["round"], path)

    for r in range(ckpt["round"] + 1, config.rounds + 1):
        net.load_state_dict(ckpt["trained"])
        params = dict(net.named_parameters())
        prior = ckpt["masks"] or None
        total = sum(params[n].numel() for n in names)
        already = total - (sum(int(m.sum()) for m in prior.values()) if prior else total)
        remaining = total - already
        amount = (already + round(config.rate * remaining)) / total
        masks = magnitude_masks({n: params[n] for n in names}, amount, "global", prior=prior)
        net.load_state_dict(ckpt["theta_k"])
        enforce = MaskEnforcer(net, masks)
        enforce()
        finetune(net, config.train, config, ctx, after_step=enforce)
        row = {
            "round": r,
            "density": _density(masks),
            "weight_density": _weight_density(net, masks),
            "accuracy": evaluate_split(net, ctx),
        }
        ckpt.update(round=r, trained=_snapshot(net), masks=masks, history=[*ckpt["history"], row])
        _save(path, ckpt)
        log.info("lottery round %d: density %.4f accuracy %s", r, row["density"], row["accuracy"])

    net.load_state_dict(ckpt["trained"])
    masks = ckpt["masks"]

    if config.control == "random_reinit" and ckpt.get("control") is None:
        ctrl = reinitialize(copy.deepcopy(state.module), seed + 1)
        enforce = MaskEnforcer(ctrl, masks)
        enforce()
        finetune(ctrl, config.train, config, ctx, after_step=enforce)
        ckpt["control"] = {"method": "random_reinit", "density": _density(masks), "accuracy": evaluate_split(ctrl, ctx)}
        _save(path, ckpt)
        log.info("lottery control (random re-init): accuracy %s", ckpt["control"]["accuracy"])

    state.module = net
    state.masks = dict(masks)
    state.apply_masks()
    history = ckpt["history"]
    summary = {
        "rounds": history,
        "rewind_to": config.rewind_to,
        "dense_accuracy": history[0]["accuracy"],
        "ticket_accuracy": history[-1]["accuracy"],
        "ticket_density": history[-1]["density"],
        "dense_layers": skipped,
    }
    if ckpt.get("control") is not None:
        summary["control"] = ckpt["control"]
    ctx.metrics.update(summary)
    ctx.metrics["coverage"] = pruning_coverage(net, names, skipped)
    state.extras["lottery"] = summary
    return state
