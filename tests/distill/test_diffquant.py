"""Learned quantization points: nearest-point assignment, the points' gradient, sorting,
the codebook that is stored, bit allocation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.distill.diffquant import (
    LearnedPoints,
    allocate_bits,
    differentiable_quantize,
    initial_points,
    nearest_point,
)
from compress.qtensor import CodebookTensor


def test_initial_points():
    s = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) ** 2
    q = initial_points(s, 3, "quantiles")
    assert q.shape == (8,) and torch.equal(q, q.sort().values) and q[0] >= 0 and q[-1] <= 1
    torch.testing.assert_close(q, torch.quantile(s, (torch.arange(8) + 0.5) / 8))
    torch.testing.assert_close(initial_points(s, 2, "uniform"), torch.tensor([0, 1 / 3, 2 / 3, 1]))
    with pytest.raises(ValueError, match="points_init"):
        initial_points(s, 2, "kmeans")


def test_nearest_point_is_the_argmin():
    g = torch.Generator().manual_seed(1)
    points = torch.rand(16, generator=g).sort().values
    v = torch.rand(5000, generator=g) * 1.4 - 0.2
    idx = nearest_point(v, points)
    best = (v[:, None] - points[None]).abs().min(1).values
    torch.testing.assert_close((v - points[idx]).abs(), best, rtol=0, atol=1e-7)


def test_points_gradient_is_alpha_times_the_assigned_sum():
    torch.manual_seed(0)
    layer = nn.Linear(20, 6)
    lp = LearnedPoints(layer.weight, bits=2)
    parametrize.register_parametrization(layer, "weight", lp)
    x, upstream = torch.randn(7, 20), torch.randn(7, 6)
    (layer(x) * upstream).sum().backward()
    dv = upstream.T @ x  # dL/dv̂ for the effective weight
    idx = lp.assignments(layer.parametrizations.weight.original)
    expected = torch.stack([lp.alpha * dv[idx == j].sum() for j in range(4)])
    torch.testing.assert_close(lp.points.grad, expected, rtol=1e-5, atol=1e-6)


def _small_student(mnist1d):
    from compress.train import TrainConfig, fit
    from compress.zoo import mnist1d_mlp

    torch.manual_seed(0)
    model = mnist1d_mlp(hidden=(64,))
    fit(model, mnist1d.x[:1024], mnist1d.y[:1024], TrainConfig(epochs=3, lr=1e-2))
    return model


@pytest.mark.parametrize("learn", [True, False])
def test_learned_points_stay_sorted_and_weights_take_the_nearest(mnist1d, teacher, one_thread, learn):
    from compress.train import TrainConfig

    student = _small_student(mnist1d)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    quant, summary = differentiable_quantize(
        student,
        teacher,
        mnist1d.x[:1024],
        mnist1d.y[:1024],
        TrainConfig(epochs=2, lr=1e-2),
        {"net.0": 2, "net.2": 3},
        learn_points=learn,
    )
    assert summary["steps"] == (16 if learn else 0)
    params = dict(student.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert torch.equal(params["net.0.bias"], before["net.0.bias"])  # only the points train
    for name, bits in (("net.0.weight", 2), ("net.2.weight", 3)):
        qt = quant[name]
        book = qt.codebook[0]
        assert isinstance(qt, CodebookTensor) and qt.codes.dtype == torch.uint8 and book.shape == (2**bits,)
        assert torch.equal(book, book.sort().values)
        assert torch.equal(qt.dequantize(), params[name].detach())  # stored == computed
        w = before[name]
        nearest = (w.unsqueeze(-1) - book).abs().min(-1).values
        torch.testing.assert_close((w - qt.dequantize()).abs(), nearest, rtol=0, atol=1e-6)
        if not learn:  # quantile points of the float weights
            lo, hi = w.min(), w.max()
            init = initial_points((w - lo) / (hi - lo), bits, "quantiles")
            torch.testing.assert_close(book, (hi - lo) * init + lo)


def test_allocate_bits_follows_gradient_norms_within_budget():
    norms = {"a": 1.0, "b": 4.0, "c": 0.5, "d": 100.0}
    sizes = {"a": 1000, "b": 1000, "c": 4000, "d": 10}
    bits = allocate_bits(norms, sizes, budget=3.0, min_bits=2, max_bits=8)
    assert sum(bits[n] * sizes[n] for n in bits) <= 3.0 * sum(sizes.values())
    assert bits["d"] == 8 and bits["c"] == 2 and bits["b"] >= bits["a"] >= bits["c"]
    assert all(2 <= b <= 8 for b in bits.values())
    assert set(allocate_bits(norms, sizes, 2.0).values()) == {2}
    with pytest.raises(ValueError, match="bit budget 9"):
        allocate_bits(norms, sizes, 9.0)


def test_gradient_norms_of_a_frozen_model(mnist1d, teacher):
    from compress.distill.diffquant import layer_gradient_norms
    from compress.distill.kd import distillation_loss
    from compress.distill.quantized import quantizable_layers

    layers = quantizable_layers(teacher)
    norms = layer_gradient_norms(
        teacher, teacher, mnist1d.x[:256], mnist1d.y[:256], layers, distillation_loss(2.0, 0.7)[0]
    )
    assert set(norms) == set(layers) and all(v > 0 for v in norms.values())
    assert not any(p.requires_grad for p in teacher.parameters())
