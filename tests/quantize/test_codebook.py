"""Codebook quantization: k-means, zeros kept, codebook sizes, centroid fine-tuning."""

from __future__ import annotations

import pytest
import torch

from compress.metrics import evaluate
from compress.quantize.codebook import _CodebookWeight, codebook_quantize, kmeans_1d
from compress.quantize.config import CodebookConfig
from compress.train import TrainConfig


def test_kmeans_recovers_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, 0.2, 3.0])
    v = centres[torch.randint(0, 3, (3000,), generator=g)] + 0.01 * torch.randn(3000, generator=g)
    c, assign = kmeans_1d(v, 3)
    assert torch.allclose(c, centres, atol=0.01)
    assert torch.allclose(c[assign], v, atol=0.06)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n_codebooks", [1, 3])
def test_at_most_2_pow_bits_values_per_codebook(bits, n_codebooks):
    torch.manual_seed(bits)
    w = torch.randn(30, 20, 3) * torch.linspace(0.1, 2, 30)[:, None, None]
    qt = codebook_quantize(w, bits, n_codebooks=n_codebooks)
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) < 2**bits
    assert qt.codebook.shape == (n_codebooks, 2**bits)
    deq = qt.dequantize().reshape(30, -1)
    for g in range(n_codebooks):
        assert deq[qt.row_codebooks() == g].unique().numel() <= 2**bits
    if bits >= 3:
        assert ((deq - w.reshape(30, -1)).norm() / w.norm()) < 0.25


def test_pruned_weights_stay_exactly_zero():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    mask = torch.rand(32, 64) > 0.6
    for qt in (codebook_quantize(w * mask, 2), codebook_quantize(w, 3, mask=mask, n_codebooks=4)):
        deq = qt.dequantize()
        assert (deq[~mask] == 0).all()
        assert (deq[mask] != 0).all()  # the zero code is reserved for pruned weights
        assert (qt.codebook[:, 0] == 0).all()


def test_centroid_gradient_is_sum_over_assignments():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    qt = codebook_quantize(w, 2, n_codebooks=2)
    part = _CodebookWeight(qt, reserve_zero=False)
    upstream = torch.randn(6, 10)
    (part(w) * upstream).sum().backward()
    which, idx = qt.row_codebooks(), qt.codes.long()
    expected = torch.zeros_like(qt.codebook)
    for i in range(6):
        for j in range(10):
            expected[which[i], idx[i, j]] += upstream[i, j]
    assert torch.allclose(part.codebook.grad, expected, atol=1e-5)


def test_finetuning_does_not_hurt_and_keeps_zeros(trained_models, run_stage):
    trained = trained_models["mnist1d_mlp"]
    g = torch.Generator().manual_seed(0)
    masks = {
        name: torch.rand(p.shape, generator=g) > 0.3
        for name, p in trained.model.named_parameters()
        if name.endswith("weight")
    }
    base = CodebookConfig(bits=2)
    tuned = CodebookConfig(bits=2, finetune=TrainConfig(epochs=2, lr=1e-3, batch_size=128))
    s0, _ = run_stage(trained, base, masks)
    s1, ctx = run_stage(trained, tuned, masks)
    acc0 = evaluate(s0.module, trained.x_eval, trained.y_eval)["accuracy"]
    acc1 = evaluate(s1.module, trained.x_eval, trained.y_eval)["accuracy"]
    assert acc1 >= acc0 - 0.005, (acc0, acc1)
    for name, mask in masks.items():
        qt = s1.quant[name]
        assert (qt.dequantize()[~mask] == 0).all()
        assert qt.dequantize().unique().numel() <= 4
        assert torch.equal(dict(s1.module.named_parameters())[name], qt.dequantize())
    assert "finetuned_weight_rel_error" in ctx.metrics["quantize"]["layers"]["net.0"]
