"""The quantized-tensor representation that flows between stages.

Quantize (and quantized distillation) produce it; export writes its integers as ONNX
initializers; the lossless stage codes its integers. It lives in the core so that every
stage package can use it without importing another stage package.

Two kinds:

* **uniform**: ``w ≈ (codes - zero_point) * scale``. ``codes`` has the weight's shape and
  holds signed integers in ``[qmin, qmax]`` for ``bits`` (int8). ``scale`` is 2-D
  ``(rows, groups)`` over the weight viewed as ``(out, in_flat)``: ``(1, 1)`` per tensor,
  ``(out, 1)`` per output channel, ``(out, in_flat // group_size)`` per group of input
  columns. ``zero_point`` is ``None`` (symmetric) or an int8 tensor shaped like ``scale``.
* **codebook**: ``w = codebook[g, codes]`` where ``codes`` are uint8 indices (< 2**bits)
  and ``codebook`` is ``(n_codebooks, 2**bits)``; ``codebook_of_row`` maps each output row
  to its codebook (all zeros for one codebook per layer).

Codes of 4 bits or fewer are held packed, two (or, for 1–2 bits, four or eight) to a byte,
and ``codes`` unpacks them on each access: a 1 B-parameter int4 model's codes take 0.5 GB
in memory and in saved stage states, not 1 GB. Construct with unpacked codes; read
``numel``/``shape`` without unpacking.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeGuard, Union

import torch


def signed_range(bits: int, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a signed ``bits``-wide code; ``narrow`` drops the lowest value."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


FORMAT_VERSION = 2  # 2: codes of <= 4 bits saved packed ("packed"); 1 still loads
_READABLE_VERSIONS = (1, 2)


def packed_width(bits: int) -> int:
    """Bits per packed code slot: 1, 2 or 4 for codes of that many bits or fewer, 0 (not
    packed, one byte each) above 4."""
    for width in (1, 2, 4):
        if bits <= width:
            return width
    return 0


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """``codes`` (int8 or uint8, any shape) flattened into a uint8 tensor of ``width``-bit
    slots, the first code in the lowest bits of each byte. Values must fit ``width`` bits
    (two's complement for int8)."""
    per = 8 // width
    flat = codes.reshape(-1).view(torch.uint8) if codes.dtype == torch.int8 else codes.reshape(-1)
    pad = -flat.numel() % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slots = flat.reshape(-1, per)
    out = slots[:, 0] & ((1 << width) - 1)
    for i in range(1, per):
        out |= (slots[:, i] & ((1 << width) - 1)) << (width * i)
    return out


def unpack_codes(packed: torch.Tensor, width: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``pack_codes``: codes of ``shape``, int8 (sign-extended) or uint8."""
    per, mask = 8 // width, (1 << width) - 1
    out = torch.empty(packed.numel(), per, dtype=torch.uint8)
    for i in range(per):
        torch.bitwise_and(packed >> (width * i), mask, out=out[:, i])
    n = math.prod(shape)
    flat = out.reshape(-1)[:n]
    if dtype == torch.int8:
        sign = 1 << (width - 1)
        flat = flat.bitwise_xor_(sign).view(torch.int8).sub_(sign)
    return flat.reshape(shape)


@dataclass(frozen=True)
class _Codes:
    """What both kinds share: integer ``codes`` shaped like the weight, their bit width and
    the method that produced them.

    ``codes`` is a property over the stored form (``_store``: the codes themselves, or
    their packed bytes when ``packed_width(bits)`` is not 0); the dataclass's generated
    ``__init__`` sets it once through the property's setter, and ``__post_init__`` packs.
    """

    codes: torch.Tensor
    bits: int

    def _check_bits(self, low: int) -> None:
        if not low <= self.bits <= 8:
            raise ValueError(f"bits must be in {low}..8, got {self.bits}")

    def _pack(self) -> None:
        """Replace the stored codes by their packed bytes when ``bits`` allows it."""
        codes = self.__dict__["_store"]
        width = packed_width(self.bits)
        if width:
            object.__setattr__(self, "_store", pack_codes(codes, width))
        object.__setattr__(self, "_width", width)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.__dict__["_shape"]

    @property
    def codes_dtype(self) -> torch.dtype:
        return self.__dict__["_dtype"]

    @property
    def rows_cols(self) -> tuple[int, int]:
        """The weight viewed as ``(out, in_flat)``."""
        shape, n = self.shape, self.numel
        rows = shape[0] if shape else 1
        return rows, max(n // max(rows, 1), 1) if n else 0

    def _codes_dict(self) -> dict[str, Any]:
        """The codes' entries of ``to_dict``: packed bytes and the shape, or the codes."""
        store, width = self.stored_codes()
        return {"packed": store, "shape": list(self.shape)} if width else {"codes": store}

    def stored_codes(self) -> tuple[torch.Tensor, int]:
        """The codes as held: ``(tensor, width)``, packed bytes of ``width``-bit slots, or the
        codes themselves with width 0."""
        return self.__dict__["_store"], self.__dict__["_width"]


def _get_codes(self: _Codes) -> torch.Tensor:
    store, width = self.stored_codes()
    return unpack_codes(store, width, self.shape, self.codes_dtype) if width else store


def _set_codes(self: _Codes, value: torch.Tensor) -> None:
    if "_store" in self.__dict__:
        raise dataclasses.FrozenInstanceError("cannot assign to field 'codes'")
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"codes must be a tensor, got {type(value).__name__}")
    value = value.detach()
    object.__setattr__(self, "_store", value)
    object.__setattr__(self, "_shape", tuple(value.shape))
    object.__setattr__(self, "_dtype", value.dtype)
    object.__setattr__(self, "_width", 0)


# Assigned after the dataclass is made, so that the field has no default; the generated
# __init__ (object.__setattr__) goes through the setter.
_Codes.codes = property(_get_codes, _set_codes, doc="The integer codes, shaped like the weight.")  # type: ignore[assignment]


@dataclass(frozen=True)
class UniformTensor(_Codes):
    """``w ≈ (codes - zero_point) * scale`` on a uniform grid (see the module docstring)."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    method: str = ""

    kind: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        self._check_bits(1)
        if self.codes_dtype != torch.int8:
            raise ValueError(f"uniform codes must be int8, got {self.codes_dtype}")
        if self.scale.dim() != 2:
            raise ValueError(f"scale must be 2-D (rows, groups), got shape {tuple(self.scale.shape)}")
        rows, in_flat = self.rows_cols
        if self.scale.shape[0] not in (1, rows) or in_flat % self.scale.shape[1]:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} does not fit codes of shape {self.shape}")
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError(
                f"zero_point shape {tuple(self.zero_point.shape)} differs from scale shape {tuple(self.scale.shape)}"
            )
        lo, hi = signed_range(self.bits) if self.bits >= 2 else (-1, 0)
        if packed_width(self.bits) and self.numel and not (lo <= int(self.codes.min()) and int(self.codes.max()) <= hi):
            raise ValueError(f"codes outside the {self.bits}-bit range [{lo}, {hi}]")
        self._pack()

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
        n = self.numel * self.bits + self.scale.numel() * 32
        if self.zero_point is not None:
            n += self.zero_point.numel() * 8
        return n

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            **self._codes_dict(),
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
        if self.codes_dtype != torch.uint8:
            raise ValueError(f"codebook indices must be uint8, got {self.codes_dtype}")
        if self.codebook.dim() != 2 or self.codebook.shape[1] > 2**self.bits:
            raise ValueError(f"codebook must be (n_codebooks, <= 2**bits), got {tuple(self.codebook.shape)}")
        rows = self.rows_cols[0]
        if self.codebook_of_row is not None and self.codebook_of_row.shape != (rows,):
            raise ValueError(
                f"codebook_of_row must have one entry per row ({rows}), got {tuple(self.codebook_of_row.shape)}"
            )
        if packed_width(self.bits) and self.numel and int(self.codes.max()) >= 2**self.bits:
            raise ValueError(f"codebook indices must be below 2**bits = {2**self.bits}")
        self._pack()

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
        return self.numel * self.bits + self.codebook.numel() * 32

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            **self._codes_dict(),
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
_CODE_DTYPES = {"uniform": torch.int8, "codebook": torch.uint8}


def per_column_ok(qt: QuantizedTensor) -> TypeGuard[UniformTensor]:
    """Whether ``qt`` has one scale per output channel (or per tensor): the layout
    onnxruntime's integer kernels take (the export writes any other grid weight-only)."""
    return isinstance(qt, UniformTensor) and qt.scale.shape[1] == 1 and qt.bits <= 8


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
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"quantized tensor format version {version!r} is not supported"
            f" (this build reads {', '.join(map(str, _READABLE_VERSIONS))})"
        )
    d = {k: v for k, v in d.items() if v is not None}
    if "packed" in d:
        d["codes"] = _unpacked(d.pop("packed"), d.pop("shape", None), d.get("bits"), _CODE_DTYPES[kind])
    unknown = set(d) - _FIELDS[kind]
    if unknown:
        raise ValueError(f"unknown {kind} quantized tensor fields: {sorted(unknown)}")
    cls: Any = _KINDS[kind]
    return cls(**d)


def _unpacked(packed: Any, shape: Any, bits: Any, dtype: torch.dtype) -> torch.Tensor:
    """Codes from a ``to_dict``'s packed bytes, after checking that they fit its shape."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a 1-D uint8 tensor")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"packed codes need their shape as a list of sizes, got {shape!r}")
    width = packed_width(bits) if isinstance(bits, int) and 1 <= bits <= 8 else 0
    if not width:
        raise ValueError(f"packed codes need bits in 1..4, got {bits!r}")
    if packed.numel() != -(-math.prod(shape) // (8 // width)):
        raise ValueError(f"{packed.numel()} packed bytes do not hold codes of shape {tuple(shape)} at {bits} bits")
    return unpack_codes(packed, width, tuple(shape), dtype)
