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
