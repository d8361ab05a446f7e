"""Packed codes: quantized tensors of 4 bits or fewer hold their codes two (or more) to a byte."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch

from compress.qtensor import (
    CodebookTensor,
    UniformTensor,
    pack_codes,
    packed_width,
    quantized_from_dict,
    signed_range,
    unpack_codes,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(7, 13), (5, 3, 3, 2), (1, 3)])
def test_codes_round_trip_exactly_and_are_held_packed(bits, shape) -> None:
    g = torch.Generator().manual_seed(bits)
    lo, hi = signed_range(bits) if bits >= 2 else (-1, 0)
    codes = torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=g)
    codes.view(-1)[:2] = torch.tensor([lo, hi], dtype=torch.int8)  # both ends of the range
    qt = UniformTensor(codes=codes, bits=bits, scale=torch.rand(shape[0], 1) + 0.1)
    n = codes.numel()
    stored, width = qt.stored_codes()
    assert width == packed_width(bits) == {1: 1, 2: 2, 3: 4, 4: 4}.get(bits, 0)
    assert stored.numel() == (-(-n * width // 8) if width else n)
    assert torch.equal(qt.codes, codes) and qt.codes.dtype == torch.int8
    assert qt.shape == shape and qt.numel == n and qt.rows_cols == (shape[0], n // shape[0])
    torch.testing.assert_close(qt.dequantize(), codes.float().reshape(shape[0], -1).mul(qt.scale).reshape(shape))
    # saved and reloaded (the stage cache's torch.save), copied, replaced: the same codes
    buf = io.BytesIO()
    torch.save(qt.to_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert ("packed" in saved) == bool(width)
    for again in (quantized_from_dict(saved), copy.deepcopy(qt), dataclasses.replace(qt, method="x")):
        assert torch.equal(again.codes, codes)
    indices = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=g)
    cb = CodebookTensor(codes=indices, bits=bits, codebook=torch.arange(2.0**bits)[None])
    assert torch.equal(cb.codes, indices) and torch.equal(quantized_from_dict(cb.to_dict()).codes, indices)
    torch.testing.assert_close(cb.dequantize(), indices.float())


def test_pack_layout_is_low_nibble_first() -> None:
    """The packed bytes' layout is part of saved stage states: fixed here."""
    packed = pack_codes(torch.tensor([-1, 2, 7, -8, 3], dtype=torch.int8), 4)
    assert packed.tolist() == [0x2F, 0x87, 0x03]
    assert unpack_codes(packed, 4, (5,), torch.int8).tolist() == [-1, 2, 7, -8, 3]


def test_version_1_dicts_still_load() -> None:
    """Stage states written before packing (version 1, unpacked codes) load unchanged."""
    codes = torch.tensor([[-8, 7], [0, 1]], dtype=torch.int8)
    v1 = {"kind": "uniform", "version": 1, "codes": codes, "bits": 4, "method": "gpfq", "scale": torch.ones(2, 1)}
    qt = quantized_from_dict(v1)
    assert torch.equal(qt.codes, codes) and qt.stored_codes()[1] == 4 and qt.to_dict()["version"] == 2


def test_bad_codes_and_packed_dicts_are_refused() -> None:
    codes = torch.tensor([[-8, 7], [0, 1]], dtype=torch.int8)
    with pytest.raises(ValueError, match=r"outside the 3-bit range \[-4, 3\]"):
        UniformTensor(codes=codes, bits=3, scale=torch.ones(1, 1))
    with pytest.raises(ValueError, match="below 2\\*\\*bits = 4"):
        CodebookTensor(codes=torch.tensor([4], dtype=torch.uint8), bits=2, codebook=torch.zeros(1, 4))
    qt = UniformTensor(codes=codes, bits=4, scale=torch.ones(1, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        qt.codes = codes  # type: ignore[misc]
    good = qt.to_dict()
    for change, message in [
        ({"packed": good["packed"][:1]}, "1 packed bytes do not hold codes of shape \\(2, 2\\) at 4 bits"),
        ({"packed": good["packed"].to(torch.int8)}, "1-D uint8"),
        ({"shape": "2x2"}, "shape as a list"),
        ({"bits": 8}, "bits in 1..4"),
        ({"version": 3}, "version 3 is not supported \\(this build reads 1, 2\\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            quantized_from_dict({**good, **change})
