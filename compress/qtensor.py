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
from typing import Any, ClassVar, Union

import torch


def signed_range(bits: int, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a signed ``bits``-wide code; ``narrow`` drops the lowest value."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Codes:
    """What both kinds share: integer ``codes`` shaped like the weight, their bit width and
    the method that produced them."""

    codes: torch.Tensor
    bits: int

    def _check_bits(self, low: int) -> None:
        if not low <= self.bits <= 8:
            raise ValueError(f"bits must be in {low}..8, got {self.bits}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def rows_cols(self) -> tuple[int, int]:
        """The weight viewed as ``(out, in_flat)``."""
        rows = self.codes.shape[0] if self.codes.dim() else 1
        return rows, max(self.codes.numel() // max(rows, 1), 1) if self.codes.numel() else 0


@dataclass(frozen=True)
class UniformTensor(_Codes):
    """``w ≈ (codes - zero_point) * scale`` on a uniform grid (see the module docstring)."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    method: str = ""

    kind: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        self._check_bits(1)
        if self.codes.dtype != torch.int8:
            raise ValueError(f"uniform codes must be int8, got {self.codes.dtype}")
        if self.scale.dim() != 2:
            raise ValueError(f"scale must be 2-D (rows, groups), got shape {tuple(self.scale.shape)}")
        rows, in_flat = self.rows_cols
        if self.scale.shape[0] not in (1, rows) or in_flat % self.scale.shape[1]:
            raise ValueError(
                f"scale shape {tuple(self.scale.shape)} does not fit codes of shape {tuple(self.codes.shape)}"
            )
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError(
                f"zero_point shape {tuple(self.zero_point.shape)} differs from scale shape {tuple(self.scale.shape)}"
            )

    @property
    def group_size(self) -> int | None:
        """Input columns per scale, or None when the scale is per tensor / per channel."""
        if self.scale.shape[1] == 1:
            return None
        return self.rows_cols[1] // self.scale.shape[1]

    @property
    def granularity(self) -> str:
        if self.scale.shape[1] > 1:
            return "per_group"
        return "per_channel" if self.scale.shape[0] > 1 else "per_tensor"

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these integers stand for."""
        rows, cols = self.rows_cols
        groups = self.scale.shape[1]
        q = self.codes.reshape(rows, groups, cols // groups).float()
        if self.zero_point is not None:
            q = q - self.zero_point.float().unsqueeze(-1)
        return (q * self.scale.float().unsqueeze(-1)).reshape(self.shape)

    def storage_bits(self) -> int:
        """Bits needed to store this tensor: packed codes, float32 scales, int8 zero points."""
        n = self.codes.numel() * self.bits + self.scale.numel() * 32
        if self.zero_point is not None:
            n += self.zero_point.numel() * 8
        return n

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "codes": self.codes,
            "bits": self.bits,
            "method": self.method,
            "scale": self.scale,
        }
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        return out


@dataclass(frozen=True)
class CodebookTensor(_Codes):
    """``w = codebook[codebook_of_row[row], codes]`` (weight sharing; see the module docstring)."""

    codebook: torch.Tensor
    codebook_of_row: torch.Tensor | None = None
    method: str = ""

    kind: ClassVar[str] = "codebook"
    granularity: ClassVar[str] = "codebook"
    group_size: ClassVar[None] = None

    def __post_init__(self) -> None:
        self._check_bits(1)
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"codebook indices must be uint8, got {self.codes.dtype}")
        if self.codebook.dim() != 2 or self.codebook.shape[1] > 2**self.bits:
            raise ValueError(f"codebook must be (n_codebooks, <= 2**bits), got {tuple(self.codebook.shape)}")
        rows = self.rows_cols[0]
        if self.codebook_of_row is not None and self.codebook_of_row.shape != (rows,):
            raise ValueError(
                f"codebook_of_row must have one entry per row ({rows}), got {tuple(self.codebook_of_row.shape)}"
            )

    def row_codebooks(self) -> torch.Tensor:
        """The codebook index of every output row (int64)."""
        rows = self.rows_cols[0]
        if self.codebook_of_row is None:
            return torch.zeros(rows, dtype=torch.long)
        return self.codebook_of_row.long()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these indices stand for."""
        rows, cols = self.rows_cols
        idx = self.codes.reshape(rows, cols).long()
        table = self.codebook.float()[self.row_codebooks()]  # (rows, k)
        return torch.gather(table, 1, idx).reshape(self.shape)

    def storage_bits(self) -> int:
        """Bits needed to store this tensor: packed indices plus the float32 codebooks."""
        return self.codes.numel() * self.bits + self.codebook.numel() * 32

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "codes": self.codes,
            "bits": self.bits,
            "method": self.method,
            "codebook": self.codebook,
        }
        if self.codebook_of_row is not None:
            out["codebook_of_row"] = self.codebook_of_row
        return out


QuantizedTensor = Union[UniformTensor, CodebookTensor]  # noqa: UP007 (a runtime alias: isinstance, pydantic)
"""A quantized weight of either kind; consumers that must tell them apart use isinstance."""

_KINDS: dict[str, type] = {"uniform": UniformTensor, "codebook": CodebookTensor}
_FIELDS = {
    "uniform": {"codes", "bits", "method", "scale", "zero_point"},
    "codebook": {"codes", "bits", "method", "codebook", "codebook_of_row"},
}


def quantized_from_dict(d: dict[str, Any]) -> QuantizedTensor:
    """Rebuild a tensor written by ``to_dict``; only known kinds and versions load.

    Raises:
        ValueError: unknown kind, version or fields.
    """
    d = dict(d)
    version = d.pop("version", FORMAT_VERSION)
    # dicts written before the split carry no kind: a codebook means the codebook kind
    kind = d.pop("kind", "codebook" if d.get("codebook") is not None else "uniform")
    if kind not in _KINDS:
        raise ValueError(f"unknown quantized tensor kind {kind!r}; known: {', '.join(_KINDS)}")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"quantized tensor format version {version!r} is not supported (this build reads {FORMAT_VERSION})"
        )
    d = {k: v for k, v in d.items() if v is not None}
    unknown = set(d) - _FIELDS[kind]
    if unknown:
        raise ValueError(f"unknown {kind} quantized tensor fields: {sorted(unknown)}")
    cls: Any = _KINDS[kind]
    return cls(**d)
