"""Codebook quantization (weight sharing, Han et al. 2016): 1-D k-means per layer or neuron group.

Each layer (or each group of output neurons with similarly spread weights, after JLCM's
grouping idea) gets a codebook of at most ``2**bits`` values fit by 1-D k-means with linear
initialisation over ``[min, max]``. Pruned weights (a mask, or exact zeros) get a reserved
code whose value is exactly 0. Centroids can then be fine-tuned with assignments fixed,
through the parametrisation ``W = C[g(row), I]``, whose gradient is
``∂L/∂C_k = Σ ∂L/∂W_ij · 1[I_ij = k]``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

from compress.grid import as_matrix
from compress.qtensor import CodebookTensor

log = logging.getLogger(__name__)


def kmeans_1d(
    values: torch.Tensor, k: int, *, iterations: int = 50, init: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars.

    In one dimension sorted centroids have interval cells, so assignment is a bucket search
    against the midpoints (O(n log k)) rather than an (n × k) distance matrix.

    Args:
        values: 1-D float tensor (at least one element).
        k: number of centroids.
        iterations: maximum Lloyd iterations (stops early when assignments settle).
        init: ``linear`` (evenly over [min, max]) or ``quantile`` (evenly spaced quantiles).

    Returns:
        Sorted centroids ``(k',)`` with ``k' <= k`` (duplicates of a constant input collapse)
        and the index of each value's centroid.
    """
    v = values.detach().double().flatten()
    if v.numel() == 0:
        raise ValueError("k-means needs at least one value")
    lo, hi = v.min(), v.max()
    if init == "linear":
        c = torch.linspace(lo.item(), hi.item(), k, dtype=torch.float64)
    elif init == "quantile":
        c = torch.quantile(v, torch.linspace(0, 1, k, dtype=torch.float64))
    else:
        raise ValueError(f"unknown k-means init {init!r}; use linear or quantile")
    c = torch.unique(c)  # sorted; collapses when the values are (nearly) constant
    assign = None
    for _ in range(iterations):
        new_assign = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(c).scatter_add_(0, assign, v)
        counts = torch.zeros_like(c).scatter_add_(0, assign, torch.ones_like(v))
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)  # empty cells keep their centroid
        c, _ = torch.sort(c)
    assign = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
    return c.float(), assign


def neuron_groups(w2d: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Assign each output row to one of ``n_groups`` groups of rows with similar weight spread.

    Rows are ordered by their standard deviation and cut into contiguous, equally sized
    groups, so each codebook serves similarly distributed neurons (no per-weight cost).
    """
    rows = w2d.shape[0]
    n_groups = max(1, min(n_groups, rows))
    order = torch.argsort(w2d.float().std(dim=1) if w2d.shape[1] > 1 else w2d.float().abs().flatten())
    groups = torch.empty(rows, dtype=torch.long)
    groups[order] = torch.arange(rows) * n_groups // rows
    return groups


def codebook_quantize(
    weight: torch.Tensor,
    bits: int,
    *,
    mask: torch.Tensor | None = None,
    n_codebooks: int = 1,
    iterations: int = 50,
    init: str = "linear",
) -> CodebookTensor:
    """k-means codebook quantization of one weight tensor.

    Args:
        weight: Linear/Conv weight (output channels first).
        bits: index width; each codebook has at most ``2**bits`` entries.
        mask: pruning mask (True = kept). Without one, exact zeros count as pruned.
        n_codebooks: groups of output neurons with their own codebook.
        iterations, init: k-means settings (``kmeans_1d``).

    Returns:
        A ``CodebookTensor``; pruned weights dequantize to exactly 0 (code 0 is
        then reserved for 0.0 in every codebook).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 1..8, got {bits}")
    w2d = as_matrix(weight.detach()).float()
    rows, cols = w2d.shape
    keep = (w2d != 0) if mask is None else as_matrix(mask).bool()
    reserve_zero = not bool(keep.all())
    k = 2**bits
    k_fit = k - 1 if reserve_zero else k
    groups = neuron_groups(w2d, n_codebooks)
    n_groups = int(groups.max().item()) + 1
    codebook = torch.zeros(n_groups, k)
    codes = torch.zeros(rows, cols, dtype=torch.long)
    for g in range(n_groups):
        row_sel = groups == g
        sub_w, sub_keep = w2d[row_sel], keep[row_sel]
        vals = sub_w[sub_keep]
        offset = 1 if reserve_zero else 0
        if vals.numel() == 0 or k_fit == 0:
            continue  # all pruned: every code is the reserved zero
        cents, assign = kmeans_1d(vals, k_fit, iterations=iterations, init=init)
        codebook[g, offset : offset + len(cents)] = cents
        if len(cents) < k_fit:  # unused entries repeat the last centroid (harmless, never indexed)
            codebook[g, offset + len(cents) :] = cents[-1]
        sub_codes = torch.zeros_like(sub_w, dtype=torch.long)
        sub_codes[sub_keep] = assign + offset
        codes[row_sel] = sub_codes
    return CodebookTensor(
        codes=codes.to(torch.uint8).reshape(weight.shape).contiguous(),
        bits=bits,
        codebook=codebook,
        codebook_of_row=groups.to(torch.int32) if n_groups > 1 else torch.zeros(rows, dtype=torch.int32),
        method="codebook",
    )


class _CodebookWeight(nn.Module):
    """Parametrisation ``W = C[g(row), I]``: the weight as a function of trainable centroids."""

    index: torch.Tensor
    which: torch.Tensor
    frozen: torch.Tensor

    def __init__(self, qt: CodebookTensor, reserve_zero: bool):
        super().__init__()
        rows, cols = qt.rows_cols
        self.shape = qt.shape
        self.codebook = nn.Parameter(qt.codebook.float().clone())
        self.register_buffer("index", qt.codes.reshape(rows, cols).long())
        self.register_buffer("which", qt.row_codebooks())
        # The reserved zero code (code 0 when pruned weights exist) must stay exactly 0.
        frozen = torch.zeros_like(self.codebook, dtype=torch.bool)
        if reserve_zero:
            frozen[:, 0] = True
        self.register_buffer("frozen", frozen)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        table = self.codebook[self.which]  # (rows, k)
        return torch.gather(table, 1, self.index).reshape(self.shape)

    def clamp_frozen(self) -> None:
        with torch.no_grad():
            self.codebook.masked_fill_(self.frozen, 0.0)


def finetune_codebooks(
    model: nn.Module,
    quant: dict[str, CodebookTensor],
    train: Callable[[nn.Module, list[nn.Parameter], Callable[[], None]], object],
) -> dict[str, CodebookTensor]:
    """Fine-tune the centroids of ``quant``'s codebooks inside ``model`` (assignments fixed).

    Args:
        model: holds the parameters named in ``quant``.
        quant: ``{"<layer>.weight": CodebookTensor}``.
        train: ``train(model, params, after_step)`` runs the training loop (e.g. a closure
            over ``compress.train.fit``) on ``params`` and calls ``after_step`` after each step.

    Returns:
        The same tensors with fine-tuned codebooks (indices unchanged).
    """
    from torch.nn.utils import parametrize

    modules = dict(model.named_modules())
    parts: dict[str, _CodebookWeight] = {}
    for pname, qt in quant.items():
        layer_name, _, attr = pname.rpartition(".")
        reserve_zero = bool((qt.codebook[:, 0] == 0).all() and (qt.codes == 0).any())
        part = _CodebookWeight(qt, reserve_zero)
        parametrize.register_parametrization(modules[layer_name], attr, part, unsafe=True)
        parts[pname] = part
    try:
        params = [p.codebook for p in parts.values()]

        def after_step() -> None:
            for p in parts.values():
                p.clamp_frozen()

        train(model, params, after_step)
    finally:
        for pname in parts:
            layer_name, _, attr = pname.rpartition(".")
            parametrize.remove_parametrizations(modules[layer_name], attr, leave_parametrized=True)
    out = {}
    for pname, qt in quant.items():
        cb = parts[pname].codebook.detach().clone()
        cb.masked_fill_(parts[pname].frozen, 0.0)
        out[pname] = dataclasses.replace(qt, codebook=cb)
    return out


def quantize_method(state, config, ctx, chosen: dict, masks: dict) -> tuple[dict[str, CodebookTensor], dict]:
    """The ``codebook`` method of the quantize stage (see ``compress.quantize.stage``).

    ``chosen`` maps canonical parameter names to ``(WeightTarget, bits)``.
    """
    from compress.config import TrainingLoss
    from compress.quantize.rtn import weight_rel_error
    from compress.train import fit, loss_from_config

    params = state.parameters_by_name()
    floats = {pname: params[pname].detach().clone() for pname in chosen}
    new: dict[str, CodebookTensor] = {}
    for pname, (_, bits) in chosen.items():
        new[pname] = codebook_quantize(
            params[pname],
            bits,
            mask=masks[pname],
            n_codebooks=config.codebooks_per_layer,
            iterations=config.iterations,
            init=config.init,
        )
    report = {
        target.key: {
            "bits": bits,
            "codebooks": int(new[pname].codebook.shape[0]),
            "weight_rel_error": weight_rel_error(new[pname], floats[pname]),
        }
        for pname, (target, bits) in chosen.items()
    }
    if config.finetune is not None and config.finetune.epochs > 0 and new:
        train = ctx.data["train"]
        # Biases and float layers stay as they are: only the centroids move.
        with torch.no_grad():
            for pname, qt in new.items():
                params[pname].copy_(qt.dequantize())
        # A parametrization replaces the attribute of one module: a Parameter shared by
        # several modules, or a recurrent layer's weights (read through its flat weight
        # list), would bypass it, so those keep their k-means centroids.
        shared = _shared_parameters(state.module)
        tunable = {
            p: qt
            for p, qt in new.items()
            if p not in shared and not isinstance(state.module.get_submodule(chosen[p][0].layer), nn.RNNBase)
        }
        for pname in set(new) - set(tunable):
            report[chosen[pname][0].key]["finetuned"] = False
        loss_config = config.finetune_loss or TrainingLoss(loss="ce" if train.y is not None else "kd")
        loss_fn = loss_from_config(loss_config)
        teacher = ctx.reference if loss_config.loss == "kd" else None

        def run(model, cb_params, after_step):
            return fit(
                model,
                train.x,
                train.y,
                config.finetune,
                loss_fn=loss_fn,
                teacher=teacher,
                params=cb_params,
                after_step=after_step,
            )

        if tunable:
            owners = {p: f"{chosen[p][0].layer}.{chosen[p][0].attr}" for p in tunable}
            tuned = finetune_codebooks(state.module, {owners[p]: qt for p, qt in tunable.items()}, run)
            new.update({p: tuned[owners[p]] for p in tunable})
        for pname in tunable:
            report[chosen[pname][0].key]["finetuned_weight_rel_error"] = weight_rel_error(new[pname], floats[pname])
    return new, report


def _shared_parameters(module: nn.Module) -> set[str]:
    """Canonical names of Parameters reachable under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {v[0] for v in names.values() if len(v) > 1}
