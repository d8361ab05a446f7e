"""Polino et al.'s bucketed linear quantizer, the shadow-weight hooks and the stored integers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.distill.quantized import (
    ShadowWeights,
    bucket_columns,
    bucket_grid,
    bucket_quantize,
    quantize_levels,
    quantized_distill,
    rtn_bucket_quantize,
    to_quantized_tensor,
)
from compress.qtensor import signed_range


def _weight(rows: int = 8, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)


@pytest.mark.parametrize(
    "cols, bucket, expected",
    [(320, 256, 64), (96, 256, 96), (512, 256, 256), (300, 256, 150), (5, 2, 1), (40, 40, 40)],
)
def test_bucket_columns(cols, bucket, expected):
    got = bucket_columns(cols, bucket)
    assert got == expected and cols % got == 0 and got <= max(bucket, cols if cols <= bucket else 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_buckets_use_their_min_max(bits):
    w = _weight()
    grid = bucket_grid(w, bits, 256)
    v = w.reshape(8, 2, 256)
    lo, hi = v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0)
    torch.testing.assert_close(grid.scale, (hi - lo) / (2**bits - 1), rtol=1e-6, atol=0)
    q = bucket_quantize(w, bits, 256).reshape(8, 2, 256)
    # every value within half a step of its level; at most 2**bits distinct values per bucket
    assert ((q - v).abs() <= grid.scale.unsqueeze(-1) / 2 * (1 + 1e-5)).all()
    for r in range(8):
        for b in range(2):
            assert q[r, b].unique().numel() <= 2**bits
    levels = quantize_levels(w, grid)
    assert levels.min() >= 0 and levels.max() <= 2**bits - 1 and torch.equal(levels, levels.round())


@pytest.mark.parametrize("bits", [2, 4])
def test_deterministic_rounding_is_idempotent(bits):
    w = _weight(seed=1)
    q1 = bucket_quantize(w, bits, 128)
    q2 = bucket_quantize(q1, bits, 128)
    step = bucket_grid(w, bits, 128).scale.max().item()
    torch.testing.assert_close(q2, q1, rtol=0, atol=1e-5 * step)
    grid = bucket_grid(w, bits, 128)
    assert torch.equal(quantize_levels(q1, grid), quantize_levels(w, grid))


def test_stochastic_rounding_is_unbiased_and_adjacent():
    bits, n = 3, 4000
    w = _weight(rows=4, cols=64, seed=2)
    grid = bucket_grid(w, bits, 64)
    x = (w.reshape(4, 1, 64) / grid.scale.unsqueeze(-1) + grid.zero_level.unsqueeze(-1)).reshape(w.shape)
    inside = (x >= 0) & (x <= 2**bits - 1)
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([bucket_quantize(w, bits, 64, "stochastic", g) for _ in range(n)])
    det = bucket_quantize(w, bits, 64)
    step = grid.scale.expand(4, 64)  # one bucket per row
    # each sample is one of the two levels around the value
    assert ((samples - w).abs() <= step * (1 + 1e-5)).all()
    # mean ≈ value: the std of the mean is <= step/2/sqrt(n) ~ 0.008 step
    err = ((samples.mean(0) - w).abs() / step)[inside]
    assert err.max() < 0.05, err.max()
    # deterministic rounding is biased per value by up to half a step: stochastic is much closer
    assert err.mean() < 0.2 * ((det - w).abs() / step)[inside].mean()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape, bucket", [((64, 320), 256), ((16, 16, 3), 256), ((10, 40), 16), ((32, 1, 5), 256)])
def test_quantized_tensor_is_exact(bits, shape, bucket):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    qt = to_quantized_tensor(w, bits, bucket)
    assert torch.equal(qt.dequantize(), bucket_quantize(w, bits, bucket))
    rows, cols = w.shape[0], w[0].numel()
    assert tuple(qt.scale.shape) == (rows, cols // bucket_columns(cols, bucket))
    assert qt.zero_point.dtype == torch.int8 and qt.zero_point.shape == qt.scale.shape
    lo, hi = signed_range(bits)
    assert qt.codes.dtype == torch.int8 and qt.codes.min() >= lo and qt.codes.max() <= hi
    assert qt.zero_point.min() >= lo and qt.zero_point.max() <= hi
    # Polino's storage: bits per value + side data per bucket
    assert qt.storage_bits() == w.numel() * bits + qt.scale.numel() * 40


def test_shadow_weights_receive_the_update():
    layer = nn.Linear(32, 8)
    w0 = layer.weight.detach().clone()
    shadow = ShadowWeights({"weight": layer.weight}, bits=2, bucket=32, rounding="deterministic")
    shadow.before_step()
    assert torch.equal(layer.weight.detach(), bucket_quantize(w0, 2, 32))  # forward sees Q(w)
    with torch.no_grad():
        layer.weight.add_(0.01)  # what an optimizer step would do
    shadow.after_step()
    torch.testing.assert_close(layer.weight.detach(), w0 + 0.01, rtol=0, atol=1e-6)


def test_quantized_training_stores_what_the_student_computes(mnist1d, one_thread):
    from compress.train import TrainConfig
    from compress.zoo import mnist1d_mlp

    torch.manual_seed(0)
    student = mnist1d_mlp(hidden=(64,))
    quant, summary = quantized_distill(
        student, None, mnist1d.x[:512], mnist1d.y[:512], TrainConfig(epochs=1, lr=1e-2), bits=3, bucket=16, alpha=0.0
    )
    assert summary["steps"] == 4
    params = dict(student.named_parameters())
    assert set(quant) == {"net.0.weight", "net.2.weight"}
    for name, qt in quant.items():
        # 40 inputs: no power-of-two divisor >= 16, so the largest divisor <= 16; 64 inputs: 16
        assert qt.bits == 3 and qt.group_size == {"net.0.weight": 10, "net.2.weight": 16}[name]
        assert torch.equal(qt.dequantize(), params[name].detach())
    kept = rtn_bucket_quantize(mnist1d_mlp(hidden=(64,)), 4, keep_first_last_float=True)
    assert kept == {}  # two layers: both are the first/last
