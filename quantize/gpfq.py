"""GPFQ: greedy path-following quantization (Zhang, Zhou, Saab 2023).

For one layer with float-network inputs ``X`` (m × N) and quantized-network inputs ``X̃``,
every output neuron ``w`` is quantized column by column (all neurons at once)::

    u_0 = 0;  q_t = Q(<X̃_t, u_{t-1} + w_t X_t> / ||X̃_t||²);  u_t = u_{t-1} + w_t X_t - q_t X̃_t

The loop never materialises ``u`` (m × neurons). It keeps ``V = <X̃_i, u>`` for every column
``i`` instead, which only needs the Gram matrices ``G = X̃ᵀX`` and ``H = X̃ᵀX̃`` (N × N,
accumulated over calibration batches). Columns are processed in blocks: inside a block the
rank-1 updates touch only the block, and the rest of ``V`` is updated once per block with
two matrix products (as GPTQ's lazy batch updates), so the cost is O(N²·neurons) in BLAS-3.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from compress.qtensor import QuantizedTensor, signed_range
from compress.quantize.rtn import as_matrix, expand_to_columns, round_to_grid, uniform_scale

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LayerStats:
    """Second moments of one layer's inputs, accumulated over calibration batches.

    ``G = X̃ᵀX``, ``H = X̃ᵀX̃``, ``F = XᵀX`` (float64, N × N) and the column sums of ``X`` and
    ``X̃`` (for bias correction), over ``count`` rows (samples or patches).
    """

    n: int
    G: torch.Tensor = field(init=False)
    H: torch.Tensor = field(init=False)
    F: torch.Tensor = field(init=False)
    sum_x: torch.Tensor = field(init=False)
    sum_xt: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.G, self.H, self.F = z(self.n, self.n), z(self.n, self.n), z(self.n, self.n)
        self.sum_x, self.sum_xt = z(self.n), z(self.n)

    def add(self, x: torch.Tensor, x_tilde: torch.Tensor) -> None:
        """Add rows ``x`` (float inputs) and ``x_tilde`` (quantized-network inputs), both (rows, N)."""
        x, xt = x.double(), x_tilde.double()
        self.G += xt.T @ x
        self.H += xt.T @ xt
        self.F += x.T @ x
        self.sum_x += x.sum(0)
        self.sum_xt += xt.sum(0)
        self.count += x.shape[0]

    def merged(self, other: "LayerStats") -> "LayerStats":
        """The statistics of both sets of rows (sums are additive)."""
        out = LayerStats(self.n)
        for key in ("G", "H", "F", "sum_x", "sum_xt"):
            setattr(out, key, getattr(self, key) + getattr(other, key))
        out.count = self.count + other.count
        return out

    @classmethod
    def from_data(cls, x: torch.Tensor, x_tilde: torch.Tensor) -> "LayerStats":
        stats = cls(x.shape[1])
        stats.add(x, x_tilde)
        return stats


def output_error(w2d: torch.Tensor, q2d: torch.Tensor, stats: LayerStats) -> float:
    """Relative squared output error ``‖XWᵀ − X̃Qᵀ‖² / ‖XWᵀ‖²`` from the Gram matrices."""
    w, q = w2d.double(), q2d.double()
    ref = (w @ stats.F * w).sum()
    err = ref - 2 * (q @ stats.G * w).sum() + (q @ stats.H * q).sum()
    return (err.clamp_min(0) / ref.clamp_min(1e-300)).item()


def gpfq_codes(
    w2d: torch.Tensor,
    stats: LayerStats,
    bits: int,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    sparsity: str = "none",
    sparsity_lambda: float = 0.1,
    block_size: int = 128,
) -> torch.Tensor:
    """The greedy path-following codes of one layer's weight.

    Args:
        w2d: the float weight as ``(neurons, N)``.
        stats: Gram matrices of the layer's inputs (``LayerStats``).
        bits: code width; codes lie in ``signed_range(bits)``.
        scale: ``(neurons|1, groups)`` step sizes (``uniform_scale``).
        zero_point: int8 like ``scale``, or None for a symmetric grid.
        mask: pruning mask ``(neurons, N)`` (True = kept); pruned weights get the zero code and
            the error they leave is carried to the remaining columns like any other.
        sparsity: ``none``, ``l1`` (soft threshold: ``sign(z)·max(|z|−λ, 0)``) or ``l0`` (hard
            threshold: ``z`` rounds to 0 unless ``|z| > ½ + λ``), where ``z`` is the
            argument of Q in units of the step.
        sparsity_lambda: λ, in steps.
        block_size: columns per block (speed only).

    Returns:
        int8 codes ``(neurons, N)``.
    """
    rows, n = w2d.shape
    if stats.n != n:
        raise ValueError(f"layer statistics are for {stats.n} inputs but the weight has {n} columns")
    if sparsity not in ("none", "l1", "l0"):
        raise ValueError(f"unknown sparsity variant {sparsity!r}; use none, l1 or l0")
    qmin, qmax = signed_range(bits)
    dtype = torch.float32
    # Normalise by the row count so magnitudes stay O(1) (the loop runs in float32).
    norm = 1.0 / max(stats.count, 1)
    G = (stats.G * norm).to(dtype)
    H = (stats.H * norm).to(dtype)
    Gt = G.T.contiguous()  # Gt[t] = G[:, t] = <X̃_i, X_t> for all i
    diag_g = torch.diagonal(G).clone()
    diag_h = torch.diagonal(H).clone()
    dead = diag_h <= 1e-12 * diag_h.max().clamp_min(1e-30)
    inv_h = torch.where(dead, torch.zeros_like(diag_h), 1.0 / diag_h.clamp_min(1e-30))

    # Column-major working copies (one row per input column t): every access in the loop
    # below (column t, the columns of a block) is then a contiguous slice.
    Wt = w2d.detach().to(dtype).T.contiguous()
    St = expand_to_columns(scale.to(dtype), rows, n).T.contiguous()
    Zt = (
        expand_to_columns(zero_point.to(dtype), rows, n).T.contiguous()
        if zero_point is not None
        else torch.zeros(n, rows, dtype=dtype)
    )
    keep = None if mask is None else mask.reshape(rows, n).bool().T.contiguous()
    Vt = torch.zeros(n, rows, dtype=dtype)  # Vt[i] = <X̃_i, u> for every neuron
    Qt = torch.zeros(n, rows, dtype=dtype)  # dequantized values q_t
    codes = torch.zeros(n, rows, dtype=dtype)

    for a in range(0, n, block_size):
        b = min(a + block_size, n)
        for t in range(a, b):
            w_t = Wt[t]
            if dead[t]:
                arg = w_t  # X̃_t is zero on the calibration data: any q_t fits it; keep w_t's nearest
            else:
                arg = (Vt[t] + w_t * diag_g[t]) * inv_h[t]
            z = arg / St[t]
            if sparsity == "l1":
                z = torch.sign(z) * (z.abs() - sparsity_lambda).clamp_min(0)
            elif sparsity == "l0":
                z = torch.where(z.abs() > 0.5 + sparsity_lambda, z, torch.zeros_like(z))
            c = (torch.round(z) + Zt[t]).clamp_(qmin, qmax)
            if keep is not None:
                c = torch.where(keep[t], c, Zt[t])
            codes[t] = c
            q_t = (c - Zt[t]) * St[t]
            Qt[t] = q_t
            if t + 1 < b:
                # V[:, i] += w_t G[i, t] − q_t H[i, t] for the rest of the block
                Vt[t + 1 : b].addr_(Gt[t, t + 1 : b], w_t).addr_(H[t, t + 1 : b], q_t, alpha=-1.0)
        if b < n:
            Vt[b:].addmm_(Gt[a:b, b:].T, Wt[a:b]).addmm_(H[a:b, b:].T, Qt[a:b], alpha=-1.0)
    return codes.T.contiguous().to(torch.int8)


def gpfq_quantize_matrix(
    w2d: torch.Tensor,
    x: torch.Tensor,
    x_tilde: torch.Tensor | None = None,
    bits: int = 4,
    *,
    granularity: str = "per_channel",
    group_size: int = 32,
    symmetric: bool = True,
    scale_factor: float = 1.16,
    range_quantile: float = 1.0,
    sparsity: str = "none",
    sparsity_lambda: float = 0.1,
    block_size: int = 128,
) -> QuantizedTensor:
    """GPFQ of a single weight matrix from its input data (for tests and experiments).

    Args:
        w2d: ``(neurons, N)`` weight.
        x: ``(m, N)`` float-network inputs.
        x_tilde: ``(m, N)`` quantized-network inputs (default: ``x``).
        bits, granularity, group_size, symmetric, scale_factor, range_quantile, sparsity,
            sparsity_lambda, block_size: as in ``GPFQConfig``.
    """
    stats = LayerStats.from_data(x, x if x_tilde is None else x_tilde)
    scale, zp = uniform_scale(
        w2d, bits, granularity=granularity, group_size=group_size, symmetric=symmetric,
        factor=scale_factor, quantile=range_quantile, full_range=True,
    )
    codes = gpfq_codes(
        w2d, stats, bits, scale, zp, sparsity=sparsity, sparsity_lambda=sparsity_lambda, block_size=block_size
    )
    return QuantizedTensor(codes=codes, bits=bits, scale=scale, zero_point=zp, method="gpfq")


# --- capturing layer inputs --------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a capture hook once the layer's input is in hand: the rest of the pass is waste."""


def _capture_input(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0].detach())
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the layer was not called in the model's forward pass")
    return captured[0]


def supports_gpfq(layer: nn.Module) -> bool:
    """Whether ``layer``'s inputs can be unfolded into patches (else RTN is used)."""
    if isinstance(layer, nn.Linear):
        return True
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return False


def layer_rows(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows matching its flattened weight: ``(samples·positions, in_flat)``."""
    if isinstance(layer, nn.Linear):
        return inp.reshape(-1, inp.shape[-1])
    if isinstance(layer, nn.Conv1d):
        patches = F.unfold(
            inp.unsqueeze(2),
            kernel_size=(1, layer.kernel_size[0]),
            dilation=(1, layer.dilation[0]),
            padding=(0, layer.padding[0]),
            stride=(1, layer.stride[0]),
        )
    else:
        patches = F.unfold(inp, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the quantizable layers in the order the forward pass calls them."""
    return [name for group in shared_input_groups(model, example) for name in group]


def shared_input_groups(model: nn.Module, example: torch.Tensor) -> list[list[str]]:
    """The quantizable layers in forward order, consecutive Linear layers fed the very same
    tensor grouped together (an attention block's query, key and value projections).

    Quantizing one member of a group cannot change the others' input, so a group's
    calibration statistics are captured once for all of its members.
    """
    order: list[str] = []
    inputs: dict[str, int] = {}
    alive: list[torch.Tensor] = []  # held so that no tensor id is reused during the pass

    def record(name):
        def hook(_module, args):
            if name not in inputs:
                order.append(name)
                inputs[name] = id(args[0])
                alive.append(args[0])

        return hook

    handles = [
        mod.register_forward_pre_hook(record(name))
        for name, mod in model.named_modules()
        if isinstance(mod, QUANTIZABLE)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    groups: list[list[str]] = []
    for name in order:
        prev = groups[-1][-1] if groups else None
        if (prev is not None and inputs[prev] == inputs[name]
                and isinstance(modules[prev], nn.Linear) and isinstance(modules[name], nn.Linear)):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


@dataclass
class LayerPlan:
    """How one layer is to be quantized."""

    bits: int
    granularity: str = "per_channel"
    group_size: int = 32
    symmetric: bool = True
    mask: torch.Tensor | None = None


@torch.no_grad()
def collect_stats(
    float_model: nn.Module,
    quant_model: nn.Module,
    float_layer: nn.Module,
    quant_layer: nn.Module,
    batches: Iterable[torch.Tensor],
    total: int,
    max_patches: int,
    generator: torch.Generator,
) -> LayerStats:
    """Accumulate a layer's ``LayerStats`` batch by batch (memory: one batch's activations).

    Convolution patches are subsampled (the same positions for both networks) so that at most
    about ``max_patches`` rows enter the statistics. A Linear layer of a model that defines
    ``token_mask(x)`` (``compress.padding``) sees only the data positions, not the padding.
    """
    from compress.padding import token_mask, valid_rows

    stats: LayerStats | None = None
    for xb in batches:
        x_in = _capture_input(float_model, float_layer, xb)
        xt_in = _capture_input(quant_model, quant_layer, xb)
        mask = token_mask(quant_model, xb) if isinstance(float_layer, nn.Linear) else None
        if mask is not None:
            x, xt = valid_rows(x_in, mask), valid_rows(xt_in, mask)
        else:
            x, xt = layer_rows(float_layer, x_in), layer_rows(quant_layer, xt_in)
        if x.shape[0] > xb.shape[0]:  # several rows per sample: patches (or tokens)
            budget = max(1, math.ceil(max_patches * xb.shape[0] / max(total, 1)))
            if budget < x.shape[0]:
                idx = torch.randperm(x.shape[0], generator=generator)[:budget]
                x, xt = x[idx], xt[idx]
        if stats is None:
            stats = LayerStats(x.shape[1])
        stats.add(x, xt)
    if stats is None:
        raise ValueError("GPFQ needs calibration data, got no batches")
    return stats


# The step-size constants C that scale_factor="auto" tries per layer (1.16: the paper's default).
AUTO_SCALE_FACTORS = (0.8, 0.9, 1.0, 1.16, 1.3)


@torch.no_grad()
def gpfq_quantize_model(
    model: nn.Module,
    calibration: torch.Tensor,
    plans: dict[str, LayerPlan],
    *,
    scale_factor: float | tuple[float, ...] = 1.16,
    range_quantile: float = 1.0,
    sparsity: str = "none",
    sparsity_lambda: float = 0.1,
    bias_correction: bool = False,
    batch_size: int = 256,
    max_patches: int = 16384,
    block_size: int = 128,
    seed: int = 0,
    auto_holdout: float = 0.0,
    activation_spec: dict | None = None,
) -> tuple[dict[str, QuantizedTensor], dict[str, dict]]:
    """Quantize ``model``'s planned layers with GPFQ, in network order, in place.

    Each layer's weight is replaced by its dequantized value as soon as it is quantized, so
    later layers see the quantized network's inputs ``X̃``; a deep copy taken first provides
    the float network's inputs ``X``.

    Args:
        model: evaluated in eval mode; its planned layers' weights are overwritten (and their
            biases, with ``bias_correction``).
        calibration: calibration inputs (batch first).
        plans: layer name → ``LayerPlan``; layers not named stay as they are.
        scale_factor: C, or a tuple of candidates: each layer keeps the one with the lowest
            output error on the calibration data.
        range_quantile, sparsity, sparsity_lambda, bias_correction, batch_size,
            max_patches, block_size: as in ``GPFQConfig``.
        seed: seeds the patch subsampling and the hold-out split.
        auto_holdout: with several ``scale_factor`` candidates, the fraction of calibration
            samples held out: codes are fit on the rest and C is chosen by the output error
            on the held-out samples (so C is not chosen on the rows it was fit to), then the
            codes are refit on all samples with that C.
        activation_spec: ``state.extras["activation_quantization"]``: while quantizing, the
            quantized network's layers see 8-bit inputs, so X̃ carries the activation error.

    Returns:
        ``{"<layer>.weight": QuantizedTensor}`` and per-layer facts
        (``bits``, ``granularity``, ``output_rel_error``, ``rtn_output_rel_error``, ``weight_rel_error``).
    """
    was_training = model.training
    model.eval()
    float_model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    float_modules = dict(float_model.named_modules())
    groups = [[n for n in g if n in plans] for g in shared_input_groups(model, calibration[:2])]
    groups = [g for g in groups if g]
    order = [n for g in groups for n in g]
    first_of_group = {n: g[0] for g in groups for n in g}
    last_of_group = {g[-1]: g[0] for g in groups}
    shared: dict[str, LayerStats] = {}  # a group's statistics, captured by its first member
    missing = set(plans) - set(order)
    if missing:
        raise ValueError(f"layers {sorted(missing)} are not called in the model's forward pass")
    gen = torch.Generator().manual_seed(seed)
    total = len(calibration)
    multi = isinstance(scale_factor, tuple) and len(scale_factor) > 1
    n_hold = round(total * auto_holdout) if multi else 0
    if n_hold and total - n_hold < 1:
        n_hold = 0
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 1)) if n_hold else None
    parts = ([calibration[perm[n_hold:]], calibration[perm[:n_hold]]] if n_hold else [calibration])
    quant: dict[str, QuantizedTensor] = {}
    report: dict[str, dict] = {}
    from compress.quantize.activations import quantized_inputs

    act_ctx = quantized_inputs(model, activation_spec)  # after the deep copy: the float network stays float
    act_ctx.__enter__()
    try:
        _gpfq_layers(
            model, float_model, modules, float_modules, order, plans, first_of_group, last_of_group, shared, parts,
            gen, quant, report, scale_factor=scale_factor, range_quantile=range_quantile, sparsity=sparsity,
            sparsity_lambda=sparsity_lambda, bias_correction=bias_correction, batch_size=batch_size,
            max_patches=max_patches, block_size=block_size,
        )
    finally:
        act_ctx.__exit__(None, None, None)
    model.train(was_training)
    return quant, report


def _gpfq_layers(
    model, float_model, modules, float_modules, order, plans, first_of_group, last_of_group, shared, parts, gen,
    quant, report, *, scale_factor, range_quantile, sparsity, sparsity_lambda, bias_correction, batch_size,
    max_patches, block_size,
) -> None:
    """The layer loop of ``gpfq_quantize_model`` (fills ``quant`` and ``report``)."""
    for name in order:
        plan, layer = plans[name], modules[name]
        w2d = as_matrix(layer.weight.detach()).float()
        rows, cols = w2d.shape
        factors = scale_factor if isinstance(scale_factor, tuple) else (scale_factor,)

        def grid(factor: float):
            return uniform_scale(
                w2d, plan.bits, granularity=plan.granularity, group_size=plan.group_size, symmetric=plan.symmetric,
                factor=factor, quantile=range_quantile, full_range=True,
            )

        if not supports_gpfq(layer):
            log.warning("layer %s (%s) is not supported by GPFQ; using round-to-nearest", name, type(layer).__name__)
            scale, zp = grid(factors[0])
            codes = round_to_grid(w2d, scale, zp, plan.bits)
            stats = None
        else:
            head = first_of_group[name]
            if head not in shared:
                shared[head] = [
                    collect_stats(
                        float_model, model, float_modules[head], modules[head],
                        (part[i : i + batch_size] for i in range(0, len(part), batch_size)),
                        len(part), max_patches, gen,
                    )
                    for part in parts
                ]
            fit_stats = shared[head][0]
            val_stats = shared[head][1] if len(shared[head]) > 1 else fit_stats
            stats = fit_stats if len(shared[head]) == 1 else fit_stats.merged(val_stats)
            mask = None if plan.mask is None else as_matrix(plan.mask)
            best = None
            # Several C: keep the alphabet whose GPFQ output error ‖Xw − X̃q‖ is lowest on the
            # held-out samples (the statistics are shared, so each try is cheap).
            for factor in factors:
                scale, zp = grid(factor)
                codes = gpfq_codes(
                    w2d, fit_stats, plan.bits, scale, zp, mask=mask, sparsity=sparsity,
                    sparsity_lambda=sparsity_lambda, block_size=block_size,
                )
                if len(factors) > 1:
                    deq = codes.float() - (0 if zp is None else expand_to_columns(zp, rows, cols).float())
                    err = output_error(w2d, deq * expand_to_columns(scale, rows, cols), val_stats)
                    if best is None or err < best[0]:
                        best = (err, factor, scale, zp, codes)
            if best is not None:
                _, chosen, scale, zp, codes = best
                if stats is not fit_stats:  # refit on every sample with the chosen alphabet
                    codes = gpfq_codes(
                        w2d, stats, plan.bits, scale, zp, mask=mask, sparsity=sparsity,
                        sparsity_lambda=sparsity_lambda, block_size=block_size,
                    )
                log.debug("gpfq %s: scale factor C = %g", name, chosen)
        qt = QuantizedTensor(
            codes=codes.reshape(layer.weight.shape).contiguous(), bits=plan.bits, scale=scale, zero_point=zp, method="gpfq"
        )
        q2d = as_matrix(qt.dequantize())
        info: dict = {"bits": plan.bits, "granularity": qt.granularity,
                      "weight_rel_error": ((q2d - w2d).norm() / w2d.norm().clamp_min(1e-30)).item()}
        if stats is not None:
            info["output_rel_error"] = output_error(w2d, q2d, stats)
            rtn_scale, rtn_zp = uniform_scale(w2d, plan.bits, granularity=plan.granularity,
                                              group_size=plan.group_size, symmetric=plan.symmetric)
            rtn = (round_to_grid(w2d, rtn_scale, rtn_zp, plan.bits).float()
                   - (0 if rtn_zp is None else expand_to_columns(rtn_zp, rows, cols).float()))
            info["rtn_output_rel_error"] = output_error(w2d, rtn * expand_to_columns(rtn_scale, rows, cols), stats)
            if bias_correction and layer.bias is not None:
                # E[x]·w − E[x̃]·q per output: the mean shift the quantization introduced.
                mean_x = (stats.sum_x / stats.count).float()
                mean_xt = (stats.sum_xt / stats.count).float()
                layer.bias.add_(w2d @ mean_x - q2d @ mean_xt)
        layer.weight.copy_(q2d.reshape(layer.weight.shape).to(layer.weight.dtype))
        quant[f"{name}.weight"] = qt
        report[name] = info
        if name in last_of_group:
            shared.pop(last_of_group[name], None)  # N×N float64 matrices: free them early
        log.debug("gpfq %s: %s", name, info)


def quantize_method(state, config, ctx, chosen: dict[str, int], masks: dict) -> tuple[dict[str, QuantizedTensor], dict]:
    """The ``gpfq`` method of the quantize stage (see ``compress.quantize.stage``)."""
    calib = ctx.data.calibration().x
    if config.calibration_samples is not None and config.calibration_samples < len(calib):
        g = torch.Generator().manual_seed(ctx.seed)
        calib = calib[torch.randperm(len(calib), generator=g)[: config.calibration_samples]]
    plans = {
        name: LayerPlan(bits, config.granularity, config.group_size, config.symmetric, masks[name])
        for name, bits in chosen.items()
    }
    return gpfq_quantize_model(
        state.module, calib, plans,
        scale_factor=AUTO_SCALE_FACTORS if config.scale_factor == "auto" else config.scale_factor,
        range_quantile=config.range_quantile,
        sparsity=config.sparsity, sparsity_lambda=config.sparsity_lambda,
        bias_correction=config.bias_correction, batch_size=config.batch_size,
        max_patches=config.max_patches, block_size=config.block_size, seed=ctx.seed,
        auto_holdout=config.auto_holdout,
        activation_spec=state.extras.get("activation_quantization"),
    )
