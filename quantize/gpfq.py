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
import functools
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any, cast, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.distributed import split_range
from compress.grid import (
    as_matrix,
    conv_kernel_order,
    expand_to_columns,
    limit_u8s8_pairs,
    round_to_grid,
    u8s8_pair_bounds,
    uniform_scale,
    zero_codes,
)
from compress.metrics import release_free_memory, resident_memory
from compress.qtensor import QuantizedTensor, UniformTensor, signed_range
from compress.quantize.activations import EXTRAS_KEY, kernel_pair_limit
from compress.report import format_bytes

log = logging.getLogger(__name__)


QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Layers whose weights are quantized on their own grid (row = first weight dimension: a
# transposed convolution's input channel) but whose inputs GPFQ does not unfold: rounded to
# nearest under GPFQ, with no integer activation kernels.
ROUNDED_ONLY = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Columns per inner block of the greedy loop (see gpfq_codes).
_INNER_BLOCK = 16


@dataclass
class LayerStats:
    """Second moments of one layer's inputs, accumulated over calibration batches.

    With ``D = X̃ − X`` (quantized-network minus float inputs), three N × N float32 sums:
    ``G = X̃ᵀX``, ``E = X̃ᵀD`` and ``K = DᵀD``, plus the float64 column sums of ``X`` and
    ``X̃`` (for bias correction), over ``count`` rows (samples or patches). The method's
    ``H = X̃ᵀX̃ = G + E`` and ``F = XᵀX = Gᵀ − E + K`` follow (``H``, ``F``: float64).

    Why this form: what GPFQ's updates and its error terms need are the *small* differences
    ``H − G = E`` and ``F − G − Gᵀ + H = K``. Summed from ``D`` directly they keep float32's
    relative precision, where differencing two large Gram matrices would leave rounding; so
    float32 storage suffices (half the memory of the float64 ``G, H, F`` it replaces: for a
    3072-input layer 113 MB instead of 226 MB per set, and a held-out split keeps several
    sets at once), and the products are float32 GEMMs.
    """

    n: int
    device: InitVar[torch.device | str | None] = None
    G: torch.Tensor = field(init=False)
    E: torch.Tensor = field(init=False)
    K: torch.Tensor = field(init=False)
    sum_x: torch.Tensor = field(init=False)
    sum_xt: torch.Tensor = field(init=False)
    count: int = 0

    MATRICES = ("G", "E", "K")
    SUMS = ("sum_x", "sum_xt")

    def __post_init__(self, device) -> None:
        # On the activations' device: a CUDA model's Gram matrices never cross to the host.
        self.G, self.E, self.K = (torch.zeros(self.n, self.n, device=device) for _ in range(3))
        self.sum_x, self.sum_xt = (torch.zeros(self.n, dtype=torch.float64, device=device) for _ in range(2))

    @property
    def H(self) -> torch.Tensor:
        """``X̃ᵀX̃`` (float64)."""
        return self.G.double() + self.E.double()

    @property
    def F(self) -> torch.Tensor:
        """``XᵀX`` (float64)."""
        return self.G.T.double() - self.E.double() + self.K.double()

    def add(self, x: torch.Tensor, x_tilde: torch.Tensor) -> None:
        """Add rows ``x`` (float inputs) and ``x_tilde`` (quantized-network inputs), both (rows, N).

        When ``X̃ = X`` (the first layer, a float path) ``E`` and ``K`` get nothing and one
        product does.
        """
        x32 = x.detach().to(torch.float32)
        xt32 = x_tilde.detach().to(torch.float32)
        self.G.addmm_(xt32.T, x32)
        if not (x_tilde is x or torch.equal(x32, xt32)):
            d = xt32 - x32
            self.E.addmm_(xt32.T, d)
            self.K.addmm_(d.T, d)
        self.sum_x += x32.sum(0, dtype=torch.float64)
        self.sum_xt += xt32.sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    def add_stats(self, other: LayerStats) -> None:
        """Add ``other``'s sums into these (in place)."""
        for key in (*self.MATRICES, *self.SUMS):
            getattr(self, key).add_(getattr(other, key))
        self.count += other.count

    def merged(self, other: LayerStats) -> LayerStats:
        """The statistics of both sets of rows (sums are additive)."""
        out = LayerStats(self.n, self.G.device)
        for key in (*self.MATRICES, *self.SUMS):
            setattr(out, key, getattr(self, key) + getattr(other, key))
        out.count = self.count + other.count
        return out

    @classmethod
    def from_data(cls, x: torch.Tensor, x_tilde: torch.Tensor) -> LayerStats:
        stats = cls(x.shape[1], x.device)
        stats.add(x, x_tilde)
        return stats


def output_error(w2d: torch.Tensor, q2d: torch.Tensor, stats: LayerStats) -> float:
    """Relative squared output error ``‖XWᵀ − X̃Qᵀ‖² / ‖XWᵀ‖²`` from the Gram matrices."""
    w, q = w2d.double(), q2d.double()
    ref = (w @ stats.F * w).sum()
    err = ref - 2 * (q @ stats.G.double() * w).sum() + (q @ stats.H * q).sum()
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
    pair_limit: int | None = None,
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
        pair_limit: bound each pair of input columns (2i, 2i+1) so that its positive codes,
            and its negative ones, add up to at most this in magnitude
            (``compress.grid.U8S8_PAIR_LIMIT``: onnxruntime's uint8 × int8 kernel cannot
            saturate). Column 2i+1 is bounded given column 2i's code; the error this leaves
            is carried to the later columns like any rounding error. None: no bound.

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
    dev = w2d.device
    # G = X̃ᵀX as the statistics hold it (G[i, t] = <X̃_i, X_t>) and H = X̃ᵀX̃ = G + E: each
    # step is a ratio of their entries, so they need no normalising copy, and no N × N matrix
    # is made here (a 5632-input layer's is 127 MB): G is read in place, and H's rows a..b
    # (the loop reads H by rows only) are formed once per block of columns a..b.
    G = stats.G.to(dev, dtype)
    E = stats.E.to(dev, dtype)
    diag_g = torch.diagonal(G).clone()
    diag_h = diag_g + torch.diagonal(E)
    dead = diag_h <= 1e-12 * diag_h.max().clamp_min(1e-30)
    inv_h = torch.where(dead, torch.zeros_like(diag_h), 1.0 / diag_h.clamp_min(1e-30))

    # Column-major working copies (one row per input column t) of the current block only
    # (a 32000-row vocabulary head's full copies would be 262 MB each): every access in the
    # loop below (column t, the columns of a block) is then a contiguous slice.
    w = w2d.detach().to(dtype)
    # Scales and zero points per column group, not per column: (groups, rows) each.
    groups = scale.shape[1]
    per_group = n // groups
    Sg = scale.to(dev, dtype).expand(rows, groups).T.contiguous()
    Zg = None if zero_point is None else zero_point.to(dev, dtype).expand(rows, groups).T.contiguous()
    keep = None if mask is None else mask.reshape(rows, n).to(dev).bool().T.contiguous()
    Vt = torch.zeros(n, rows, dtype=dtype, device=dev)  # Vt[i] = <X̃_i, u> for every neuron
    codes = torch.zeros(n, rows, dtype=torch.int8, device=dev)

    # Python numbers for the per-column scalars: no 0-d tensor kernels inside the loop.
    dead_t = dead.tolist()
    g_t, ih_t = diag_g.tolist(), inv_h.tolist()
    # Two levels of blocks: rank-1 updates only inside a small inner block (they are memory
    # bound), matrix products to the rest of the block and, once per block, to the columns after it.
    inner = min(_INNER_BLOCK, block_size)
    # Codes within ±limit/2 can never break the bound (7 bits and fewer).
    limit = pair_limit if pair_limit is not None else 0
    # Symmetric grids only: an asymmetric grid's codes are offset by its zero point, and the
    # export stores codes that break the bound for the exact uint8 kernel.
    bound_pairs = pair_limit is not None and zero_point is None and max(-qmin, qmax) > limit // 2
    # The per-column steps are small vector ops: on one thread each takes microseconds, while
    # a thread pool's fork and join costs more than the op (over a millisecond when the cores
    # are busy). Only the matrix products below run on every thread.
    threads = torch.get_num_threads()
    for a in range(0, n, block_size):
        b = min(a + block_size, n)
        Wt = w[:, a:b].T.contiguous()  # Wt[t − a] = w_t
        Qt = torch.zeros(b - a, rows, dtype=dtype, device=dev)  # dequantized values q_t
        Hab = G[a:b] + E[a:b]  # H[t] for t in a..b
        for c0 in range(a, b, inner):
            d = min(c0 + inner, b)
            torch.set_num_threads(1)
            try:
                for t in range(c0, d):
                    w_t = Wt[t - a]
                    if dead_t[t]:
                        arg = w_t  # X̃_t is zero on the calibration data: any q_t fits it; keep w_t's nearest
                    else:
                        arg = torch.add(Vt[t], w_t, alpha=g_t[t]).mul_(ih_t[t])
                    s_t = Sg[t // per_group]
                    z = arg / s_t
                    if sparsity == "l1":
                        z = torch.sign(z) * (z.abs() - sparsity_lambda).clamp_min(0)
                    elif sparsity == "l0":
                        z = torch.where(z.abs() > 0.5 + sparsity_lambda, z, torch.zeros_like(z))
                    c = torch.round(z)
                    if Zg is not None:
                        z_t = Zg[t // per_group]
                        c = c.add_(z_t).clamp_(qmin, qmax)
                        if bound_pairs and t % 2:
                            c = torch.clamp(c, *u8s8_pair_bounds(codes[t - 1], limit))
                        if keep is not None:
                            c = torch.where(keep[t], c, z_t)
                        q_t = (c - z_t).mul_(s_t)
                    else:
                        c = c.clamp_(qmin, qmax)
                        if bound_pairs and t % 2:
                            c = torch.clamp(c, *u8s8_pair_bounds(codes[t - 1], limit))
                        if keep is not None:
                            c = torch.where(keep[t], c, 0.0)
                        q_t = c * s_t
                    codes[t] = c
                    Qt[t - a] = q_t
                    if t + 1 < d:
                        # V[:, i] += w_t G[i, t] − q_t H[i, t] for the rest of the inner block
                        Vt[t + 1 : d].addr_(G[t + 1 : d, t], w_t).addr_(Hab[t - a, t + 1 : d], q_t, alpha=-1.0)
            finally:
                torch.set_num_threads(threads)
            if d < b:
                Vt[d:b].addmm_(G[d:b, c0:d], Wt[c0 - a : d - a]).addmm_(
                    Hab[c0 - a : d - a, d:b].T, Qt[c0 - a : d - a], alpha=-1.0
                )
        if b < n:
            Vt[b:].addmm_(G[b:, a:b], Wt).addmm_(Hab[:, b:].T, Qt, alpha=-1.0)
    return codes.T.contiguous()


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


@dataclass
class _Batch:
    """One calibration batch: the model's input (on the model's device) and its token mask."""

    x: torch.Tensor
    mask: torch.Tensor | None  # ``compress.padding.token_mask``: None when every position counts


class _Net:
    """A network the unit loop runs to capture a layer's inputs, one calibration batch at a time.

    ``root`` holds the layers and is named ``prefix`` in the full model, so a unit's owner (a
    name in the full model) resolves inside it: the whole model (prefix ``""``) or one block.
    """

    def __init__(self, root: nn.Module, prefix: str = ""):
        self.root, self.prefix = root, prefix

    def layer(self, owner: str) -> nn.Module:
        if not self.prefix:
            return self.root.get_submodule(owner)
        if owner == self.prefix:
            return self.root
        if not owner.startswith(self.prefix + "."):
            raise ValueError(f"{owner} is not inside {self.prefix}")
        return self.root.get_submodule(owner[len(self.prefix) + 1 :])

    def run(self, j: int) -> object:
        raise NotImplementedError


class _ModelNet(_Net):
    """The whole model fed calibration batch ``j`` (its chain of blocks replayed from a cache
    when ``replay`` is given: see ``_Replay``)."""

    def __init__(self, model: nn.Module, batches: list[_Batch], replay: _ReplayState | None = None):
        super().__init__(model)
        self.batches, self.replay = batches, replay

    def run(self, j: int) -> object:
        if self.replay is not None:
            self.replay.current = j
        return self.root(self.batches[j].x)


class _BlockNet(_Net):
    """One block of the model's chain fed its cached inputs ``(args, kwargs)`` for batch ``j``."""

    def __init__(self, block: nn.Module, prefix: str, inputs: dict[int, tuple[tuple, dict]]):
        super().__init__(block, prefix)
        self.inputs = inputs

    def run(self, j: int) -> object:
        args, kwargs = self.inputs[j]
        return self.root(*args, **kwargs)


def _run_until(net: _Net, j: int) -> None:
    try:
        with _no_mha_fastpath():
            net.run(j)
    except _StopForward:
        pass


class _no_mha_fastpath:
    """PyTorch's fused Transformer fast path bypasses submodule calls (and hooks): off while capturing."""

    def __enter__(self):
        self.before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.before)


def _capture_input(net: _Net, layer: nn.Module, j: int) -> torch.Tensor:
    return _capture_args(net, layer, j)[0]


def _capture_args(net: _Net, layer: nn.Module, j: int) -> list:
    captured: list = []

    def hook(_module, args, kwargs):
        captured.extend(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        for k in ("query", "key", "value"):
            if k in kwargs:
                captured.append(kwargs[k].detach())
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run_until(net, j)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the layer was not called in the model's forward pass")
    return captured


@torch.no_grad()
def _capture_mha_output(net: _Net, mha: nn.MultiheadAttention, j: int) -> torch.Tensor:
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
        mha.out_proj.weight.copy_(torch.eye(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device))
        if b is not None:
            mha.out_proj.bias.zero_()
        _run_until(net, j)
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
    if isinstance(layer, ROUNDED_ONLY):
        why = f"{type(layer).__name__}: its inputs are not unfolded into patches, rounded to nearest"
    else:
        why = (
            f"{type(layer).__name__} with padding {getattr(layer, 'padding', None)!r}/"
            f"{getattr(layer, 'padding_mode', '')} cannot be unfolded into patches, rounded to nearest"
        )
    return _Unit(key, param, owner, attr, "rtn", why)


def _capture_rows(net: _Net, unit: _Unit, j: int, blocks: int, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The unit's inputs on batch ``j`` as rows, one matrix per weight block (a Linear's
    padding positions dropped when ``mask`` marks them)."""
    layer = net.layer(unit.owner)
    if unit.kind == "module":
        from compress.padding import valid_rows

        inp = _capture_input(net, layer, j)
        if mask is not None and isinstance(layer, nn.Linear):
            return [valid_rows(inp, mask)]
        if blocks > 1:  # grouped conv: each group sees its own input channels
            c = inp.shape[1] // blocks
            return [layer_rows(layer, inp[:, g * c : (g + 1) * c]) for g in range(blocks)]
        return [layer_rows(layer, inp)]
    if unit.kind == "mha_in":
        q, k, v = _capture_args(net, layer, j)[:3]
        by_attr = {"q_proj_weight": [q], "k_proj_weight": [k], "v_proj_weight": [v], "in_proj_weight": [q, k, v]}
        return [t.reshape(-1, t.shape[-1]) for t in by_attr[unit.attr]]
    if unit.kind == "mha_out":
        # _resolve_unit makes an "mha_out" unit only for the out_proj of a MultiheadAttention.
        parent = cast(nn.MultiheadAttention, net.layer(unit.owner.rpartition(".")[0]))
        out = _capture_mha_output(net, parent, j)
        return [out.reshape(-1, out.shape[-1])]
    if unit.kind == "rnn_in":
        inp = _capture_input(net, layer, j)
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
    # compress.grid.U8S8_PAIR_LIMIT when the layer runs on onnxruntime's uint8 × int8 kernel
    # (integer activations): GPFQ keeps each input pair's codes from saturating it.
    pair_limit: int | None = None
    # The same bound for a convolution, whose kernel pairs channels of one kernel position
    # (compress.grid.conv_kernel_order), not neighbouring columns: the grid leaves room for
    # it; what GPFQ's error compensation still puts over it is moved back afterwards
    # (compress.quantize.stage.bound_static_conv_pairs).
    conv_pair_limit: int | None = None


@torch.no_grad()
def collect_stats(
    float_net: _Net,
    quant_net: _Net,
    unit: _Unit,
    batches: list[_Batch],
    shards: list[list[int]],
    max_patches: int,
    seed: int,
    sizes: list[int],
    device: torch.device,
) -> list[LayerStats]:
    """Accumulate a unit's ``LayerStats`` (one per weight block) batch by batch (memory: one
    batch's activations).

    ``shards`` lists the batches (indices into ``batches``) of one calibration part in
    contiguous shards. Each shard is summed on its own and the shards are added in order,
    so the sums are the same floats whether one process does every shard or each rank of a
    process group does its own (``_owned_shards``): codes are identical under ``--nproc``.
    Convolution patches (and tokens) are subsampled (the same positions for both networks)
    so that at most about ``max_patches`` rows enter the statistics; the positions of batch
    ``j`` come from ``(seed, j)`` alone, not from the batches before it. A Linear layer of a
    model that defines ``token_mask(x)`` (``compress.padding``) sees only the data
    positions, not the padding.
    """
    from compress.distributed import rank_and_world

    n_blocks = len(sizes)
    total = sum(batches[j].x.shape[0] for shard in shards for j in shard)
    mine = _owned_shards(len(shards))
    per_shard: list[Any] = []  # per shard: its statistics, a _SpilledShard, or None (not this rank's)
    for s, shard in enumerate(shards):
        if s not in mine:
            per_shard.append(None)
            continue
        stats: list[LayerStats] | None = None
        for j in shard:
            batch = batches[j]
            mask = batch.mask if unit.kind == "module" else None
            xs = _capture_rows(float_net, unit, j, n_blocks, mask)
            xts = _capture_rows(quant_net, unit, j, n_blocks, mask)
            if stats is None:
                stats = [LayerStats(x.shape[1], x.device) for x in xs]
            generator = None
            for st, x, xt in zip(stats, xs, xts):
                if x.shape[0] > batch.x.shape[0]:  # several rows per sample: patches (or tokens)
                    budget = max(1, math.ceil(max_patches * batch.x.shape[0] / max(total, 1)))
                    if budget < x.shape[0]:
                        if generator is None:
                            generator = torch.Generator().manual_seed(_mix(seed, j))
                        idx = torch.randperm(x.shape[0], generator=generator)[:budget].to(x.device)
                        x, xt = x[idx], xt[idx]
                st.add(x, xt)
        more = any(t in mine for t in range(s + 1, len(shards)))
        # A shard summed before another of this process's waits in a temporary file: one set
        # of N × N sums in memory at a time, not one per shard (2 × 381 MB at 5632 inputs).
        per_shard.append(_SpilledShard(stats) if more and stats is not None and _spills(stats) else stats)
    _, world = rank_and_world()
    if world > 1:
        # Every rank gets every shard's sums (float64, counts too), then adds them in order.
        per_shard = _gather_shards(per_shard, sizes, device)
    done = [st for st in per_shard if st is not None]
    if not done:
        raise ValueError("GPFQ needs calibration data, got no batches")
    if any(isinstance(st, _SpilledShard) for st in done):
        return _sum_in_order(done)
    out = done[0]
    for other in done[1:]:
        for a, b in zip(out, other):
            a.add_stats(b)
    return out


SPILL_BYTES = 32 << 20  # a shard's N × N sums above this wait on disk for the next shard
SPILL_CHUNK_BYTES = 16 << 20  # read back this much of a spilled matrix at a time


def _spills(stats: list[LayerStats]) -> bool:
    first = stats[0].G
    big = sum(3 * 4 * st.n * st.n for st in stats) >= SPILL_BYTES
    return big and first.device.type == "cpu" and first.dtype == torch.float32


class _SpilledShard:
    """One shard's statistics with their N × N matrices in a temporary file (the vectors and
    the count stay in memory); read back a chunk of rows at a time by ``_sum_in_order``."""

    def __init__(self, stats: list[LayerStats]):
        # closed by _sum_in_order; unlinked at creation, so the disk space returns with the descriptor
        self.file = tempfile.TemporaryFile(prefix="compress-gpfq-")  # noqa: SIM115
        self.stats, self.offsets = stats, []
        at = 0
        for st in stats:
            for key in LayerStats.MATRICES:
                self.offsets.append(at)
                m = getattr(st, key).contiguous()
                m.numpy().tofile(self.file)
                at += m.numel() * m.element_size()
                setattr(st, key, m.new_empty(0))  # the matrix's memory goes back now
        self.file.flush()

    def rows(self, block: int, key: int, rows: slice) -> torch.Tensor:
        n = self.stats[block].n
        self.file.seek(self.offsets[block * len(LayerStats.MATRICES) + key] + rows.start * n * 4)
        count = (rows.stop - rows.start) * n
        out = torch.from_numpy(np.fromfile(self.file, dtype=np.float32, count=count))
        if out.numel() != count:
            raise OSError("GPFQ's temporary statistics file was cut short")
        return out.reshape(-1, n)


def _sum_in_order(shards: list) -> list[LayerStats]:
    """``((s0 + s1) + …) + last``, elementwise as ``LayerStats.add_stats`` adds them, into the
    last shard's statistics (in memory); the others may be ``_SpilledShard``s, read a chunk
    of rows at a time."""
    *first, last = shards

    def part(sh, b: int, k: int, key: str, rows: slice) -> torch.Tensor:
        return sh.rows(b, k, rows) if isinstance(sh, _SpilledShard) else getattr(sh[b], key)[rows]

    def vector(sh, b: int, key: str) -> torch.Tensor:
        return getattr((sh.stats if isinstance(sh, _SpilledShard) else sh)[b], key)

    for b, st in enumerate(last):
        for k, key in enumerate(LayerStats.MATRICES):
            target = getattr(st, key)
            for rows in row_chunks(0, st.n, st.n, SPILL_CHUNK_BYTES):
                acc = part(first[0], b, k, key, rows).clone()
                for sh in first[1:]:
                    acc.add_(part(sh, b, k, key, rows))
                target[rows] = acc.add_(target[rows])
        for key in LayerStats.SUMS:
            acc = vector(first[0], b, key).clone()
            for sh in first[1:]:
                acc.add_(vector(sh, b, key))
            setattr(st, key, acc.add_(getattr(st, key)))
        st.count += sum((sh.stats if isinstance(sh, _SpilledShard) else sh)[b].count for sh in first)
    for sh in first:
        if isinstance(sh, _SpilledShard):
            sh.file.close()
    return last


def _gather_shards(
    per_shard: list[list[LayerStats] | None], sizes: list[int], device: torch.device
) -> list[list[LayerStats] | None]:
    """The sum of every rank's shard statistics (``sizes``: inputs per weight block), on every
    rank, by two all-reduces (float32 matrices; float64 sums and counts). With two ranks this is ``A + B``, the very
    sum one process forms from its two shards (float addition commutes)."""
    from compress.distributed import all_reduce_sum_, rank_and_world

    rank, _world = rank_and_world()
    mine = per_shard[rank] if rank < len(per_shard) else None
    if mine is None:  # an empty shard: zero sums keep the collective's shapes
        mine = [LayerStats(n, device) for n in sizes]
    # The float32 matrices and the float64 sums in one all-reduce each (float32 sums of two
    # ranks are the A + B one process forms).
    mats = torch.cat([getattr(st, key).reshape(-1) for st in mine for key in LayerStats.MATRICES])
    sums = torch.cat([t for st in mine for t in (st.sum_x, st.sum_xt, st.sum_x.new_tensor([st.count]))])
    all_reduce_sum_(mats)
    all_reduce_sum_(sums)
    at = bt = 0
    for n, st in zip(sizes, mine):  # the sums go back into this rank's own statistics
        for key in LayerStats.MATRICES:
            getattr(st, key).copy_(mats[at : at + n * n].reshape(n, n))
            at += n * n
        for key in LayerStats.SUMS:
            getattr(st, key).copy_(sums[bt : bt + n])
            bt += n
        st.count = int(sums[bt].item())
        bt += 1
    return [mine]


def _owned_shards(n_shards: int) -> set[int]:
    """The shards of a calibration part this process sums: all of them in one process, shard
    ``s`` on rank ``s`` in a process group (one shard per rank)."""
    from compress.distributed import rank_and_world

    rank, world = rank_and_world()
    return set(range(n_shards)) if world == 1 else {rank}


def _shards_per_part() -> int:
    """Shards per calibration part: 2 for 1 or 2 processes (so both add the same two partial
    sums), else one per rank."""
    from compress.distributed import rank_and_world

    return max(2, rank_and_world()[1])


def _mix(seed: int, *keys: int) -> int:
    """A 63-bit generator seed from ``seed`` and ``keys`` (stable across processes and runs)."""
    import hashlib

    digest = hashlib.blake2b("/".join(map(str, (seed, *keys))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# The step-size constants C that scale_factor="auto" tries per layer (1.16: the paper's
# default). "auto" also tries round-to-nearest's own grid (step max|w| / (2**(bits-1) - 1))
# and plain rounding on it, so GPFQ's calibration output error is never above RTN's.
AUTO_SCALE_FACTORS = (0.8, 0.9, 1.0, 1.16, 1.3)
RTN_GRID = "rtn"


def _output_errors(
    w2d: torch.Tensor,
    candidates: Sequence[torch.Tensor | Callable[[slice], torch.Tensor]],
    blocks: list[slice],
    stats: list[LayerStats],
    *,
    reference: bool = True,
) -> tuple[list[float], float]:
    """Squared output errors ``‖Xw − X̃q‖²`` of each candidate ``q`` and the squared output
    norm ``‖Xw‖²``, summed over the weight's blocks.

    A candidate is the dequantized weight (like ``w2d``) or a function of a row slice
    making those rows of it: each row is made only where it is measured (one candidate held
    at a time: stacking seven candidates of a 768 × 3072 weight and their products took
    ~400 MB, the peak of BERT-base's GPFQ).

    Written around ``δ = q − w`` so that no large terms cancel (an int8 error is ~1e-5 of
    the output): ``wᵀMw + 2δᵀ(H − G)w + δᵀHδ`` with ``M = (X − X̃)ᵀ(X − X̃) = F − G − Gᵀ + H``.
    The terms in ``w`` alone are shared by all candidates.

    The sums run over the rows, which are independent: each block's rows are cut into
    ``_shards_per_part()`` pieces, each piece summed on its own (``_row_sum``: the same floats
    on any number of threads) and the pieces added in order. In a process group rank ``p``
    measures piece ``p`` only and one all-reduce of the pieces' sums shares them, so every
    rank gets the very numbers one process computes, and chooses the same candidate, in half
    the time per rank with two.

    Args:
        reference: also measure ``‖Xw‖²`` (two products per row more); else it is returned as 0.
    """
    from compress.distributed import all_reduce_sum_, rank_and_world

    rank, world = rank_and_world()
    n_pieces = _shards_per_part()
    mine = range(n_pieces) if world == 1 else [rank] if rank < n_pieces else []
    k = len(candidates)
    width = 2 + k  # per block and piece: wᵀFw, wᵀMw, then 2δᵀ(H − G)w + δᵀHδ per candidate
    terms = [[[0.0] * width for _ in range(n_pieces)] for _ in blocks]
    for bi, (sl, st) in enumerate(zip(blocks, stats)):
        pieces = split_range(sl.stop - sl.start, n_pieces)
        if not any(len(pieces[p]) for p in mine):
            continue
        # H = G + E once per block (float32: δᵀHδ is no small difference): one product per
        # candidate row instead of two. M = K and H − G = E are stored as such, so the terms
        # in them carry no cancellation and run in float32.
        h = st.G + st.E
        for p in mine:
            if not len(pieces[p]):
                continue
            rows = slice(sl.start + pieces[p].start, sl.start + pieces[p].stop)
            w = w2d[rows].float()
            out = terms[bi][p]
            out[1] = _row_sum(w, st.K, w)
            if reference:  # wᵀFw = wᵀGw − wᵀEw + wᵀKw
                out[0] = _row_sum(w, st.G, w) - _row_sum(w, st.E, w) + out[1]
            cross = w @ st.E.T  # row r: (H − G) w_r
            for i, cand in enumerate(candidates):
                q = cand(rows) if callable(cand) else cand[rows]
                d = q.float() - w
                out[2 + i] = 2 * _exact_sum((d * cross).sum(1, dtype=torch.float64)) + _row_sum(d, h, d)
        del h
    if world > 1:
        # Each piece's entries are non-zero on its own rank only: x + 0 is exact.
        flat = torch.tensor(terms, dtype=torch.float64, device=w2d.device)
        terms = all_reduce_sum_(flat).tolist()
    errors = [0.0] * k
    ref = 0.0
    for per_piece in terms:
        total = [0.0] * width
        for piece in per_piece:  # in piece order, whichever rank measured them
            total = [a + b for a, b in zip(total, piece)]
        ref += total[0]
        for i in range(k):
            errors[i] += max(total[1] + total[2 + i], 0.0)
    return errors, ref


def _row_sum(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor) -> float:
    """``Σ_r a_r M b_rᵀ`` over the rows of ``a`` and ``b`` (float32 products, float64 sums)."""
    return _exact_sum((a @ m).mul_(b).sum(1, dtype=torch.float64))


def _exact_sum(per_row: torch.Tensor) -> float:
    """The correctly rounded sum of a vector (``math.fsum``): torch's sum of a long vector
    splits it across threads, so its last bits would depend on the thread count."""
    return math.fsum(per_row.tolist())


def _dequantized_rows(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, rows: slice
) -> torch.Tensor:
    """The rows ``rows`` of ``_dequantized(codes, scale, zero_point)``."""
    return _dequantized(codes[rows], _rows_of(scale, rows), _rows_of(zero_point, rows))


def _dequantized(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """``(codes − zero point) · scale`` as float32 ``(rows, cols)``."""
    rows, cols = codes.shape
    deq = codes.float() - (0 if zero_point is None else expand_to_columns(zero_point, rows, cols).float())
    return deq * expand_to_columns(scale, rows, cols)


@overload
def _rows_of(side: torch.Tensor, sl: slice | torch.Tensor) -> torch.Tensor: ...
@overload
def _rows_of(side: None, sl: slice | torch.Tensor) -> None: ...
def _rows_of(side: torch.Tensor | None, sl: slice | torch.Tensor) -> torch.Tensor | None:
    """The rows ``sl`` of a per-row scale or zero point (a per-tensor one as it is)."""
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
    streaming: bool = True,
) -> tuple[dict[str, QuantizedTensor], dict[str, dict]]:
    """Quantize ``model``'s planned weights with GPFQ, in network order, in place.

    Each weight is replaced by its dequantized value as soon as it is quantized, so later
    weights see the quantized network's inputs ``X̃``; a float copy provides the float
    network's inputs ``X``.

    A model built as a chain of repeated blocks (a transformer's layers: ``find_block_chain``)
    is quantized block by block: both networks' inputs to the current block are cached over
    the calibration data, the block's weights are quantized by running that block alone (a
    float copy of it on the float cache, the block itself on the quantized cache), then both
    caches move through the block. Memory is the two caches, one block copy and one weight's
    statistics; time grows linearly with depth. Weights outside the chain (before it, or a
    head after it) and models without a chain take the whole-model path (a float copy of the
    model, each weight's inputs captured by running it from the input). Both paths give the
    same codes.

    Args:
        model: evaluated in eval mode; its planned weights are overwritten (and their
            biases, with ``bias_correction``). Its parameters keep their dtype (bf16/fp16
            models are quantized with fp32/fp64 math); statistics live on its device.
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
        streaming: use the block-by-block path when the model has a chain of blocks (False:
            always the whole-model path; same codes, for tests and comparisons).

    Returns:
        ``{"<param>": QuantizedTensor}`` and per-weight facts keyed like ``plans``
        (``bits``, ``granularity``, ``algorithm``, ``output_rel_error``,
        ``rtn_output_rel_error``, ``weight_rel_error``, ``scale_factor``; ``output_error_rows``
        when the output errors were measured on a subset of the rows, ``REPORT_ROWS`` per block).
    """
    from compress.padding import token_mask

    was_training = model.training
    model.eval()
    modules = dict(model.named_modules())
    units = {key: _resolve_unit(model, key, modules) for key in plans}
    example = calibration[:2].to(_device_of(model))
    chain = find_block_chain(model, example) if streaming else None
    owners = {u.owner for u in units.values()} | {
        u.owner.rpartition(".")[0] for u in units.values() if u.kind == "mha_out"
    }
    block_names = [] if chain is None else chain.block_names
    called = unit_order(model, example, owners | set(block_names))
    rank = {n: i for i, n in enumerate(called)}

    def position(u: _Unit) -> tuple:
        if u.kind == "mha_out":  # right after its attention's input projection
            return (rank.get(u.owner.rpartition(".")[0], -1), 1)
        return (rank.get(u.owner, -1), 0)

    missing = [u.key for u in units.values() if position(u)[0] < 0]
    if missing:
        raise ValueError(f"layers {sorted(missing)} are not called in the model's forward pass")
    order = sorted(units.values(), key=position)
    phases = None if chain is None else _chain_phases(chain, order, rank)
    if chain is not None and phases is None:
        log.info("gpfq: a planned weight outside %s is called between its blocks: whole-model path", chain.prefix)

    total = len(calibration)
    factors = scale_factor if isinstance(scale_factor, tuple) else (scale_factor,)
    n_hold = round(total * auto_holdout) if len(factors) > 1 else 0
    if n_hold and total - n_hold < 1:
        n_hold = 0
    if n_hold:
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 1))
        parts_x = [calibration[perm[n_hold:]], calibration[perm[:n_hold]]]
    else:
        parts_x = [calibration]
    device = _device_of(model)
    # Batches do not depend on the number of processes (each part is cut into at least one
    # batch per shard), so every process computes the same floats for the batches it owns.
    n_shards = _shards_per_part()
    batches: list[_Batch] = []
    parts: list[list[list[int]]] = []  # part -> shard -> batch indices
    for part in parts_x:
        n_batches = max(math.ceil(len(part) / batch_size), min(n_shards, len(part)))
        ids = []
        for rows in split_range(len(part), n_batches):
            xb = part[rows.start : rows.stop].to(device)
            ids.append(len(batches))
            batches.append(_Batch(xb, token_mask(model, xb)))
        parts.append([[ids[i] for i in r] for r in split_range(len(ids), n_shards)])
    owned = sorted(j for part in parts for s in _owned_shards(n_shards) for j in part[s])

    from compress.quantize.activations import quantized_inputs

    loop = _UnitLoop(
        modules,
        plans,
        parts,
        batches,
        seed,
        factors=factors,
        range_quantile=range_quantile,
        sparsity=sparsity,
        sparsity_lambda=sparsity_lambda,
        bias_correction=bias_correction,
        max_patches=max_patches,
        block_size=block_size,
    )
    if phases is None:
        float_model = copy.deepcopy(model).eval()
        # After the deep copy: the float network stays float, the quantized one sees 8-bit inputs.
        with quantized_inputs(model, activation_spec):
            loop.group_of = _group_of(model, example)
            float_net, quant_net = _ModelNet(float_model, batches), _ModelNet(model, batches)
            for unit in order:
                loop.run(unit, float_net, quant_net)
        del float_model
    else:
        assert chain is not None
        _stream_chain(model, chain, phases, loop, batches, owned, activation_spec, example)
    model.train(was_training)
    return loop.quant, loop.report


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _group_of(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Layer → index of its shared-input group (q/k/v fed one tensor), for groups of two or more."""
    return {n: i for i, g in enumerate(shared_input_groups(model, example)) for n in g if len(g) > 1}


# --- the chain of blocks -----------------------------------------------------------------
#
# A transformer is embeddings, a chain of identical blocks (each fed the previous block's
# hidden state plus the same side inputs: attention mask, position embeddings) and a head.
# Found generically on two samples with hooks, then checked: replaying the blocks one by
# one from the first block's captured inputs must reproduce the last block's output exactly.

# Keyword arguments holding decoding state (a KV cache): replaying a block must not grow it.
_STATE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


@dataclass
class BlockChain:
    """A container whose children run one after the other, each on its predecessor's output."""

    prefix: str  # the container's module name ("" for the model itself)
    names: list[str]  # its children, in call (= index) order
    tuple_tail: int | None  # None: blocks return the hidden state; k: a tuple of it and k Nones

    @property
    def block_names(self) -> list[str]:
        return [f"{self.prefix}.{n}" if self.prefix else n for n in self.names]

    def output(self, hidden: torch.Tensor) -> object:
        """A block's return value carrying ``hidden``."""
        return hidden if self.tuple_tail is None else (hidden, *([None] * self.tuple_tail))


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden_out(out: object) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _hidden_of(out: object) -> torch.Tensor:
    """A replayable block's hidden state (the chain check guarantees it returns one)."""
    h = _hidden_out(out)
    if h is None:
        raise TypeError("a block returned no tensor")
    return h


def _stateless(kwargs: dict) -> dict:
    """A block's keyword arguments without decoding state (no KV cache, ``use_cache`` off)."""
    out = {k: (None if k in _STATE_KWARGS else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def find_block_chain(model: nn.Module, example: torch.Tensor) -> BlockChain | None:
    """The model's chain of repeated blocks, or None.

    Candidates are ``nn.ModuleList``/``nn.Sequential`` containers of two or more children of
    one class, each a module with submodules (a block, not a bare layer). On ``example`` each
    child must be called exactly once, in index order, child ``i``'s output (or its first
    element) being child ``i+1``'s first input, and a replay of the children from the first
    one's captured arguments must reproduce the last one's output bit for bit. The largest
    such container (by parameters) wins.
    """
    containers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential))
        and len(m) >= 2
        and len({type(c) for c in m}) == 1
        and all(next(c.children(), None) is not None for c in m)
    }
    if not containers:
        return None
    calls: dict[str, list] = {n: [] for n in containers}
    handles = []
    for cname, cont in containers.items():
        for idx, child in enumerate(cont):

            def pre(_m, args, kwargs, rec=calls[cname], idx=idx):
                rec.append(("in", idx, args, kwargs))

            def post(_m, _args, _kwargs, out, rec=calls[cname], idx=idx):
                rec.append(("out", idx, out, None))

            handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(child.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), _no_mha_fastpath():
            model(example)
    finally:
        for h in handles:
            h.remove()
    found: list[tuple[int, str, BlockChain]] = []
    for cname, rec in calls.items():
        cont = containers[cname]
        n = len(cont)
        if [(r[0], r[1]) for r in rec] != [(k, i) for i in range(n) for k in ("in", "out")]:
            continue
        ins = [_hidden_in(rec[2 * i][2], rec[2 * i][3]) for i in range(n)]
        outs = [rec[2 * i + 1][2] for i in range(n)]
        if ins[0] is None or any(
            _hidden_out(outs[i]) is None or _hidden_out(outs[i]) is not ins[i + 1] for i in range(n - 1)
        ):
            continue
        last = outs[-1]
        if isinstance(last, torch.Tensor):
            tail = None
        elif isinstance(last, tuple) and isinstance(last[0], torch.Tensor) and all(x is None for x in last[1:]):
            tail = len(last) - 1
        else:
            continue
        chain = BlockChain(cname, [name for name, _ in cont.named_children()], tail)
        # The replay check: the blocks depend on nothing but their first input and the side inputs.
        args, kwargs = rec[0][2], _stateless(rec[0][3])
        try:
            with torch.no_grad(), _no_mha_fastpath():
                for child in cont:
                    hidden = _hidden_of(child(*args, **kwargs))
                    args, kwargs = _with_hidden(args, kwargs, hidden)
            expected = _hidden_of(last)
        except Exception as err:  # any failure: not a chain that can be replayed
            log.debug("gpfq: %s is not a replayable chain (%s)", cname, err)
            continue
        if hidden.shape != expected.shape or not torch.equal(hidden, expected):
            log.debug("gpfq: replaying %s does not reproduce its output", cname)
            continue
        found.append((sum(p.numel() for p in cont.parameters()), cname, chain))
    if not found:
        return None
    return max(found, key=lambda f: f[0])[2]


@dataclass
class _Phases:
    """The planned weights split by where they run: before the chain, in block i, after it."""

    before: list[_Unit]
    blocks: list[list[_Unit]]
    after: list[_Unit]


def _chain_phases(chain: BlockChain, order: list[_Unit], rank: dict[str, int]) -> _Phases | None:
    """``order`` split around the chain, or None when it does not split cleanly (a weight
    outside the blocks called between them)."""
    names = chain.block_names
    first, last = rank[names[0]], rank[names[-1]]
    phases = _Phases([], [[] for _ in names], [])
    sequence = []
    for u in order:
        owner = u.owner.rpartition(".")[0] if u.kind == "mha_out" else u.owner
        inside = next((i for i, b in enumerate(names) if owner == b or owner.startswith(b + ".")), None)
        if inside is not None:
            phases.blocks[inside].append(u)
            sequence.append(inside)
        elif rank[owner] < first:
            phases.before.append(u)
            sequence.append(-1)
        elif rank[owner] > last:
            phases.after.append(u)
            sequence.append(len(names))
        else:
            return None
    if sequence != sorted(sequence):
        return None
    return phases


class _ReplayState:
    """The chain's final hidden state per calibration batch, and the batch being run."""

    def __init__(self):
        self.hidden: dict[int, torch.Tensor] = {}
        self.current = 0


class _Replay(nn.Module):
    """Stands in for a block of the chain: returns the chain's cached output for the batch
    being run, so a head after the chain runs without running the blocks."""

    def __init__(self, state: _ReplayState, chain: BlockChain):
        super().__init__()
        self.state, self.chain = state, chain

    def forward(self, *args, **kwargs):
        return self.chain.output(self.state.hidden[self.state.current])


class _blocks_replaced:
    """While active, the chain's blocks in ``model`` are ``_Replay`` modules over ``state``."""

    def __init__(self, model: nn.Module, chain: BlockChain, state: _ReplayState):
        self.container = model.get_submodule(chain.prefix)
        self.chain, self.state = chain, state

    def __enter__(self):
        self.saved = dict(self.container._modules)
        for name in self.chain.names:
            self.container._modules[name] = _Replay(self.state, self.chain)

    def __exit__(self, *exc):
        for name, m in self.saved.items():
            self.container._modules[name] = m


def _stream_chain(
    model: nn.Module,
    chain: BlockChain,
    phases: _Phases,
    loop: _UnitLoop,
    batches: list[_Batch],
    owned: list[int],
    activation_spec: dict | None,
    example: torch.Tensor,
) -> None:
    """The block-by-block path of ``gpfq_quantize_model`` (see there). Only the batches in
    ``owned`` (this rank's shards) are cached and run."""
    from compress.quantize.activations import quantized_inputs

    float_replay, quant_replay = _ReplayState(), _ReplayState()
    # The float network outside the chain: the model without its blocks. Only the weights
    # quantized outside the chain are copied, with their owners' other parameters; every other
    # parameter and buffer is shared (BERT-base's 94 MB word-embedding table, when no GPFQ layer
    # outside the chain reads it). The last weight after the chain is not copied either: the
    # float network only ever computes inputs of weights not yet quantized, and nothing of
    # that last one's input depends on it (a 1 B decoder's tied 32000 × 2048 head: 131 MB).
    outside = [*phases.before, *phases.after[:-1]]
    changed = {id(t) for u in outside for t in model.get_submodule(u.owner).parameters(recurse=False)}
    memo: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in changed}
    with _blocks_replaced(model, chain, float_replay):
        skeleton = copy.deepcopy(model, memo).eval()
    for m in skeleton.get_submodule(chain.prefix).children():
        cast(_Replay, m).state = float_replay
    js = owned

    def capture_first(net: _Net, j: int) -> tuple[tuple, dict]:
        got: list = []

        def hook(_m, args, kwargs):
            got.append((args, _stateless(kwargs)))
            raise _StopForward

        handle = net.layer(chain.block_names[0]).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            _run_until(net, j)
        finally:
            handle.remove()
        return got[0]

    with quantized_inputs(model, activation_spec):
        loop.group_of = _group_of(model, example)
        float_model_net, quant_model_net = _ModelNet(skeleton, batches, float_replay), _ModelNet(model, batches)
        for unit in phases.before:
            loop.run(unit, float_model_net, quant_model_net)
        quant_in = {j: capture_first(quant_model_net, j) for j in js}
    # Up to the first block the networks differ only if a weight before it was quantized.
    float_in = {j: capture_first(float_model_net, j) for j in js} if phases.before else quant_in
    # Activation quantization inside a block makes the two networks differ even without weights.
    acts = activation_spec is not None and activation_spec.get("mode", "none") != "none"
    for i, (name, units) in enumerate(zip(chain.block_names, phases.blocks)):
        started = time.perf_counter()
        block = model.get_submodule(name)
        identical = float_in is quant_in and not units and not acts
        # Copied outside quantized_inputs, so the float copy carries none of its hooks.
        float_block = copy.deepcopy(block) if units else block
        if units:
            float_net, quant_net = _BlockNet(float_block, name, float_in), _BlockNet(block, name, quant_in)
            with quantized_inputs(model, activation_spec):
                for unit in units:
                    loop.run(unit, float_net, quant_net)
            # The nets hold this block's input caches: dropped now, or two more caches (the
            # calibration data's hidden states, 67 MB each at 1 B widths) live through the next block.
            del float_net, quant_net
        with _no_mha_fastpath():
            with quantized_inputs(model, activation_spec):
                quant_in = {j: _with_hidden(a, kw, _hidden_of(block(*a, **kw))) for j, (a, kw) in quant_in.items()}
            if identical:
                float_in = quant_in
            else:
                float_in = {
                    j: _with_hidden(a, kw, _hidden_of(float_block(*a, **kw))) for j, (a, kw) in float_in.items()
                }
        del float_block
        release_free_memory()
        # progress of a long stage (a 1 B decoder's blocks take minutes each): --verbose shows it
        rss, peak = resident_memory()
        log.info(
            "gpfq: block %d/%d (%s, %d weights) in %.1f s; resident %s, peak %s",
            i + 1,
            len(chain.block_names),
            name,
            len(units),
            time.perf_counter() - started,
            "?" if rss is None else format_bytes(rss),
            "?" if peak is None else format_bytes(peak),
        )
    if phases.after:
        float_replay.hidden = {j: _hidden_of(_hidden_in(a, kw)) for j, (a, kw) in float_in.items()}
        quant_replay.hidden = {j: _hidden_of(_hidden_in(a, kw)) for j, (a, kw) in quant_in.items()}
        del float_in, quant_in
        with _blocks_replaced(model, chain, quant_replay), quantized_inputs(model, activation_spec):
            quant_model_net = _ModelNet(model, batches, quant_replay)
            for unit in phases.after:
                loop.run(unit, float_model_net, quant_model_net)


class _UnitLoop:
    """Quantizes planned weights one at a time from captured statistics (fills ``quant`` and
    ``report``); the networks it captures from are given per weight.

    ``parts`` is ``[calibration]`` or ``[fit rows, held-out rows]`` (lists of batch
    indices): with a hold-out, each candidate alphabet is fit on the first and judged on the
    second, and the chosen one is refit on both.
    """

    def __init__(
        self,
        modules,
        plans,
        parts,
        batches,
        seed,
        *,
        factors,
        range_quantile,
        sparsity,
        sparsity_lambda,
        bias_correction,
        max_patches,
        block_size,
    ):
        self.modules, self.plans, self.parts, self.batches, self.seed = modules, plans, parts, batches, seed
        self.units_done = 0  # seeds each weight's patch subsampling
        self.factors, self.range_quantile = factors, range_quantile
        self.sparsity, self.sparsity_lambda = sparsity, sparsity_lambda
        self.bias_correction, self.max_patches, self.block_size = bias_correction, max_patches, block_size
        self.quant: dict[str, QuantizedTensor] = {}
        self.report: dict[str, dict] = {}
        # Consecutive Linear layers fed the very same tensor (q/k/v projections) share
        # statistics: quantizing one cannot change the others' input.
        self.group_of: dict[str, int] = {}
        self.last: tuple = (None, None)

    def run(self, unit: _Unit, float_net: _Net, quant_net: _Net) -> None:
        """Quantize ``unit``'s weight in place, its statistics captured from the two networks."""
        from compress.distributed import all_gather_rows, rank_and_world

        release_free_memory()  # the last weight's temporaries: back to the OS before this one's
        rank, world = rank_and_world()
        plan = self.plans[unit.key]
        layer = self.modules[unit.owner]
        param = getattr(layer, unit.attr)
        w2d = as_matrix(param.detach()).float()
        rows, cols = w2d.shape
        blocks = unit.blocks(layer, rows)
        sparsity, sparsity_lambda, block_size = self.sparsity, self.sparsity_lambda, self.block_size
        range_quantile, factors = self.range_quantile, self.factors

        # A convolution's bound applies to its kernel-order matrix: the same rows (so the same
        # per-channel grid), its columns regrouped into the pairs the kernel sums.
        w_grid = conv_kernel_order(param.detach()).float() if plan.conv_pair_limit else w2d
        grid_limit = plan.conv_pair_limit or plan.pair_limit

        def grid(factor, w_grid=w_grid, plan=plan, grid_limit=grid_limit):
            if factor == RTN_GRID:
                return uniform_scale(
                    w_grid,
                    plan.bits,
                    granularity=plan.granularity,
                    group_size=plan.group_size,
                    symmetric=plan.symmetric,
                    pair_limit=grid_limit,
                )
            return uniform_scale(
                w_grid,
                plan.bits,
                granularity=plan.granularity,
                group_size=plan.group_size,
                symmetric=plan.symmetric,
                factor=factor,
                quantile=range_quantile,
                full_range=True,
                pair_limit=grid_limit,
            )

        stats = parts_stats = None
        algorithm = "gpfq"
        group = self.group_of.get(unit.owner)
        if unit.kind != "rtn":
            try:
                shared = unit.kind == "module" and len(blocks) == 1 and group is not None
                parts_stats = self.last[1] if shared and self.last[0] == group else None
                if parts_stats is None:
                    parts_stats = [
                        collect_stats(
                            float_net,
                            quant_net,
                            unit,
                            self.batches,
                            part,
                            self.max_patches,
                            _mix(self.seed, self.units_done),
                            sizes=[cols] * len(blocks),
                            device=w2d.device,
                        )
                        for part in self.parts
                    ]
            except _NoStatistics as err:
                unit = _Unit(unit.key, unit.param, unit.owner, unit.attr, "rtn", str(err) + ", rounded to nearest")
        mask = None if plan.mask is None else as_matrix(plan.mask).to(w2d.device)
        if parts_stats is None:
            # No inputs to follow: round to nearest on RTN's grid (the report says why).
            scale, zp = grid(RTN_GRID)
            codes = _rounded(w2d, scale, zp, plan)
            if mask is not None:
                codes = torch.where(mask.bool(), codes, zero_codes(zp, rows, cols).to(codes.device))
            algorithm = f"rtn ({unit.reason})"
            log.info("gpfq: %s", algorithm)
            chosen_factor = RTN_GRID
        else:
            # parts_stats: one list of per-block statistics per part (fit, held-out); judged on
            # the held-out part, fit on the first, the final codes and report on all rows.
            fit_stats, val_stats = parts_stats[0], parts_stats[-1]
            held_out = len(parts_stats) > 1

            def all_rows():
                """The statistics of every sample. A weight whose statistics its group's next
                member reuses gets a new sum; any other adds the held-out rows into the fitting
                ones in place (one N × N triple less at the peak)."""
                if not held_out:
                    return fit_stats
                if group is not None:
                    return [a.merged(b) for a, b in zip(fit_stats, val_stats)]
                for a, b in zip(fit_stats, val_stats):
                    a.add_stats(b)
                return fit_stats

            def codes_for(grids, stats_of_blocks, w2d=w2d, plan=plan, mask=mask, blocks=blocks):
                """GPFQ codes on each ``(scale, zero point)`` of ``grids``: every block of rows
                (a conv group, q/k/v) on its own statistics, all grids stacked as extra rows
                of one pass of the greedy loop (rows are independent given the statistics)."""
                k = len(grids)
                per_grid: list[list[torch.Tensor]] = [[] for _ in grids]
                for sl, st in zip(blocks, stats_of_blocks):
                    w = w2d[sl]
                    r = w.shape[0]
                    zps = [z for _, z in grids]
                    scales = torch.cat([_rows_of(sc, sl).expand(r, -1) for sc, _ in grids])
                    zeros = None if zps[0] is None else torch.cat([_rows_of(z, sl).expand(r, -1) for z in zps])
                    # Rows are independent given the statistics: in a process group each rank
                    # runs the greedy loop on its slice of them, and a wide weight's slice
                    # goes in chunks of rows, so that the loop's working copies (the weight,
                    # its running products) stay near ROW_CHUNK_BYTES whatever the row count.
                    mine = split_range(k * r, world)[rank]
                    pieces = []
                    for chunk in row_chunks(mine.start, mine.stop, w.shape[1]):
                        stacked = torch.arange(chunk.start, chunk.stop) % r  # row of w of each stacked row
                        pieces.append(
                            gpfq_codes(
                                w[stacked],
                                st,
                                plan.bits,
                                scales[chunk],
                                None if zeros is None else zeros[chunk],
                                mask=None if mask is None else mask[sl][stacked],
                                sparsity=sparsity,
                                sparsity_lambda=sparsity_lambda,
                                block_size=block_size,
                                pair_limit=plan.pair_limit,
                            )
                        )
                    piece = torch.cat(pieces) if pieces else torch.zeros(0, w.shape[1], dtype=torch.int8)
                    del pieces
                    out = all_gather_rows(piece, k * r)
                    for i, chunk in enumerate(out.split(r)):
                        per_grid[i].append(chunk)
                return [torch.cat(chunks) for chunks in per_grid]

            # Several C: keep the alphabet whose GPFQ output error ‖Xw − X̃q‖ on the
            # calibration data is lowest (the statistics are shared, so each try is cheap).
            grids = [grid(f) for f in factors]
            candidates = [(f, "gpfq", sc, z, c) for f, (sc, z), c in zip(factors, grids, codes_for(grids, fit_stats))]
            if RTN_GRID in factors:
                sc, z = grids[factors.index(RTN_GRID)]
                codes = _rounded(w2d, sc, z, plan)
                if mask is not None:
                    codes = torch.where(mask.bool(), codes, zero_codes(z, rows, cols).to(codes.device))
                candidates.append((RTN_GRID, "round", sc, z, codes))
            if len(candidates) > 1:
                errors, _ = _output_errors(
                    w2d,
                    [functools.partial(_dequantized_rows, c, sc, z) for _, _, sc, z, c in candidates],
                    blocks,
                    val_stats,
                    reference=False,
                )
                best = min(range(len(candidates)), key=lambda i: (errors[i], i))
                chosen_factor, how, scale, zp, codes = candidates[best]
                if how == "round":
                    algorithm = "gpfq (plain rounding on RTN's grid had the lowest calibration error)"
            else:
                chosen_factor, how, scale, zp, codes = candidates[0]
            stats = all_rows()
            if held_out and how != "round":  # refit on every sample with the chosen alphabet
                codes = codes_for([(scale, zp)], stats)[0]
        # The stored codes live on the host whatever the model's device.
        qt = UniformTensor(
            codes=codes.reshape(param.shape).contiguous().cpu(),
            bits=plan.bits,
            scale=scale.cpu(),
            zero_point=None if zp is None else zp.cpu(),
            method="gpfq",
        )
        codes = codes.reshape(rows, cols).to(w2d.device)

        def dequantized(sl: slice | torch.Tensor) -> torch.Tensor:
            """The rows ``sl`` of the quantized weight, float32 (never the whole of a wide one)."""
            return _dequantized(codes[sl], _rows_of(scale, sl), _rows_of(zp, sl))

        chunks = list(row_chunks(0, rows, cols))
        weight_err = math.sqrt(sum(float(dequantized(c).sub_(w2d[c]).norm()) ** 2 for c in chunks))
        info: dict = {
            "bits": plan.bits,
            "granularity": qt.granularity,
            "algorithm": algorithm,
            "scale_factor": chosen_factor,
            "weight_rel_error": weight_err / max(float(w2d.norm()), 1e-30),
        }
        if len(blocks) > 1:
            info["blocks"] = len(blocks)
        if stats is not None:
            # Reported on at most REPORT_ROWS rows per block: each error term costs a
            # rows × N × N product, more than GPFQ's own loop when it runs on every row.
            idx, sampled = _report_rows(blocks)
            w_rows = w2d[idx]
            rtn_scale, rtn_zp = (_rows_of(side, idx) for side in grid(RTN_GRID))
            rtn = _dequantized(round_to_grid(w_rows, rtn_scale, rtn_zp, plan.bits), rtn_scale, rtn_zp)
            (out_err, rerr), ref = _output_errors(w_rows, [dequantized(idx), rtn], sampled, stats)
            info["output_rel_error"] = out_err / max(ref, 1e-300)
            info["rtn_output_rel_error"] = rerr / max(ref, 1e-300)
            if len(idx) < rows:
                info["output_error_rows"] = len(idx)
            bias = _bias_of(layer, unit.attr)
            if self.bias_correction and bias is not None:
                # E[x]·w − E[x̃]·q per output: the mean shift the quantization introduced.
                for sl, st in zip(blocks, stats):
                    mean_x = (st.sum_x / st.count).float()
                    mean_xt = (st.sum_xt / st.count).float()
                    for c in row_chunks(sl.start, sl.stop, cols):
                        bias[c].add_((w2d[c] @ mean_x - dequantized(c) @ mean_xt).to(bias.dtype))
        if param.is_contiguous():  # as_matrix is a view: written a chunk of rows at a time
            target = as_matrix(param.detach())
            for c in chunks:
                target[c].copy_(dequantized(c))
        else:
            param.copy_(dequantized(slice(0, rows)).reshape(param.shape))
        self.quant[unit.param] = qt
        self.report[unit.key] = info
        # Kept only for the next member of this weight's group (q/k/v): a 3072-input FFN
        # output's statistics would otherwise stay alive through the next block.
        shares = unit.kind == "module" and len(blocks) == 1 and stats is not None and group is not None
        self.last = (group, parts_stats) if shares else (None, None)
        self.units_done += 1
        log.debug("gpfq %s: %s", unit.key, info)


REPORT_ROWS = 512  # rows per weight block the report's output errors are measured on
# Bytes of float32 rows per chunk of a wide weight (GPFQ's loop, the dequantized values):
# a 32000 × 2048 vocabulary head would otherwise make several 262 MB copies at once.
ROW_CHUNK_BYTES = 64 << 20


def row_chunks(start: int, stop: int, cols: int, chunk_bytes: int | None = None) -> Iterator[slice]:
    """``[start, stop)`` in consecutive slices of at most ``chunk_bytes`` (default
    ``ROW_CHUNK_BYTES``) of float32 rows."""
    step = max(1, (ROW_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * max(cols, 1)))
    for a in range(start, stop, step):
        yield slice(a, min(a + step, stop))


def _report_rows(blocks: list[slice]) -> tuple[torch.Tensor, list[slice]]:
    """Evenly spaced rows of each block, at most ``REPORT_ROWS`` of each (all when fewer):
    their indices, and the blocks as slices of the selected rows."""
    idx, sampled, start = [], [], 0
    for sl in blocks:
        n = sl.stop - sl.start
        step = max(1, math.ceil(n / REPORT_ROWS))
        rows = torch.arange(sl.start, sl.stop, step)
        idx.append(rows)
        sampled.append(slice(start, start + len(rows)))
        start += len(rows)
    return torch.cat(idx), sampled


def _rounded(w2d: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, plan: LayerPlan) -> torch.Tensor:
    """Round-to-nearest codes on the grid, within the plan's pair bound (``LayerPlan.pair_limit``)."""
    codes = round_to_grid(w2d, scale, zp, plan.bits)
    return codes if plan.pair_limit is None or zp is not None else limit_u8s8_pairs(codes, plan.pair_limit)


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
    params = state.parameters_by_name()
    for pname, (target, bits) in chosen.items():
        # The plan names the parameter where the model holds it (a tied weight: its owner here).
        key = target.layer if target.attr == "weight" else f"{target.layer}.{target.attr}"
        keys[key] = pname
        limit = kernel_pair_limit(state.extras.get(EXTRAS_KEY), pname)
        conv = params[pname].dim() >= 3
        plans[key] = LayerPlan(
            bits,
            config.granularity,
            config.group_size,
            config.symmetric,
            masks[pname],
            None if conv else limit,
            limit if conv and config.granularity != "per_group" else None,
        )
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
