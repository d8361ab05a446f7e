"""Uniform integer grids: the maths every quantizer shares (round-to-nearest, GPFQ,
quantized distillation's bucketed grid, activation export).

A weight is viewed as ``(rows, cols)`` (output channels × flattened inputs, PyTorch's own
flattening order), a scale is ``(rows|1, groups)`` and codes are signed integers in
``signed_range(bits)``: ``w ≈ (code - zero_point) * scale`` (``compress.qtensor.UniformTensor``).
"""

from __future__ import annotations

import logging

import torch

from compress.qtensor import signed_range

log = logging.getLogger(__name__)

# float16's normal range: a value inside it is stored as float16 with a relative error under
# 2**-10 when rounded up onto it (and is then exact).
FLOAT16_NORMAL = (2.0**-14, 65504.0)


def float16_ceil(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded up to the nearest float16 value wherever it lies in float16's normal range
    (``FLOAT16_NORMAL``; unchanged elsewhere), as float32.

    Embedding row steps and smoothing factors go through this before their codes are chosen:
    the export then stores them exactly in half the bytes
    (``compress.export.fast_kernels.compact_float_constants``), at a relative cost under
    2**-10 of a step. Rounding up, a step never shrinks, so no code that fit the range before
    it is clipped. (Weight grids are rounded after their codes are chosen: ``float16_nearest``
    in the quantize stage.)
    """
    x = x.float()
    h = x.half()
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    inside = (x >= FLOAT16_NORMAL[0]) & (x <= FLOAT16_NORMAL[1]) & torch.isfinite(h)
    return torch.where(inside, h.float(), x)


def float16_nearest(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 value wherever it lies in float16's normal range
    (unchanged elsewhere), as float32: a relative change of at most 2**-11."""
    x = x.float()
    h = x.half().float()
    inside = (x.abs() >= FLOAT16_NORMAL[0]) & (x.abs() <= FLOAT16_NORMAL[1]) & torch.isfinite(h)
    return torch.where(inside, h, x)


def log_grid_ceil(values: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """Positive ``values`` rounded up onto at most ``levels`` log-spaced float16 values between
    their minimum and maximum (any shape; float32).

    A per-row scale of a large table (a 30 k-token embedding) then takes an 8-bit index into a
    ``levels``-entry table instead of a float each (the export writes it so when that is
    smaller). The relative step is ``(max / min)**(1 / (levels - 1))``: 1.8% for a 100×
    spread, so a row's step grows by under 1% on average. Rounding up: nothing is clipped.
    """
    if levels < 2:
        raise ValueError(f"log_grid_ceil needs at least 2 levels, got {levels}")
    v = values.float()
    flat = v.reshape(-1)
    if flat.numel() == 0 or bool((flat <= 0).any()) or not bool(torch.isfinite(flat).all()):
        raise ValueError("log_grid_ceil needs positive finite values")
    lo, hi = flat.min().double(), flat.max().double()
    grid = lo * (hi / lo) ** (torch.arange(levels, dtype=torch.float64) / (levels - 1))
    grid = grid.float()
    grid[0], grid[-1] = flat.min(), flat.max()
    grid = torch.cummax(grid, 0).values  # monotone after float32 rounding
    idx = torch.searchsorted(grid, flat.contiguous()).clamp_max(levels - 1)
    return float16_ceil(grid[idx]).reshape(v.shape)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight viewed as ``(out, in_flat)`` (a view when possible)."""
    return weight.reshape(weight.shape[0], -1)


def resolve_granularity(cols: int, granularity: str, group_size: int) -> tuple[str, int]:
    """The granularity a layer with ``cols`` inputs can use, and its number of groups.

    ``per_group`` falls back to ``per_channel`` when ``group_size`` does not divide ``cols``
    or covers all of it.
    """
    if granularity == "per_group":
        if group_size < cols and cols % group_size == 0:
            return "per_group", cols // group_size
        log.info("group_size %d does not split %d input columns; using per_channel", group_size, cols)
        return "per_channel", 1
    if granularity not in ("per_tensor", "per_channel"):
        raise ValueError(f"unknown granularity {granularity!r}; use per_tensor, per_channel or per_group")
    return granularity, 1


def uniform_scale(
    w2d: torch.Tensor,
    bits: int,
    *,
    granularity: str = "per_channel",
    group_size: int = 32,
    symmetric: bool = True,
    factor: float = 1.0,
    quantile: float = 1.0,
    full_range: bool = False,
    pair_limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of a uniform grid fitted to ``w2d``'s range.

    Args:
        w2d: the weight as ``(rows, cols)``.
        bits: code width; codes lie in ``signed_range(bits)``.
        granularity: ``per_tensor``, ``per_channel`` or ``per_group`` (see ``resolve_granularity``).
        group_size: input columns per scale for ``per_group``.
        symmetric: zero-centred grid without a zero point.
        factor: widens the range (GPFQ's C); 1 for round-to-nearest.
        quantile: the range R comes from this quantile of the weights (1: the extremes).
        full_range: symmetric only: step ``factor·R / 2**(bits-1)`` (GPFQ's K, using the code
            ``-2**(bits-1)`` too) instead of ``factor·R / (2**(bits-1) - 1)``.
        pair_limit: symmetric only: the step is also at least ``factor·P / (pair_limit − 1)``,
            ``P`` the largest same-signed sum of a pair of input columns (2i, 2i+1), so that
            rounded codes respect ``U8S8_PAIR_LIMIT`` (two roundings add at most 1) instead of
            being clipped to it: a row whose largest weight sits next to a small one of the same
            sign loses a little resolution rather than the neighbour.

    Returns:
        ``scale`` of shape ``(rows|1, groups)`` (float32) and ``zero_point`` (int8, same shape) or None.
    """
    rows, cols = w2d.shape
    gran, groups = resolve_granularity(cols, granularity, group_size)
    w = w2d.detach().float()
    if gran == "per_tensor":
        blocks = w.reshape(1, 1, -1)
    else:
        blocks = w.reshape(rows, groups, cols // groups)
    qmin, qmax = signed_range(bits)
    if symmetric:
        mag = blocks.abs()
        r = mag.amax(-1) if quantile >= 1.0 else torch.quantile(mag, quantile, dim=-1)
        k = 2 ** (bits - 1) if full_range else qmax
        scale = factor * r / k
        if pair_limit is not None and max(-qmin, qmax) > pair_limit // 2:
            pairs = _pair_range(w, gran, groups)
            if pairs is not None:
                scale = torch.maximum(scale, factor * pairs / (pair_limit - 1))
        zero_point = None
    else:
        if quantile >= 1.0:
            lo, hi = blocks.amin(-1), blocks.amax(-1)
        else:
            lo, hi = torch.quantile(blocks, 1 - quantile, dim=-1), torch.quantile(blocks, quantile, dim=-1)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # zero must be on the grid
        centre, half = (hi + lo) / 2, factor * (hi - lo) / 2
        scale = 2 * half / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(qmin - (centre - half) / safe).clamp(qmin, qmax).to(torch.int8)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    return scale, zero_point


def _pair_range(w: torch.Tensor, granularity: str, groups: int) -> torch.Tensor | None:
    """The largest same-signed sum of a column pair (2i, 2i+1) per scale block, or None when
    a group holds an odd number of columns (pairs would straddle two scales)."""
    rows, cols = w.shape
    if granularity == "per_group" and (cols // groups) % 2:
        return None
    if cols % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    pos, neg = w.clamp_min(0), w.clamp_max(0)
    sums = torch.maximum(pos[:, 0::2] + pos[:, 1::2], -(neg[:, 0::2] + neg[:, 1::2]))  # (rows, pairs)
    if granularity == "per_tensor":
        return sums.amax().reshape(1, 1)
    return sums.reshape(rows, groups, -1).amax(-1)


def expand_to_columns(side: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A ``(rows|1, groups)`` scale or zero point repeated to ``(rows, cols)``."""
    groups = side.shape[1]
    return side.repeat_interleave(cols // groups, dim=1).expand(rows, cols)


def round_to_grid(w2d: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Nearest codes (int8, ``(rows, cols)``) of ``w2d`` on the grid, clipped to the code range."""
    rows, cols = w2d.shape
    qmin, qmax = signed_range(bits)
    s = expand_to_columns(scale, rows, cols)
    q = torch.round(w2d.detach().float() / s)
    if zero_point is not None:
        q = q + expand_to_columns(zero_point, rows, cols).float()
    return q.clamp(qmin, qmax).to(torch.int8)


def zero_codes(zero_point: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
    """The code that stands for 0.0 at every position, ``(rows, cols)`` int8."""
    if zero_point is None:
        return torch.zeros(rows, cols, dtype=torch.int8)
    return expand_to_columns(zero_point, rows, cols).to(torch.int8)


# onnxruntime's uint8 × int8 GEMM on x86 CPUs without VNNI (``vpmaddubsw``) adds the products
# of two adjacent input channels (k = 2i, 2i+1) into an int16 before widening. With
# activations in [0, 255] that sum cannot saturate when the pair's positive codes add up to
# at most 128, and so do its negative ones (255 · 128 = 32640 ≤ 32767). Measured with ORT
# 1.32: codes 65 and 64 in one pair are off by 128 on all-255 inputs, 64 and 64 are exact,
# and 127 next to -127 (or 127 in channels 1 and 2) is exact.
U8S8_PAIR_LIMIT = 128


def u8s8_pair_bounds(previous: torch.Tensor, limit: int = U8S8_PAIR_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes allowed next to ``previous`` (the pair's even channel): ``(lo, hi)`` per row,
    so that the pair's positive and negative codes each sum to at most ``limit`` in magnitude."""
    previous = previous.float()
    return -limit - previous.clamp_max(0), limit - previous.clamp_min(0)


def fits_u8s8_pairs(codes2d: torch.Tensor, limit: int = U8S8_PAIR_LIMIT) -> bool:
    """Whether codes ``(rows, cols)`` (columns = input channels, the GEMM's K) are safe from the
    uint8 × int8 kernel's int16 saturation (``U8S8_PAIR_LIMIT``)."""
    c = codes2d.to(torch.int32)
    if c.shape[1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    even, odd = c[:, 0::2], c[:, 1::2]
    pos = even.clamp_min(0) + odd.clamp_min(0)
    neg = even.clamp_max(0) + odd.clamp_max(0)
    return bool((pos <= limit).all()) and bool((neg >= -limit).all())


def conv_kernel_order(codes: torch.Tensor) -> torch.Tensor:
    """A convolution's codes ``(out, in / groups, *kernel)`` as the rows onnxruntime's
    uint8 × int8 convolution multiplies: ``(out, kernel positions · in / groups)``, the input
    channels of one kernel position adjacent (measured with ORT 1.32: codes 127 at two
    positions of one channel are exact on all-255 inputs, 127 in channels 0 and 1 of one
    position saturate). Pairs of this order are the ones ``U8S8_PAIR_LIMIT`` must bound."""
    out, cin = codes.shape[0], codes.shape[1]
    return codes.reshape(out, cin, -1).transpose(1, 2).reshape(out, -1)


def from_conv_kernel_order(rows: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`conv_kernel_order` for codes of ``shape``."""
    out, cin = shape[0], shape[1]
    return rows.reshape(out, -1, cin).transpose(1, 2).reshape(shape)


def kernel_pairs_fit(codes: torch.Tensor, bits: int, limit: int = U8S8_PAIR_LIMIT) -> bool:
    """Whether a weight's codes (a Linear's ``(out, in)``, a convolution's
    ``(out, in / groups, *kernel)``) respect ``limit`` in the order onnxruntime's uint8 × int8
    kernels sum pairs (a convolution: :func:`conv_kernel_order`; with one input channel
    per group, neighbouring kernel positions, measured: a stride-2 Conv1d with one input
    channel saturated, parity cosine 0.93). Codes of 7 bits or fewer always do (2 · 64 ≤ 128)."""
    if bits < 8:
        return True
    return fits_u8s8_pairs(conv_kernel_order(codes) if codes.dim() >= 3 else codes.reshape(codes.shape[0], -1), limit)


def limit_u8s8_pairs(codes2d: torch.Tensor, limit: int = U8S8_PAIR_LIMIT) -> torch.Tensor:
    """Codes ``(rows, cols)`` moved the least (in squared codes) to satisfy ``fits_u8s8_pairs``:
    the excess of a pair whose same-signed codes add up beyond ``limit`` is taken from both
    (round-to-nearest codes; GPFQ instead bounds each odd channel given its even one as it goes
    and compensates the error in the channels after it)."""
    c = codes2d.to(torch.int32).clone()
    n = c.shape[1] - c.shape[1] % 2
    even, odd = c[:, 0:n:2], c[:, 1:n:2]
    same = (even.sign() * odd.sign()) > 0
    excess = torch.where(same, (even.abs() + odd.abs() - limit).clamp_min(0), torch.zeros_like(even))
    sign = even.sign()
    # The larger code gives the larger half: both move about excess / 2 toward zero.
    big_first = even.abs() >= odd.abs()
    take_even = torch.where(big_first, (excess + 1) // 2, excess // 2)
    c[:, 0:n:2] = even - sign * take_even
    c[:, 1:n:2] = odd - sign * (excess - take_even)
    return c.to(codes2d.dtype)
