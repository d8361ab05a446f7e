"""The quantized-tensor representation that flows between stages.

Quantize (and quantized distillation) produce it; export writes its integers as ONNX
initializers; the lossless stage codes its integers. It lives in the core so that every
stage package can use it without importing another stage package.

Two kinds:

* **uniform**: ``w ≈ (codes - zero_point) * scale``. ``codes`` has the weight's shape and
  holds signed integers in ``[qmin, qmax]`` for ``bits`` (stored as int8). ``scale`` is 2-D
  ``(rows, groups)`` over the weight viewed as ``(out, in_flat)``: ``(1, 1)`` per tensor,
  ``(out, 1)`` per output channel, ``(out, in_flat // group_size)`` per group of input
  columns. ``zero_point`` is ``None`` (symmetric) or an int8 tensor shaped like ``scale``.
* **codebook**: ``w = codebook[g, codes]`` where ``codes`` are uint8 indices (< 2**bits)
  and ``codebook`` is ``(n_codebooks, 2**bits)``; ``codebook_of_row`` maps each output row
  to its codebook (all zeros for one codebook per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def signed_range(bits: int, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a signed ``bits``-wide code; ``narrow`` drops the lowest value."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


@dataclass
class QuantizedTensor:
    codes: torch.Tensor
    bits: int
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    codebook_of_row: torch.Tensor | None = None
    method: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.is_codebook:
            if self.codes.dtype != torch.uint8:
                raise ValueError(f"codebook indices must be uint8, got {self.codes.dtype}")
            if self.codebook.dim() != 2 or self.codebook.shape[1] > 2**self.bits:
                raise ValueError(f"codebook must be (n_codebooks, <= 2**bits), got {tuple(self.codebook.shape)}")
        else:
            if self.scale is None:
                raise ValueError("a uniform QuantizedTensor needs a scale")
            if self.codes.dtype != torch.int8:
                raise ValueError(f"uniform codes must be int8, got {self.codes.dtype}")
            if self.scale.dim() != 2:
                raise ValueError(f"scale must be 2-D (rows, groups), got shape {tuple(self.scale.shape)}")
            rows, in_flat = self.rows_cols
            if self.scale.shape[0] not in (1, rows) or in_flat % self.scale.shape[1]:
                raise ValueError(
                    f"scale shape {tuple(self.scale.shape)} does not fit codes of shape {tuple(self.codes.shape)}"
                )

    @property
    def is_codebook(self) -> bool:
        return self.codebook is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def rows_cols(self) -> tuple[int, int]:
        rows = self.codes.shape[0] if self.codes.dim() else 1
        return rows, max(self.codes.numel() // max(rows, 1), 1) if self.codes.numel() else 0

    @property
    def group_size(self) -> int | None:
        """Input columns per scale, or None when the scale is per tensor / per channel."""
        if self.is_codebook or self.scale.shape[1] == 1:
            return None
        return self.rows_cols[1] // self.scale.shape[1]

    @property
    def granularity(self) -> str:
        if self.is_codebook:
            return "codebook"
        if self.scale.shape[1] > 1:
            return "per_group"
        return "per_channel" if self.scale.shape[0] > 1 else "per_tensor"

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these integers stand for."""
        rows, cols = self.rows_cols
        if self.is_codebook:
            idx = self.codes.reshape(rows, cols).long()
            which = (
                self.codebook_of_row.long()
                if self.codebook_of_row is not None
                else torch.zeros(rows, dtype=torch.long)
            )
            table = self.codebook.float()[which]  # (rows, k)
            return torch.gather(table, 1, idx).reshape(self.shape)
        groups = self.scale.shape[1]
        q = self.codes.reshape(rows, groups, cols // groups).float()
        if self.zero_point is not None:
            q = q - self.zero_point.float().unsqueeze(-1)
        return (q * self.scale.float().unsqueeze(-1)).reshape(self.shape)

    def storage_bits(self) -> int:
        """Bits needed to store this tensor: packed codes plus float32 side data."""
        n = self.codes.numel() * self.bits
        for side in (self.scale, self.codebook):
            if side is not None:
                n += side.numel() * 32
        if self.zero_point is not None:
            n += self.zero_point.numel() * 8
        return n

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        out: dict[str, Any] = {"codes": self.codes, "bits": self.bits, "method": self.method}
        for key in ("scale", "zero_point", "codebook", "codebook_of_row"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizedTensor":
        known = {"codes", "bits", "method", "scale", "zero_point", "codebook", "codebook_of_row"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantizedTensor fields: {sorted(unknown)}")
        return cls(**d)
