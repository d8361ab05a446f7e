"""The round-to-nearest (RTN) baseline on the shared uniform grids (``compress.grid``)."""

from __future__ import annotations

import logging

import torch

from compress.grid import as_matrix, limit_u8s8_pairs, round_to_grid, uniform_scale, zero_codes
from compress.qtensor import QuantizedTensor, UniformTensor

log = logging.getLogger(__name__)


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    *,
    granularity: str = "per_channel",
    group_size: int = 32,
    symmetric: bool = True,
    mask: torch.Tensor | None = None,
    pair_limit: int | None = None,
) -> QuantizedTensor:
    """Round-to-nearest quantization of one weight tensor.

    Args:
        weight: any Linear/Conv weight (output channels first).
        bits: code width (2..8).
        granularity: ``per_tensor``, ``per_channel`` or ``per_group``.
        group_size: input columns per scale for ``per_group``.
        symmetric: zero-centred grid (no zero point).
        mask: pruning mask (True = kept), same shape as ``weight``; pruned weights get the
            code of exactly 0.
        pair_limit: bound on each pair of input columns' same-signed codes: the grid's step
            leaves room for it (``compress.grid.uniform_scale``) and what rounding still puts
            over it is moved back (``compress.grid.limit_u8s8_pairs``); None: no bound.
            Symmetric grids only: an asymmetric grid's codes are offset by its zero point, so
            moving them would move the weights; the export stores those that break the bound
            for the exact uint8 kernel instead.

    Returns:
        The quantized tensor; its dequantized value is within half a step of ``weight``.
    """
    w2d = as_matrix(weight)
    rows, cols = w2d.shape
    scale, zero_point = uniform_scale(
        w2d, bits, granularity=granularity, group_size=group_size, symmetric=symmetric, pair_limit=pair_limit
    )
    codes = round_to_grid(w2d, scale, zero_point, bits)
    if pair_limit is not None and zero_point is None:  # symmetric grids only (see limit_u8s8_pairs)
        codes = limit_u8s8_pairs(codes, pair_limit)
    if mask is not None:
        keep = as_matrix(mask).bool()
        codes = torch.where(keep, codes, zero_codes(zero_point, rows, cols))
    return UniformTensor(
        codes=codes.reshape(weight.shape).contiguous(), bits=bits, scale=scale, zero_point=zero_point, method="rtn"
    )


def weight_rel_error(qt: QuantizedTensor, weight: torch.Tensor) -> float:
    """||dequantized - weight|| / ||weight||."""
    w = weight.detach().float()
    return ((qt.dequantize() - w).norm() / w.norm().clamp_min(1e-30)).item()


def quantize_method(state, config, ctx, chosen: dict, masks: dict) -> tuple[dict[str, QuantizedTensor], dict]:
    """The ``rtn`` method of the quantize stage (see ``compress.quantize.stage``).

    ``chosen`` maps canonical parameter names to ``(WeightTarget, bits)``.
    """
    from compress.quantize.activations import EXTRAS_KEY, kernel_pair_limit

    params = state.parameters_by_name()
    new: dict[str, QuantizedTensor] = {}
    report: dict[str, dict] = {}
    for pname, (target, bits) in chosen.items():
        w = params[pname]
        limit = kernel_pair_limit(state.extras.get(EXTRAS_KEY), pname)
        conv = w.dim() >= 3
        if limit is not None and conv and config.granularity != "per_group":
            qt = _conv_in_kernel_order(w, bits, config, masks[pname], limit)
        else:
            # a per-group convolution gets no bound: groups of columns would mix in the
            # kernel's order (the export keeps codes over it exact on the uint8 kernel)
            qt = rtn_quantize(
                w,
                bits,
                granularity=config.granularity,
                group_size=config.group_size,
                symmetric=config.symmetric,
                mask=masks[pname],
                pair_limit=None if conv else limit,
            )
        new[pname] = qt
        report[target.key] = {"bits": bits, "granularity": qt.granularity, "weight_rel_error": weight_rel_error(qt, w)}
    return new, report


def _conv_in_kernel_order(w: torch.Tensor, bits: int, config, mask: torch.Tensor | None, limit: int) -> QuantizedTensor:
    """RTN of a convolution (per channel or per tensor) whose codes must respect ``limit`` in
    the order onnxruntime's kernel sums them: rounded as the matrix
    ``compress.grid.conv_kernel_order`` makes (the same rows, so the same grid), codes put
    back in the weight's layout."""
    import dataclasses

    from compress.grid import conv_kernel_order, from_conv_kernel_order

    qt = rtn_quantize(
        conv_kernel_order(w.detach()),
        bits,
        granularity=config.granularity,
        symmetric=config.symmetric,
        mask=None if mask is None else conv_kernel_order(mask),
        pair_limit=limit,
    )
    return dataclasses.replace(qt, codes=from_conv_kernel_order(qt.codes, w.shape).contiguous())
