"""Architecture coverage (issue 12), piece by piece on the zoo's models (fast, seeded)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from compress.errors import InputError
from tests.arch import zoo


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _ctx(x, y=None):
    from compress.data import DataBundle, Split
    from compress.state import StageContext

    bundle = DataBundle({"train": Split("train", x, y, 64, 0), "calibration": Split("calibration", x, None, 64, 0)})
    return StageContext(bundle, out_dir=None, device=torch.device("cpu"), reference=None, seed=0)


def _quantize(model, x, config):
    from compress.quantize.stage import apply
    from compress.state import ModelState

    state = ModelState(model, (1, *x.shape[1:]))
    ctx = _ctx(x)
    return apply(state, config, ctx), ctx


# --- BatchNorm folding --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv_bn1d", "resnet_bn", "depthwise"])
def test_fold_batchnorm_keeps_outputs_and_removes_every_bn(name):
    from compress.batchnorm import fold_batchnorm

    torch.manual_seed(0)
    model = _randomise_bn(zoo.FACTORIES[name]())
    x = torch.randn(16, 40 if name == "conv_bn1d" else 64)
    before = model(x).detach()
    folded, left = fold_batchnorm(model, x)
    assert left == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(folded) == {"conv_bn1d": 2, "resnet_bn": 6, "depthwise": 5}[name]
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims,groups", [(1, 1), (2, 2), (3, 1)])
def test_fold_batchnorm_into_transposed_convolutions(dims, groups):
    """A transposed convolution keeps its output channels in weight dim 1, per group."""
    from compress.batchnorm import fold_batchnorm

    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    torch.manual_seed(dims)
    model = _randomise_bn(nn.Sequential(conv(4, 6, 3, stride=2, groups=groups, bias=dims != 2), norm(6), nn.ReLU()))
    x = torch.randn(5, 4, *([5] * dims))
    before = model(x).detach()
    folded, left = fold_batchnorm(model, x)
    assert folded == [{"bn": "1", "into": "0"}] and left == []
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_fold_refuses_a_conv_whose_output_also_feeds_a_residual():
    from compress.batchnorm import fold_batchnorm

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            h = self.conv(x.unsqueeze(1))
            return (self.bn(h) + h).flatten(1)

    model = _randomise_bn(Shared())
    x = torch.randn(8, 10)
    before = model(x).detach()
    folded, left = fold_batchnorm(model, x)
    assert folded == [] and left[0]["bn"] == "bn" and "also used elsewhere" in left[0]["reason"]
    torch.testing.assert_close(model(x), before)  # undone exactly


def test_quantize_stage_folds_bn_and_reload_rebuilds_the_folded_model(tmp_path):
    from compress.model_io import load_state, save_state
    from compress.quantize.config import RTNConfig

    torch.manual_seed(0)
    model = _randomise_bn(zoo.ResNetBN())
    x = torch.randn(32, 64)
    state, ctx = _quantize(model, x, RTNConfig(bits=8))
    assert len(ctx.metrics["quantize"]["batchnorm_folded"]) == 6
    assert "batchnorm: folded 6 BatchNorm" in ctx.metrics["notes"][0]
    assert "stem.0.weight" in state.quant and isinstance(state.module.stem[1], nn.Identity)
    save_state(state, tmp_path)
    again = load_state(tmp_path, zoo.ResNetBN)
    torch.testing.assert_close(again.module(x), state.module(x))


# --- ONNX initializers by value -------------------------------------------------------------


def test_row_permutation_is_exact():
    from compress.export.quantized import row_permutation

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    perm = np.array([2, 0, 1, 5, 4, 3])
    assert np.array_equal(w[row_permutation(w[perm], w)], w[perm])
    other = w[perm].copy()
    other[0, 0] += 1e-6
    assert row_permutation(other, w) is None


@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "legacy"])
def test_rewrite_refuses_an_initializer_that_does_not_hold_the_quantized_values(tmp_path, exporter):
    """The exporter folds BN into the conv initializer: quantized unfolded weights must not be swapped in."""
    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import quantize_onnx_model
    from compress.quantize.rtn import rtn_quantize

    torch.manual_seed(0)
    model = _randomise_bn(zoo.ConvBN1d(channels=4))
    qt = rtn_quantize(model.features[0].weight, 8)
    with torch.no_grad():
        model.features[0].weight.copy_(qt.dequantize())
    onnx_model = export_onnx(model, torch.randn(2, 40), tmp_path / "m.onnx", 21, exporter)
    with pytest.raises(ValueError, match="refusing to guess"):
        quantize_onnx_model(onnx_model, {"features.0.weight": qt})


# --- tied weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn", "gpfq", "codebook"])
def test_tied_weight_is_quantized_once_and_stays_shared(tmp_path, method):
    from compress.model_io import load_state, save_state
    from compress.quantize.config import CodebookConfig, GPFQConfig, RTNConfig

    cfg = {"rtn": RTNConfig, "gpfq": GPFQConfig, "codebook": CodebookConfig}[method](bits=4)
    torch.manual_seed(0)
    x, _ = zoo.token_data("train", n=64)
    state, _ctx = _quantize(zoo.TiedEmbedding(), torch.as_tensor(x), cfg)
    assert set(state.quant) == {"emb.weight", "mix.weight"}
    assert state.module.out.weight is state.module.emb.weight
    assert torch.equal(state.module.emb.weight, state.quant["emb.weight"].dequantize())
    save_state(state, tmp_path)
    again = load_state(tmp_path, zoo.TiedEmbedding)
    assert again.module.out.weight is again.module.emb.weight
    assert torch.equal(again.module.out.weight, state.quant["emb.weight"].dequantize())


def test_magnitude_prunes_a_tied_weight_once():
    from compress.prune.magnitude import select_weights

    pruned, skipped = select_weights(zoo.TiedEmbedding(), [])
    assert pruned == ["mix.weight", "emb.weight"] and skipped == []


# --- recurrent layers -----------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("method", ["rtn", "gpfq", "codebook"])
def test_recurrent_weights_are_quantized(cell, method):
    from compress.quantize.config import CodebookConfig, GPFQConfig, RTNConfig

    cfg = {"rtn": RTNConfig, "gpfq": GPFQConfig, "codebook": CodebookConfig}[method](bits=4)
    torch.manual_seed(0)
    state, ctx = _quantize(zoo.Recurrent(cell, hidden=16), torch.randn(32, 64), cfg)
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"} <= set(state.quant)
    cov = ctx.metrics["coverage"]
    assert cov["left"] == [] and cov["fraction"] > 0.9
    if method == "gpfq":
        layers = ctx.metrics["quantize"]["layers"]
        assert layers["rnn.weight_ih_l0"]["algorithm"].startswith("gpfq")
        assert layers["rnn.weight_hh_l0"]["algorithm"].startswith("rtn (")
        assert "rnn.weight_hh_l0" in cov["fallbacks"]


def test_magnitude_pruning_reaches_recurrent_weights():
    from compress.prune.magnitude import default_skip, select_weights

    model = zoo.gru()
    skip = default_skip(model, "first_last")
    assert skip == ["head", "rnn.weight_ih_l0"]
    pruned, _ = select_weights(model, skip)
    assert pruned == ["rnn.weight_hh_l0"]


# --- attention ------------------------------------------------------------------------------


def test_gpfq_quantizes_attention_in_and_out_projections():
    from compress.quantize.config import GPFQConfig, RTNConfig

    torch.manual_seed(0)
    x = torch.rand(64, 64)
    model = zoo.Transformer().eval()
    reference = model(x).detach()
    state, ctx = _quantize(copy.deepcopy(model), x, GPFQConfig(bits=4))
    layers = ctx.metrics["quantize"]["layers"]
    for key in ("encoder.self_attn.in_proj_weight", "encoder.self_attn.out_proj", "encoder.linear1"):
        assert layers[key]["algorithm"] == "gpfq", (key, layers[key])
        assert layers[key]["output_rel_error"] <= layers[key]["rtn_output_rel_error"] + 1e-9
    assert layers["encoder.self_attn.in_proj_weight"]["blocks"] == 3
    assert ctx.metrics["coverage"]["left"] == []
    rtn_state, _ = _quantize(copy.deepcopy(model), x, RTNConfig(bits=4))
    err = lambda m: ((m(x) - reference).norm() / reference.norm()).item()  # noqa: E731
    assert err(state.module) <= err(rtn_state.module)


def test_reinitialize_resets_attention_and_refuses_bare_parameters():
    from compress.train import reinitialize

    model = zoo.Transformer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)
    reinitialize(model, seed=0)
    for n, p in model.named_parameters():
        if p.dim() >= 2:  # weights are random again (norm/bias constants may legitimately repeat)
            assert not torch.all(p == 0.123), n
    assert before  # the architecture is intact

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(InputError, match=r"Bare \(scale\)"):
        reinitialize(Bare(), seed=0)


# --- grouped convolutions -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, pytest.param(8, marks=pytest.mark.slow)])
def test_gpfq_on_depthwise_convs_is_never_worse_than_rtn(bits):
    from compress.quantize.config import GPFQConfig

    torch.manual_seed(0)
    model = _randomise_bn(zoo.DepthwiseSeparable())
    _state, ctx = _quantize(model, torch.rand(64, 64), GPFQConfig(bits=bits))
    layers = ctx.metrics["quantize"]["layers"]
    assert layers["features.3"]["blocks"] == 16  # depthwise: one GPFQ per group
    for key, info in layers.items():
        assert info["output_rel_error"] <= info["rtn_output_rel_error"] + 1e-12, (key, info)


# --- variance pruning -----------------------------------------------------------------------


def test_variance_finds_transformer_ffn_and_skips_residual_blocks():
    from compress.prune.variance import find_mlp_blocks

    blocks = find_mlp_blocks(zoo.Transformer(), torch.rand(2, 64))
    assert [(b.first, b.second) for b in blocks] == [("encoder.linear1", "encoder.linear2")]
    skipped: list = []
    blocks = find_mlp_blocks(zoo.Untraceable(), torch.rand(2, 64), skipped)
    assert [(b.first, b.second) for b in blocks] == [("fc1", "fc2")]
    assert skipped[0]["first"] == "res_in" and "residual" in skipped[0]["reason"]


def test_variance_prunes_the_transformer_ffn():
    from compress.prune.variance import variance_prune

    torch.manual_seed(0)
    model = zoo.Transformer().eval()
    x = torch.rand(64, 64)
    report = variance_prune(model, [x], 0.25)
    assert model.encoder.linear1.out_features == 48 and model.encoder.linear2.in_features == 48
    assert report["neurons_removed"] == 16
    assert model(x).shape == (64, 10)
