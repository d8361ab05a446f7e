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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from compress.grid import as_matrix, expand_to_columns, round_to_grid, uniform_scale, zero_codes
from compress.qtensor import QuantizedTensor, UniformTensor, signed_range

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

    def merged(self, other: LayerStats) -> LayerStats:
        """The statistics of both sets of rows (sums are additive)."""
        out = LayerStats(self.n)
        for key in ("G", "H", "F", "sum_x", "sum_xt"):
            setattr(out, key, getattr(self, key) + getattr(other, key))
        out.count = self.count + other.count
        return out

    @classmethod
    def from_data(cls, x: torch.Tensor, x_tilde: torch.Tensor) -> LayerStats:
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
        w2d,
        bits,
        granularity=granularity,
        group_size=group_size,
        symmetric=symmetric,
        factor=scale_factor,
        quantile=range_quantile,
        full_range=True,
    )
    codes = gpfq_codes(
        w2d, stats, bits, scale, zp, sparsity=sparsity, sparsity_lambda=sparsity_lambda, block_size=block_size
    )
    return UniformTensor(codes=codes, bits=bits, scale=scale, zero_point=zp, method="gpfq")


# --- capturing layer inputs --------------------------------------------------------------
#
# A weight's GPFQ statistics need the inputs it multiplies. Each weight is a "unit" with a
# capture kind:
#   module   Linear / Conv: the layer's own input (a grouped conv: one block per group)
#   mha_in   MultiheadAttention's in_proj (q, k, v rows: one block each, fed query/key/value)
#   mha_out  MultiheadAttention's out_proj: MHA reads out_proj.weight directly (the Linear is
#            never called), so its input is captured as the MHA's output with out_proj set
#            to the identity for that one pass
#   rnn_in   GRU/LSTM/RNN weight_ih_l0 (and _reverse): the layer's input sequence
# A weight without captured inputs (a recurrent layer's hidden-state matrices, the inputs
# of its upper layers) is rounded to nearest instead, and the report says so.


class _StopForward(Exception):
    """Raised by a capture hook once the layer's input is in hand: the rest of the pass is waste."""


def _run_until(model: nn.Module, x: torch.Tensor) -> None:
    try:
        with _no_mha_fastpath():
            model(x)
    except _StopForward:
        pass


class _no_mha_fastpath:
    """PyTorch's fused Transformer fast path bypasses submodule calls (and hooks): off while capturing."""

    def __enter__(self):
        self.before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.before)


def _capture_input(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _capture_args(model, layer, x)[0]


def _capture_args(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> list:
    captured: list = []

    def hook(_module, args, kwargs):
        captured.extend(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        for k in ("query", "key", "value"):
            if k in kwargs:
                captured.append(kwargs[k].detach())
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run_until(model, x)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the layer was not called in the model's forward pass")
    return captured


@torch.no_grad()
def _capture_mha_output(model: nn.Module, mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention output that enters ``mha.out_proj`` (set to the identity for this pass)."""
    captured: list[torch.Tensor] = []
    w, b = (
        mha.out_proj.weight.detach().clone(),
        None if mha.out_proj.bias is None else mha.out_proj.bias.detach().clone(),
    )

    def hook(_module, _args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())
        raise _StopForward

    handle = mha.register_forward_hook(hook)
    try:
        mha.out_proj.weight.copy_(torch.eye(w.shape[0], w.shape[1], dtype=w.dtype))
        if b is not None:
            mha.out_proj.bias.zero_()
        _run_until(model, x)
    finally:
        handle.remove()
        mha.out_proj.weight.copy_(w)
        if b is not None:
            mha.out_proj.bias.copy_(b)
    if not captured:
        raise RuntimeError("the attention layer was not called in the model's forward pass")
    return captured[0]


def supports_gpfq(layer: nn.Module) -> bool:
    """Whether ``layer``'s inputs can be unfolded into patches (else RTN is used)."""
    if isinstance(layer, nn.Linear):
        return True
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return False


def layer_rows(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows matching its flattened weight: ``(samples·positions, in_flat)``.

    For a grouped convolution pass one group's input channels: the rows then match that
    group's weight rows (``(out/groups, in/groups · kernel)``).
    """
    if isinstance(layer, nn.Linear):
        return inp.reshape(-1, inp.shape[-1])
    if isinstance(layer, nn.Conv1d):
        patches = F.unfold(
            inp.unsqueeze(2),
            kernel_size=(1, layer.kernel_size[0]),
            dilation=(1, layer.dilation[0]),
            # Only layers that pass ``supports_gpfq`` get here: their padding is numeric, never
            # a string ("same"/"valid").
            padding=(0, cast(tuple[int, ...], layer.padding)[0]),
            stride=(1, layer.stride[0]),
        )
    else:
        # ``supports_gpfq`` admits only Linear, Conv1d and Conv2d (with numeric padding): what
        # is neither of the first two is a Conv2d.
        conv = cast(nn.Conv2d, layer)
        patches = F.unfold(
            inp,
            conv.kernel_size,
            dilation=conv.dilation,
            padding=cast(tuple[int, ...], conv.padding),
            stride=conv.stride,
        )
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@dataclass
class _Unit:
    """One planned weight: where it lives and how its inputs are captured."""

    key: str  # the plan key (a layer name for "<layer>.weight", else the parameter name)
    param: str  # "<owner>.<attr>"
    owner: str  # module holding the parameter
    attr: str
    kind: str  # module | mha_in | mha_out | rnn_in | rtn
    reason: str = ""  # why a "rtn" unit has no GPFQ

    def blocks(self, layer: nn.Module, rows: int) -> list[slice]:
        """Row slices of the weight with their own inputs (groups, q/k/v)."""
        if self.kind == "module" and isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups > 1:
            per = rows // layer.groups
            return [slice(g * per, (g + 1) * per) for g in range(layer.groups)]
        if self.kind == "mha_in" and self.attr == "in_proj_weight":
            per = rows // 3
            return [slice(0, per), slice(per, 2 * per), slice(2 * per, rows)]
        return [slice(0, rows)]


def _resolve_unit(model: nn.Module, key: str, modules: dict[str, nn.Module]) -> _Unit:
    if key in modules and isinstance(getattr(modules[key], "weight", None), nn.Parameter):
        owner, attr = key, "weight"
    else:
        owner, _, attr = key.rpartition(".")
        if owner not in modules or not isinstance(getattr(modules[owner], attr, None), nn.Parameter):
            raise ValueError(f"GPFQ plan {key!r} names neither a layer with a weight nor a parameter of the model")
    layer = modules[owner]
    param = f"{owner}.{attr}" if owner else attr
    parent_name, _, child = owner.rpartition(".")
    parent = modules.get(parent_name)
    if isinstance(layer, nn.Linear) and child == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        return _Unit(key, param, owner, attr, "mha_out")
    if isinstance(layer, nn.MultiheadAttention):
        return _Unit(key, param, owner, attr, "mha_in")
    if isinstance(layer, nn.RNNBase):
        if attr in ("weight_ih_l0", "weight_ih_l0_reverse"):
            return _Unit(key, param, owner, attr, "rnn_in")
        what = (
            "hidden state"
            if attr.startswith("weight_hh") or attr.startswith("weight_hr")
            else "inputs of an upper layer"
        )
        return _Unit(
            key,
            param,
            owner,
            attr,
            "rtn",
            f"{type(layer).__name__} {attr}: its {what} is not captured, rounded to nearest",
        )
    if supports_gpfq(layer):
        return _Unit(key, param, owner, attr, "module")
    return _Unit(
        key,
        param,
        owner,
        attr,
        "rtn",
        f"{type(layer).__name__} with padding {layer.padding!r}/"
        f"{getattr(layer, 'padding_mode', '')} cannot be unfolded into patches, rounded to nearest",
    )


def _capture_rows(model: nn.Module, unit: _Unit, xb: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """The unit's inputs on batch ``xb`` as rows, one matrix per weight block."""
    layer = model.get_submodule(unit.owner)
    if unit.kind == "module":
        inp = _capture_input(model, layer, xb)
        if blocks > 1:  # grouped conv: each group sees its own input channels
            c = inp.shape[1] // blocks
            return [layer_rows(layer, inp[:, g * c : (g + 1) * c]) for g in range(blocks)]
        return [layer_rows(layer, inp)]
    if unit.kind == "mha_in":
        q, k, v = _capture_args(model, layer, xb)[:3]
        by_attr = {"q_proj_weight": [q], "k_proj_weight": [k], "v_proj_weight": [v], "in_proj_weight": [q, k, v]}
        return [t.reshape(-1, t.shape[-1]) for t in by_attr[unit.attr]]
    if unit.kind == "mha_out":
        # _resolve_unit makes an "mha_out" unit only for the out_proj of a MultiheadAttention.
        parent = cast(nn.MultiheadAttention, model.get_submodule(unit.owner.rpartition(".")[0]))
        out = _capture_mha_output(model, parent, xb)
        return [out.reshape(-1, out.shape[-1])]
    if unit.kind == "rnn_in":
        inp = _capture_input(model, layer, xb)
        if not isinstance(inp, torch.Tensor):
            raise _NoStatistics(f"{unit.owner} gets a {type(inp).__name__}, not a tensor")
        return [inp.reshape(-1, inp.shape[-1])]
    raise ValueError(f"no inputs to capture for {unit.param}")


class _NoStatistics(Exception):
    """The unit's inputs cannot be captured: round to nearest instead."""


def unit_order(model: nn.Module, example: torch.Tensor, owners: set[str]) -> list[str]:
    """Module names among ``owners`` in the order the forward pass calls them."""
    order: list[str] = []

    def record(name):
        def hook(_module, _args):
            if name not in order:
                order.append(name)

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if n in owners]
    try:
        with torch.no_grad(), _no_mha_fastpath():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


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
        with torch.no_grad(), _no_mha_fastpath():
            model(example)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    groups: list[list[str]] = []
    for name in order:
        prev = groups[-1][-1] if groups else None
        if (
            prev is not None
            and inputs[prev] == inputs[name]
            and isinstance(modules[prev], nn.Linear)
            and isinstance(modules[name], nn.Linear)
        ):
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
    unit: _Unit | nn.Module,
    quant_layer: nn.Module | None,
    batches: Iterable[torch.Tensor],
    total: int,
    max_patches: int,
    generator: torch.Generator,
    n_blocks: int = 1,
) -> list[LayerStats] | LayerStats:
    """Accumulate a unit's ``LayerStats`` (one per weight block) batch by batch (memory: one
    batch's activations).

    Convolution patches (and tokens) are subsampled (the same positions for both networks)
    so that at most about ``max_patches`` rows enter the statistics. A Linear layer of a
    model that defines ``token_mask(x)`` (``compress.padding``) sees only the data
    positions, not the padding. ``unit`` may be a layer of ``float_model`` (with
    ``quant_layer`` its twin): the statistics of that layer's input, as one ``LayerStats``.
    """
    from compress.padding import token_mask, valid_rows

    single = isinstance(unit, nn.Module)
    if isinstance(unit, nn.Module):
        owner = next(n for n, m in float_model.named_modules() if m is unit)
        unit = _Unit(owner, f"{owner}.weight", owner, "weight", "module")
    stats: list[LayerStats] | None = None
    for xb in batches:
        xs = _capture_rows(float_model, unit, xb, n_blocks)
        xts = _capture_rows(quant_model, unit, xb, n_blocks)
        layer = quant_model.get_submodule(unit.owner)
        mask = token_mask(quant_model, xb) if unit.kind == "module" and isinstance(layer, nn.Linear) else None
        if mask is not None:
            x_in = _capture_input(float_model, float_model.get_submodule(unit.owner), xb)
            xt_in = _capture_input(quant_model, layer, xb)
            xs, xts = [valid_rows(x_in, mask)], [valid_rows(xt_in, mask)]
        if stats is None:
            stats = [LayerStats(x.shape[1]) for x in xs]
        for st, x, xt in zip(stats, xs, xts):
            if x.shape[0] > xb.shape[0]:  # several rows per sample: patches (or tokens)
                budget = max(1, math.ceil(max_patches * xb.shape[0] / max(total, 1)))
                if budget < x.shape[0]:
                    idx = torch.randperm(x.shape[0], generator=generator)[:budget]
                    x, xt = x[idx], xt[idx]
            st.add(x, xt)
    if stats is None:
        raise ValueError("GPFQ needs calibration data, got no batches")
    return stats[0] if single else stats


# The step-size constants C that scale_factor="auto" tries per layer (1.16: the paper's
# default). "auto" also tries round-to-nearest's own grid (step max|w| / (2**(bits-1) - 1))
# and plain rounding on it, so GPFQ's calibration output error is never above RTN's.
AUTO_SCALE_FACTORS = (0.8, 0.9, 1.0, 1.16, 1.3)
RTN_GRID = "rtn"


def _abs_error(
    w2d: torch.Tensor, q2d: torch.Tensor, blocks: list[slice], stats: list[LayerStats]
) -> tuple[float, float]:
    """Squared output error and squared output norm summed over the weight's blocks."""
    err = ref = 0.0
    for sl, st in zip(blocks, stats):
        w, q = w2d[sl].double(), q2d[sl].double()
        r = (w @ st.F * w).sum()
        e = r - 2 * (q @ st.G * w).sum() + (q @ st.H * q).sum()
        err += max(e.item(), 0.0)
        ref += r.item()
    return err, ref


@overload
def _rows_of(side: torch.Tensor, sl: slice) -> torch.Tensor: ...
@overload
def _rows_of(side: None, sl: slice) -> None: ...
def _rows_of(side: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    if side is None or side.shape[0] == 1:
        return side
    return side[sl]


@torch.no_grad()
def gpfq_quantize_model(
    model: nn.Module,
    calibration: torch.Tensor,
    plans: dict[str, LayerPlan],
    *,
    scale_factor: float | tuple = 1.16,
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
    """Quantize ``model``'s planned weights with GPFQ, in network order, in place.

    Each weight is replaced by its dequantized value as soon as it is quantized, so later
    weights see the quantized network's inputs ``X̃``; a deep copy taken first provides the
    float network's inputs ``X``.

    Args:
        model: evaluated in eval mode; its planned weights are overwritten (and their
            biases, with ``bias_correction``).
        calibration: calibration inputs (batch first).
        plans: layer name (for ``<layer>.weight``) or parameter name (``attn.in_proj_weight``,
            ``rnn.weight_ih_l0``) → ``LayerPlan``; weights not named stay as they are.
        scale_factor: C, or a tuple of candidates: each weight keeps the one with the lowest
            output error on the calibration data (``RTN_GRID`` in the tuple: RTN's own grid,
            with GPFQ and with plain rounding on it).
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
        ``{"<param>": QuantizedTensor}`` and per-weight facts keyed like ``plans``
        (``bits``, ``granularity``, ``algorithm``, ``output_rel_error``,
        ``rtn_output_rel_error``, ``weight_rel_error``, ``scale_factor``).
    """
    was_training = model.training
    model.eval()
    float_model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    units = {key: _resolve_unit(model, key, modules) for key in plans}
    owners = {u.owner for u in units.values()} | {
        u.owner.rpartition(".")[0] for u in units.values() if u.kind == "mha_out"
    }
    called = unit_order(model, calibration[:2], owners)
    rank = {n: i for i, n in enumerate(called)}

    def position(u: _Unit) -> tuple:
        if u.kind == "mha_out":  # right after its attention's input projection
            return (rank.get(u.owner.rpartition(".")[0], -1), 1)
        return (rank.get(u.owner, -1), 0)

    missing = [u.key for u in units.values() if position(u)[0] < 0]
    if missing:
        raise ValueError(f"layers {sorted(missing)} are not called in the model's forward pass")
    order = sorted(units.values(), key=position)
    gen = torch.Generator().manual_seed(seed)
    total = len(calibration)
    factors = scale_factor if isinstance(scale_factor, tuple) else (scale_factor,)
    n_hold = round(total * auto_holdout) if len(factors) > 1 else 0
    if n_hold and total - n_hold < 1:
        n_hold = 0
    if n_hold:
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 1))
        parts = [calibration[perm[n_hold:]], calibration[perm[:n_hold]]]
    else:
        parts = [calibration]
    quant: dict[str, QuantizedTensor] = {}
    report: dict[str, dict] = {}
    from compress.quantize.activations import quantized_inputs

    # After the deep copy: the float network stays float, the quantized one sees 8-bit inputs.
    with quantized_inputs(model, activation_spec):
        _gpfq_units(
            model,
            float_model,
            modules,
            order,
            plans,
            parts,
            gen,
            quant,
            report,
            factors=factors,
            range_quantile=range_quantile,
            sparsity=sparsity,
            sparsity_lambda=sparsity_lambda,
            bias_correction=bias_correction,
            batch_size=batch_size,
            max_patches=max_patches,
            block_size=block_size,
            calibration=calibration,
        )
    model.train(was_training)
    return quant, report


def _gpfq_units(
    model,
    float_model,
    modules,
    order,
    plans,
    parts,
    gen,
    quant,
    report,
    *,
    factors,
    range_quantile,
    sparsity,
    sparsity_lambda,
    bias_correction,
    batch_size,
    max_patches,
    block_size,
    calibration,
) -> None:
    """The weight loop of ``gpfq_quantize_model`` (fills ``quant`` and ``report``).

    ``parts`` is ``[calibration]`` or ``[fit rows, held-out rows]``: with a hold-out, each
    candidate alphabet is fit on the first and judged on the second, and the chosen one is
    refit on both.
    """
    # Consecutive Linear layers fed the very same tensor (q/k/v projections) share statistics:
    # quantizing one cannot change the others' input.
    group_of = {n: i for i, g in enumerate(shared_input_groups(model, calibration[:2])) for n in g if len(g) > 1}
    last: tuple = (None, None)
    for unit in order:
        plan = plans[unit.key]
        layer = modules[unit.owner]
        param = getattr(layer, unit.attr)
        w2d = as_matrix(param.detach()).float()
        rows, cols = w2d.shape
        blocks = unit.blocks(layer, rows)

        def grid(factor, w2d=w2d, plan=plan):
            if factor == RTN_GRID:
                return uniform_scale(
                    w2d, plan.bits, granularity=plan.granularity, group_size=plan.group_size, symmetric=plan.symmetric
                )
            return uniform_scale(
                w2d,
                plan.bits,
                granularity=plan.granularity,
                group_size=plan.group_size,
                symmetric=plan.symmetric,
                factor=factor,
                quantile=range_quantile,
                full_range=True,
            )

        stats = parts_stats = None
        algorithm = "gpfq"
        if unit.kind != "rtn":
            try:
                shared = unit.kind == "module" and len(blocks) == 1 and group_of.get(unit.owner) is not None
                parts_stats = last[1] if shared and last[0] == group_of[unit.owner] else None
                if parts_stats is None:
                    parts_stats = [
                        collect_stats(
                            float_model,
                            model,
                            unit,
                            None,
                            (part[i : i + batch_size] for i in range(0, len(part), batch_size)),
                            len(part),
                            max_patches,
                            gen,
                            n_blocks=len(blocks),
                        )
                        for part in parts
                    ]
            except _NoStatistics as err:
                unit = _Unit(unit.key, unit.param, unit.owner, unit.attr, "rtn", str(err) + ", rounded to nearest")
        if parts_stats is None:
            # No inputs to follow: round to nearest on RTN's grid (the report says why).
            scale, zp = grid(RTN_GRID)
            codes = round_to_grid(w2d, scale, zp, plan.bits)
            if plan.mask is not None:
                codes = torch.where(as_matrix(plan.mask).bool(), codes, zero_codes(zp, rows, cols))
            algorithm = f"rtn ({unit.reason})"
            log.info("gpfq: %s", algorithm)
            chosen_factor = RTN_GRID
        else:
            # parts_stats: one list of per-block statistics per part (fit, held-out); judged on
            # the held-out part, fit on the first, the final codes and report on all rows.
            fit_stats, val_stats = parts_stats[0], parts_stats[-1]
            all_stats = fit_stats if len(parts_stats) == 1 else [a.merged(b) for a, b in zip(fit_stats, val_stats)]
            mask = None if plan.mask is None else as_matrix(plan.mask)
            best = None

            def blockwise_codes(scale, zp, stats_of_blocks, w2d=w2d, plan=plan, mask=mask, blocks=blocks):
                """GPFQ codes of every block of rows (a conv group, q/k/v) on its own statistics."""
                return torch.cat(
                    [
                        gpfq_codes(
                            w2d[sl],
                            st,
                            plan.bits,
                            _rows_of(scale, sl),
                            _rows_of(zp, sl),
                            mask=None if mask is None else mask[sl],
                            sparsity=sparsity,
                            sparsity_lambda=sparsity_lambda,
                            block_size=block_size,
                        )
                        for sl, st in zip(blocks, stats_of_blocks)
                    ]
                )

            # Several C: keep the alphabet whose GPFQ output error ‖Xw − X̃q‖ on the
            # calibration data is lowest (the statistics are shared, so each try is cheap).
            candidates = [(f, "gpfq") for f in factors]
            if RTN_GRID in factors:
                candidates.append((RTN_GRID, "round"))
            for factor, how in candidates:
                scale, zp = grid(factor)
                if how == "round":
                    codes = round_to_grid(w2d, scale, zp, plan.bits)
                    if mask is not None:
                        codes = torch.where(mask.bool(), codes, zero_codes(zp, rows, cols))
                else:
                    codes = blockwise_codes(scale, zp, fit_stats)
                if len(candidates) > 1:
                    deq = codes.float() - (0 if zp is None else expand_to_columns(zp, rows, cols).float())
                    out_err, _ = _abs_error(w2d, deq * expand_to_columns(scale, rows, cols), blocks, val_stats)
                    if best is None or out_err < best[0]:
                        best = (out_err, factor, how, scale, zp, codes)
            if best is not None:
                _, chosen_factor, how, scale, zp, codes = best
                if how == "round":
                    algorithm = "gpfq (plain rounding on RTN's grid had the lowest calibration error)"
                elif all_stats is not fit_stats:  # refit on every sample with the chosen alphabet
                    codes = blockwise_codes(scale, zp, all_stats)
            else:
                chosen_factor = factors[0]
            stats = all_stats
        qt = UniformTensor(
            codes=codes.reshape(param.shape).contiguous(), bits=plan.bits, scale=scale, zero_point=zp, method="gpfq"
        )
        q2d = as_matrix(qt.dequantize())
        info: dict = {
            "bits": plan.bits,
            "granularity": qt.granularity,
            "algorithm": algorithm,
            "scale_factor": chosen_factor,
            "weight_rel_error": ((q2d - w2d).norm() / w2d.norm().clamp_min(1e-30)).item(),
        }
        if len(blocks) > 1:
            info["blocks"] = len(blocks)
        if stats is not None:
            out_err, ref = _abs_error(w2d, q2d, blocks, stats)
            info["output_rel_error"] = out_err / max(ref, 1e-300)
            rtn_scale, rtn_zp = grid(RTN_GRID)
            rtn = round_to_grid(w2d, rtn_scale, rtn_zp, plan.bits).float() - (
                0 if rtn_zp is None else expand_to_columns(rtn_zp, rows, cols).float()
            )
            rerr, _ = _abs_error(w2d, rtn * expand_to_columns(rtn_scale, rows, cols), blocks, stats)
            info["rtn_output_rel_error"] = rerr / max(ref, 1e-300)
            bias = _bias_of(layer, unit.attr)
            if bias_correction and bias is not None:
                # E[x]·w − E[x̃]·q per output: the mean shift the quantization introduced.
                for sl, st in zip(blocks, stats):
                    mean_x = (st.sum_x / st.count).float()
                    mean_xt = (st.sum_xt / st.count).float()
                    bias[sl].add_(w2d[sl] @ mean_x - q2d[sl] @ mean_xt)
        param.copy_(q2d.reshape(param.shape).to(param.dtype))
        quant[unit.param] = qt
        report[unit.key] = info
        shares = unit.kind == "module" and len(blocks) == 1 and stats is not None
        last = (group_of.get(unit.owner), parts_stats) if shares else (None, None)
        log.debug("gpfq %s: %s", unit.key, info)


def _bias_of(layer: nn.Module, attr: str) -> torch.Tensor | None:
    if attr == "weight":
        bias = getattr(layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None
    if attr == "in_proj_weight":
        # A MultiheadAttention's in_proj_bias: a Parameter, or None when built with bias=False.
        in_bias = layer.in_proj_bias
        return in_bias if isinstance(in_bias, torch.Tensor) else None
    return None


def quantize_method(state, config, ctx, chosen: dict, masks: dict) -> tuple[dict[str, QuantizedTensor], dict]:
    """The ``gpfq`` method of the quantize stage (see ``compress.quantize.stage``).

    ``chosen`` maps canonical parameter names to ``(WeightTarget, bits)``.
    """
    calib = ctx.data.calibration().x
    if config.calibration_samples is not None and config.calibration_samples < len(calib):
        g = torch.Generator().manual_seed(ctx.seed)
        calib = calib[torch.randperm(len(calib), generator=g)[: config.calibration_samples]]
    plans = {}
    keys = {}
    for pname, (target, bits) in chosen.items():
        # The plan names the parameter where the model holds it (a tied weight: its owner here).
        key = target.layer if target.attr == "weight" else f"{target.layer}.{target.attr}"
        keys[key] = pname
        plans[key] = LayerPlan(bits, config.granularity, config.group_size, config.symmetric, masks[pname])
    factors = (*AUTO_SCALE_FACTORS, RTN_GRID) if config.scale_factor == "auto" else config.scale_factor
    quant, report = gpfq_quantize_model(
        state.module,
        calib,
        plans,
        scale_factor=factors,
        range_quantile=config.range_quantile,
        sparsity=config.sparsity,
        sparsity_lambda=config.sparsity_lambda,
        bias_correction=config.bias_correction,
        batch_size=config.batch_size,
        max_patches=config.max_patches,
        block_size=config.block_size,
        seed=ctx.seed,
        auto_holdout=config.auto_holdout,
        activation_spec=state.extras.get("activation_quantization"),
    )
    owner_param = {f"{t.layer}.{t.attr}" if t.layer else t.attr: p for p, (t, _) in chosen.items()}
    quant = {owner_param.get(k, k): qt for k, qt in quant.items()}
    report = {chosen[keys[k]][0].key: v for k, v in report.items()}
    return quant, report
