"""Padding-aware calibration: which positions of a batch are real data.

A sequence model fed fixed-length padded inputs computes activations at the padding
positions too; they never reach the output (attention masks them out, pooling skips them)
but they would dominate per-token calibration statistics (variance pruning, GPFQ's Gram
matrices) when most positions are padding. A model opts in by defining
``token_mask(x) -> BoolTensor (batch, positions)``, True where the position holds data,
matching the sequence length its layers actually see for the batch ``x``.
"""

from __future__ import annotations

import torch
from torch import nn


def token_mask(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``module.token_mask(x)`` as a bool tensor when the module defines it, else None."""
    fn = getattr(module, "token_mask", None)
    if fn is None or not callable(fn):
        return None
    mask = fn(x)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != x.shape[0]:
        raise ValueError(
            f"{type(module).__name__}.token_mask(x) must return a (batch, positions) tensor for a batch of "
            f"{x.shape[0]}, got {getattr(mask, 'shape', type(mask).__name__)}"
        )
    return mask.bool()


def valid_rows(activation: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``activation`` as rows ``(samples, features)``, the features on the last axis, keeping only
    the positions ``mask`` marks as data when the activation is ``(batch, positions, ...)``."""
    if mask is not None and activation.dim() >= 3 and activation.shape[:2] == mask.shape:
        activation = activation[mask]
    return activation.reshape(-1, activation.shape[-1])
