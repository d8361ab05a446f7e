"""The pipeline side of token models: one input tensor per sample, two named inputs deployed.

The pipeline hands a model ONE tensor per sample; a text model takes ``input_ids`` and
``attention_mask``. A sample is therefore int64 ``(2, L)``: token ids stacked on the
attention mask (right padding). ``TokenModel`` turns that into the model's natural call
``from_ids(input_ids, attention_mask)`` (implemented by the encoder and decoder wrappers in
this package), trims the padding every sample shares, tells the calibration code which
positions hold tokens, and exports with two named inputs and dynamic batch and sequence axes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.onnx_signature import OnnxSignature


def split_ids_mask(x: Any) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of a ``(batch, 2, L)`` batch (torch or numpy)."""
    if x.ndim != 3 or x.shape[1] != 2:
        raise ValueError(f"expected (batch, 2, sequence) token ids stacked on masks, got shape {tuple(x.shape)}")
    return x[:, 0], x[:, 1]


def trim_padding(x: torch.Tensor) -> torch.Tensor:
    """Drop the trailing positions that are padding in every sample of the batch.

    Exact for the models here: padding is masked out of every real position's computation
    (attention masks; causal attention never lets a later position reach an earlier one) and
    out of the output (masked mean pooling; the decoder reads the last real token), so the
    all-padding tail only costs work (data padded to a fixed length is mostly padding). The
    exported graph takes the sequence length as a dynamic axis instead and never trims.
    """
    longest = int(x[:, 1].sum(1).max()) if x.shape[0] else 0
    return x[..., : max(longest, 1)] if longest < x.shape[-1] else x


class TokenModel(nn.Module):
    """A text model fed ``(batch, 2, L)`` int64 ids-on-mask; subclasses define ``from_ids``."""

    def from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = split_ids_mask(trim_padding(x))
        return self.from_ids(input_ids, attention_mask)

    def token_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Which token positions of the batch ``x`` hold text, as ``forward`` sees them
        (``compress.padding``): calibration statistics skip the padding."""
        return split_ids_mask(trim_padding(x))[1].bool()

    def onnx_signature(self) -> OnnxSignature:
        axes = {0: "batch", 1: "sequence"}
        return OnnxSignature(
            module=_NamedInputs(self),
            input_names=["input_ids", "attention_mask"],
            dynamic_axes={"input_ids": dict(axes), "attention_mask": dict(axes)},
            split=split_ids_mask,
        )


class _NamedInputs(nn.Module):
    """``(input_ids, attention_mask) -> output``: the exported form; shares the parameters."""

    def __init__(self, model: TokenModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.from_ids(input_ids, attention_mask)
