"""Round-to-nearest: codes on the grid, error within half a step, masks, config checks."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from compress.grid import expand_to_columns
from compress.qtensor import signed_range
from compress.quantize.config import RTNConfig
from compress.quantize.rtn import rtn_quantize, weight_rel_error
from compress.registry import stage_config

QuantizeConfig = stage_config("quantize")

CASES = [
    (bits, gran, sym)
    for bits in (2, 3, 4, 8)
    for gran in ("per_tensor", "per_channel", "per_group")
    for sym in (True, False)
]


@pytest.mark.parametrize("bits,granularity,symmetric", CASES)
def test_codes_in_range_and_error_within_half_step(bits, granularity, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g)
    qt = rtn_quantize(w, bits, granularity=granularity, group_size=16, symmetric=symmetric)
    qmin, qmax = signed_range(bits)
    assert qt.codes.dtype == torch.int8 and qt.codes.shape == w.shape
    assert qmin <= qt.codes.min() and qt.codes.max() <= qmax
    assert qt.granularity == granularity
    assert (qt.zero_point is None) == symmetric
    step = expand_to_columns(qt.scale, 24, 64)
    assert ((qt.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_conv_weight_and_group_fallback():
    w = torch.randn(8, 3, 5)  # 15 input columns: group_size 16 cannot split them
    qt = rtn_quantize(w, 4, granularity="per_group", group_size=16)
    assert qt.granularity == "per_channel" and qt.shape == (8, 3, 5)
    assert torch.allclose(qt.dequantize(), w, atol=(w.abs().amax() / 7).item())


def test_mask_gives_exact_zeros():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    mask = torch.rand(16, 32) > 0.5
    for symmetric in (True, False):
        qt = rtn_quantize(w, 3, mask=mask, symmetric=symmetric)
        deq = qt.dequantize()
        assert (deq[~mask] == 0).all()


def test_zero_rows_are_safe():
    w = torch.zeros(4, 8)
    w[0] = 1.0
    qt = rtn_quantize(w, 4)
    assert torch.isfinite(qt.scale).all() and torch.equal(qt.dequantize(), w)


@pytest.mark.parametrize(
    "bad,needle",
    [
        ({"method": "rtn", "bits": 9}, "9"),
        ({"method": "rtn", "bits": 1}, "1"),
        ({"method": "rtn", "granularity": "per_row"}, "per_row"),
        ({"method": "rtn", "group_size": 1}, "1"),
        ({"method": "rtn", "layer_bits": {"net.*": 12}}, "12"),
        ({"method": "rtn", "bogus": 1}, "bogus"),
        ({"method": "nope"}, "nope"),
    ],
)
def test_config_rejects_bad_values(bad, needle):
    with pytest.raises(ValidationError) as err:
        TypeAdapter(QuantizeConfig).validate_python(bad)
    assert needle in str(err.value)


def test_layer_selection_globs():
    cfg = RTNConfig(bits=4, skip=["head.2"], layer_bits={"features.*": 8, "*": 3})
    assert not cfg.selects("head.2") and cfg.selects("head.0")
    assert cfg.bits_for("features.0") == 8 and cfg.bits_for("head.0") == 3
    assert RTNConfig(layers=["head.*"]).selects("head.0") and not RTNConfig(layers=["head.*"]).selects("net.0")
    assert not RTNConfig(skip=["net.0.weight"]).selects("net.0")  # parameter names work too


def test_u8s8_pair_limit_projection():
    """``limit_u8s8_pairs``: every pair of input columns fits onnxruntime's uint8 × int8 int16
    sums afterwards, codes already fitting are untouched, and a pair loses only its excess."""
    from compress.grid import U8S8_PAIR_LIMIT, fits_u8s8_pairs, limit_u8s8_pairs

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (64, 97), generator=g, dtype=torch.int32).to(torch.int8)  # odd K
    assert not fits_u8s8_pairs(codes)
    limited = limit_u8s8_pairs(codes)
    assert limited.dtype == torch.int8 and fits_u8s8_pairs(limited)
    c, lim = codes.int(), limited.int()
    even, odd = c[:, 0:96:2], c[:, 1:96:2]
    same = even * odd > 0
    excess = torch.where(same, (even.abs() + odd.abs() - U8S8_PAIR_LIMIT).clamp_min(0), torch.zeros_like(even))
    moved = (c - lim).abs()
    assert torch.equal(moved[:, 0:96:2] + moved[:, 1:96:2], excess)  # only the excess, toward zero
    assert (lim.sign() * c.sign() >= 0).all() and torch.equal(lim[:, 96], c[:, 96])  # the unpaired last column
    assert (moved[:, 0:96:2] - moved[:, 1:96:2]).abs().max() <= 1  # shared evenly
    fine = torch.tensor([[64, 64, -128, 0, 127, -127, -64, -64]], dtype=torch.int8)
    assert fits_u8s8_pairs(fine) and torch.equal(limit_u8s8_pairs(fine), fine)
    assert not fits_u8s8_pairs(torch.tensor([[65, 64]])) and not fits_u8s8_pairs(torch.tensor([[-65, -64]]))


def test_rtn_pair_limit():
    from compress.grid import fits_u8s8_pairs

    # Gaussian weights, as trained layers have: few pairs of large same-signed codes.
    w = torch.randn(64, 384, generator=torch.Generator().manual_seed(1))
    free, bound = rtn_quantize(w, 8), rtn_quantize(w, 8, pair_limit=128)
    assert not fits_u8s8_pairs(free.codes) and fits_u8s8_pairs(bound.codes)
    # The pair-aware grid: a step ~1.3x wider where a row's largest weight has a same-signed
    # neighbour, instead of clipping that neighbour (which costs ~7x the error on MiniLM).
    assert (bound.scale >= free.scale).all() and (bound.scale > free.scale).any()
    assert weight_rel_error(bound, w) < 1.5 * weight_rel_error(free, w)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_pair_limit_leaves_asymmetric_grids_alone(granularity):
    """An asymmetric grid's codes are offset by its zero point: bounding their pairs would
    move the weights (it did: 13% relative error at 8 bits). They stay within half a step;
    the export runs codes that break the bound on the exact uint8 kernel."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) + 0.3
    qt = rtn_quantize(w, 8, granularity=granularity, group_size=32, symmetric=False, pair_limit=128)
    assert qt.zero_point is not None
    assert torch.equal(qt.codes, rtn_quantize(w, 8, granularity=granularity, group_size=32, symmetric=False).codes)
    step = expand_to_columns(qt.scale, 64, 96)
    assert ((qt.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_float16_ceil_and_log_grid_round_up_onto_few_values():
    from compress.grid import float16_ceil, log_grid_ceil

    torch.manual_seed(0)
    x = torch.rand(1000) * 10 + 1e-3
    h = float16_ceil(x)
    assert (h >= x).all() and torch.equal(h.half().float(), h)
    assert ((h - x) / x).max() <= 2**-10
    outside = torch.tensor([1e-6, 1e6])  # beyond float16's normal range: unchanged
    assert torch.equal(float16_ceil(outside), outside)
    g = log_grid_ceil(x)
    assert g.unique().numel() <= 256 and (g >= x).all() and torch.equal(g.half().float(), g)
    step = (x.max() / x.min()) ** (1 / 255)
    assert ((g / x).max() <= step * (1 + 2**-10)).item()
    with pytest.raises(ValueError, match="positive"):
        log_grid_ceil(torch.tensor([0.0, 1.0]))
