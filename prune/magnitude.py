"""Unstructured magnitude pruning: masks that zero the weights of smallest |w|.

Scopes: ``layer`` (the same sparsity in every pruned layer) or ``global`` (one threshold
over all pruned layers, optionally capped per layer). Schedules: ``one_shot`` (prune, then
optionally fine-tune with the masks enforced) or ``gradual`` (Zhu & Gupta 2017's cubic
ramp, masks recomputed every ``frequency`` fine-tuning steps).

Masks select exactly what ``torch.nn.utils.prune`` selects (``l1_unstructured`` /
``global_unstructured``): the same ``round(amount * n)`` count and the same ``topk`` over
the same concatenation order, so ties break identically.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.errors import InputError

if TYPE_CHECKING:
    from compress.prune.config import MagnitudeConfig
    from compress.state import ModelState, StageContext

log = logging.getLogger(__name__)

SCOPES = ("layer", "global")
PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


def prunable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution and linear layer with a weight, in module order."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, PRUNABLE_TYPES) and isinstance(getattr(m, "weight", None), nn.Parameter)
    ]


def prunable_weights(module: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """Every prunable weight matrix, in module order: ``(parameter name, display name, tensor)``.

    Conv/Linear weights and the input/hidden matrices of GRU/LSTM/RNN layers
    (``weight_ih_l*``, ``weight_hh_l*``). A Parameter shared by several modules (tied
    embedding/output weights) is listed once, under its first name in ``named_parameters()``
    (the name its mask is kept under). The display name is the layer's name for a plain
    ``<layer>.weight`` and the parameter name otherwise.
    """
    canonical = {id(p): n for n, p in module.named_parameters()}
    seen: set[str] = set()
    out = []
    for name, m in module.named_modules():
        if isinstance(m, PRUNABLE_TYPES) and isinstance(getattr(m, "weight", None), nn.Parameter):
            attrs = ["weight"]
        elif isinstance(m, nn.RNNBase):
            attrs = [a for a, p in m.named_parameters(recurse=False) if a.startswith("weight_") and p.dim() == 2]
        else:
            continue
        for attr in attrs:
            p = getattr(m, attr)
            pname = canonical.get(id(p))
            if pname is None or pname in seen:
                continue
            seen.add(pname)
            own = f"{name}.{attr}" if name else attr
            out.append((pname, name if attr == "weight" and pname == own else pname, p))
    return out


def default_skip(module: nn.Module, which: str) -> list[str]:
    """Names kept dense by default: the ``"first_last"`` or ``"last"`` prunable weight
    (a layer name for a Conv/Linear weight, else the parameter name)."""
    layers = [display for _, display, _ in prunable_weights(module)]
    if not layers:
        return []
    if which == "first_last":
        return sorted({layers[0], layers[-1]})
    if which == "last":
        return [layers[-1]]
    raise ValueError(f"unknown default skip {which!r}; allowed: first_last, last")


def select_weights(module: nn.Module, skip: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split the prunable weights into (pruned, kept dense) parameter names.

    Args:
        module: the model.
        skip: glob patterns matched against module names (``"net.0"``) and parameter
            names (``"net.0.weight"``, ``"rnn.weight_hh_l0"``).

    Returns:
        ``(pruned, skipped)`` parameter names, each in module order.
    """
    patterns = list(skip)
    pruned, skipped = [], []
    for pname, display, _ in prunable_weights(module):
        if any(fnmatch.fnmatchcase(display, p) or fnmatch.fnmatchcase(pname, p) for p in patterns):
            skipped.append(pname)
        else:
            pruned.append(pname)
    if patterns:
        names = {n for n, _ in module.named_modules()} | {n for n, _ in module.named_parameters()}
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                log.warning("skip pattern %r matches no module or parameter", p)
    return pruned, skipped


def _n_to_prune(amount: float, size: int) -> int:
    # Same count as torch.nn.utils.prune._compute_nparams_toprune for a float amount.
    return round(amount * size)


def _scores(weight: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """|w| with already-pruned entries scored -1, so they are removed first and stay removed."""
    s = weight.detach().abs().flatten().float()
    if prior is not None:
        s = torch.where(prior.flatten(), s, torch.full_like(s, -1.0))
    return s


def _mask_from_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(scores, k=k, largest=False).indices] = False
    return mask


def magnitude_masks(
    weights: dict[str, torch.Tensor],
    amount: float,
    scope: str = "global",
    max_layer_sparsity: float | None = None,
    prior: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = kept) that zero ``amount`` of the weights by magnitude.

    Args:
        weights: the tensors to prune, by name; for ``global`` scope their order is the
            concatenation order (as in ``torch.nn.utils.prune.global_unstructured``).
        amount: target sparsity in [0, 1): of all weights (global) or of each (layer).
        scope: ``"global"`` or ``"layer"``.
        max_layer_sparsity: global scope only: no layer exceeds this sparsity; the
            surplus goes to the other layers.
        prior: existing masks; their pruned entries stay pruned and count toward ``amount``.

    Returns:
        One bool mask per weight, shaped like it.

    Raises:
        ValueError: unknown scope, amount out of range, or a cap that makes the
            amount unreachable.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; allowed: {', '.join(SCOPES)}")
    if not 0 <= amount < 1:
        raise ValueError(f"pruning amount must be in [0, 1), got {amount}")
    prior = prior or {}
    scores = {n: _scores(w, prior.get(n)) for n, w in weights.items()}
    if scope == "layer":
        flat = {n: _mask_from_topk(s, _n_to_prune(amount, s.numel())) for n, s in scores.items()}
    else:
        flat = _global_masks(scores, amount, max_layer_sparsity)
    return {n: flat[n].view(weights[n].shape) for n in weights}


def _global_masks(scores: dict[str, torch.Tensor], amount: float, cap: float | None) -> dict[str, torch.Tensor]:
    total = sum(s.numel() for s in scores.values())
    k_total = _n_to_prune(amount, total)
    limits = {n: (s.numel() if cap is None else math.floor(cap * s.numel())) for n, s in scores.items()}
    if k_total > sum(limits.values()):
        reachable = sum(limits.values()) / max(total, 1)
        raise ValueError(f"sparsity {amount} is unreachable with max_layer_sparsity {cap}: at most {reachable:.4f}")
    capped: dict[str, int] = {}  # layers held at their cap, with their pruned count
    while True:
        pool = [n for n in scores if n not in capped]
        k = k_total - sum(capped.values())
        counts: dict[str, int] = {}
        pool_masks: dict[str, torch.Tensor] = {}
        if pool:
            cat = torch.cat([scores[n] for n in pool])
            keep = _mask_from_topk(cat, k)
            for n, part in zip(pool, torch.split(keep, [scores[n].numel() for n in pool])):
                pool_masks[n] = part
                counts[n] = int((~part).sum())
        over = [n for n in pool if counts[n] > limits[n]]
        if not over:
            break
        for n in over:  # hold violators at their cap and redistribute the rest
            capped[n] = limits[n]
    masks = dict(pool_masks)
    for n, k in capped.items():
        masks[n] = _mask_from_topk(scores[n], k)
    return masks


def cubic_sparsity(step: int, initial: float, final: float, begin: int, ramp_steps: int) -> float:
    """Zhu & Gupta's schedule s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, clamped to [t0, t0 + n dt]."""
    if ramp_steps <= 0:
        return final if step >= begin else initial
    progress = min(max((step - begin) / ramp_steps, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class MaskEnforcer:
    """``after_step`` hook: multiply every masked parameter by its mask (pruned stay exactly 0)."""

    def __init__(self, module: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(module.named_parameters())
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.module = module
        self.set_masks(masks, params)

    def set_masks(self, masks: dict[str, torch.Tensor], params: dict[str, nn.Parameter] | None = None) -> None:
        params = params or dict(self.module.named_parameters())
        self.pairs = [(params[n], m.to(params[n].dtype)) for n, m in masks.items()]

    @torch.no_grad()
    def __call__(self) -> None:
        for p, m in self.pairs:
            p.mul_(m)


class GradualPruner(MaskEnforcer):
    """``after_step`` hook that ramps sparsity on the cubic schedule and enforces the masks.

    Masks are recomputed at t0, t0 + dt, ..., t0 + n dt (``ramp_steps`` = n dt) from the
    current weights; pruned weights are zero and so stay pruned (masks only grow).
    """

    def __init__(
        self,
        module: nn.Module,
        names: list[str],
        final: float,
        initial: float,
        begin: int,
        frequency: int,
        ramp_steps: int,
        scope: str,
        max_layer_sparsity: float | None,
        prior: dict[str, torch.Tensor] | None = None,
    ):
        self.names, self.final, self.initial = names, final, initial
        self.begin, self.frequency, self.ramp_steps = begin, frequency, ramp_steps
        self.scope, self.cap = scope, max_layer_sparsity
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.masks: dict[str, torch.Tensor] = dict(prior or {})
        super().__init__(module, self.masks)
        if begin == 0:
            self.update(0)

    def update(self, step: int) -> None:
        target = cubic_sparsity(step, self.initial, self.final, self.begin, self.ramp_steps)
        params = dict(self.module.named_parameters())
        self.masks = magnitude_masks(
            {n: params[n] for n in self.names}, target, self.scope, self.cap, prior=self.masks or None
        )
        self.set_masks(self.masks, params)
        self.history.append((step, target))
        log.debug("gradual pruning: step %d sparsity %.4f", step, target)
        MaskEnforcer.__call__(self)

    def __call__(self) -> None:
        self.step += 1
        t = self.step - self.begin
        if 0 <= t <= self.ramp_steps and t % self.frequency == 0:
            self.update(self.step)
        else:
            MaskEnforcer.__call__(self)


def sparsity_table(
    module: nn.Module, masks: dict[str, torch.Tensor], skipped: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Per-layer rows for every conv/linear weight: parameters, pruned count, sparsity."""
    skipped = set(skipped)
    rows = []
    for pname, _, weight in prunable_weights(module):
        numel = weight.numel()
        pruned = int((~masks[pname]).sum()) if pname in masks else 0
        rows.append(
            {
                "name": pname,
                "shape": list(weight.shape),
                "params": numel,
                "pruned": pruned,
                "sparsity": pruned / numel if numel else 0.0,
                "skipped": pname in skipped,
            }
        )
    return rows


def table_sparsity(rows: list[dict[str, Any]], only_pruned_layers: bool = False) -> float:
    """Global sparsity implied by a table: total pruned over total weights."""
    sel = [r for r in rows if not (only_pruned_layers and r["skipped"])]
    total = sum(r["params"] for r in sel)
    return sum(r["pruned"] for r in sel) / total if total else 0.0


def magnitude_prune(state: ModelState, config: MagnitudeConfig, ctx: StageContext) -> ModelState:
    """Prune ``state.module`` by magnitude as ``config`` says, fine-tuning with masks enforced.

    Sets ``state.masks`` for the pruned weights (merged with any earlier masks, whose
    zeros are kept) and records accuracy before/after and the per-layer table in
    ``ctx.metrics``.
    """
    from compress.prune.training import evaluate_split, finetune, steps_per_run

    module = state.module
    skip = config.skip if config.skip is not None else default_skip(module, "first_last")
    names, skipped = select_weights(module, skip)
    if not names:
        raise InputError(
            f"magnitude pruning: no prunable weight left after skip {skip!r}; prunable: "
            f"{[d for _, d, _ in prunable_weights(module)]}. Set prune.skip explicitly (e.g. skip: [])"
        )
    log.info(
        "magnitude pruning %d layers (%s scope, %s) to %.1f%%; dense: %s",
        len(names),
        config.scope,
        config.schedule,
        100 * config.amount,
        ", ".join(skipped) or "none",
    )
    params = state.parameters_by_name()
    prior = {n: state.masks[n] for n in names if n in state.masks}
    metrics = ctx.metrics

    if config.schedule == "one_shot":
        masks = magnitude_masks(
            {n: params[n] for n in names}, config.amount, config.scope, config.max_layer_sparsity, prior=prior
        )
        state.masks.update(masks)
        state.apply_masks()
        metrics["accuracy_pruned"] = evaluate_split(module, ctx)
        if config.finetune is not None and config.finetune.epochs > 0:
            enforce = MaskEnforcer(module, state.masks)
            metrics["finetune"] = finetune(module, config.finetune, config, ctx, after_step=enforce)
            metrics["accuracy_finetuned"] = evaluate_split(module, ctx)
    else:
        total = steps_per_run(config.finetune, len(ctx.data["train"]))
        ramp = int(config.ramp_fraction * total) - config.begin_step
        ramp -= ramp % config.frequency
        if ramp < config.frequency:
            raise ValueError(
                f"gradual schedule: begin_step {config.begin_step} and ramp_fraction {config.ramp_fraction} "
                f"leave no room for a ramp in {total} fine-tuning steps; lower begin_step or train longer"
            )
        pruner = GradualPruner(
            module,
            names,
            config.amount,
            config.initial_sparsity,
            config.begin_step,
            config.frequency,
            ramp,
            config.scope,
            config.max_layer_sparsity,
            prior=prior,
        )
        metrics["finetune"] = finetune(module, config.finetune, config, ctx, after_step=pruner)
        state.masks.update(pruner.masks)
        state.apply_masks()
        metrics["schedule_updates"] = len(pruner.history)
        metrics["accuracy_finetuned"] = evaluate_split(module, ctx)

    rows = sparsity_table(module, state.masks, skipped)
    metrics["layers"] = rows
    metrics["coverage"] = pruning_coverage(module, names, skipped)
    metrics["weight_sparsity"] = table_sparsity(rows)
    metrics["pruned_layers_sparsity"] = table_sparsity(rows, only_pruned_layers=True)
    return state


def pruning_coverage(module: nn.Module, pruned: Iterable[str], skipped: Iterable[str]) -> dict[str, Any]:
    """The coverage record (``compress.coverage``) of a pruning stage."""
    from compress.coverage import parameter_coverage

    reasons = {n: "kept dense by prune.skip" for n in skipped}
    return parameter_coverage(
        module, set(pruned), reasons, what="prune", unsupported_kinds=lambda m: f"{type(m).__name__}, not pruned"
    )
