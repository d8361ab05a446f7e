"""Variance-based structured pruning: statistics, block discovery, exact folding, ablations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.metrics import count_parameters, evaluate
from compress.prune.variance import MLPBlock, RunningMoments, find_mlp_blocks, variance_prune


def _batches(x: torch.Tensor, bs: int = 500):
    return [x[i : i + bs] for i in range(0, len(x), bs)]


class TinyTransformer(nn.Module):
    """A BERT-style encoder layer: attention, then a Linear -> GELU -> Dropout -> Linear FFN."""

    def __init__(self, d: int = 16, ff: int = 48, tokens: int = 5, classes: int = 10):
        super().__init__()
        self.tokens, self.d = tokens, d
        self.embed = nn.Linear(40 // tokens, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, ff)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.ffn_out = nn.Linear(ff, d)
        self.norm2 = nn.LayerNorm(d)
        self.cls = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], self.tokens, -1))
        h = self.norm1(h + self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(h + self.ffn_out(self.drop(self.act(self.ffn_in(h)))))
        return self.cls(h.mean(1))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, forward hooks can."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(40, 32), nn.SiLU(), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 1.0
        return self.fc2(self.act(self.fc1(x)))


def test_running_moments_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(7, 33, 4, 12, generator=g) * 3 + 1000.0  # large mean: naive formulas cancel
    rm = RunningMoments()
    for chunk in data:
        rm.update(chunk)  # (33, 4, 12): every token is a sample
    flat = data.reshape(-1, 12).double()
    assert rm.n == flat.shape[0]
    torch.testing.assert_close(rm.mean, flat.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(rm.variance, flat.var(0, unbiased=False), rtol=1e-9, atol=1e-9)


def test_finds_blocks_in_mlp_cnn_head_transformer_and_untraceable(trained_mlp, trained_cnn):
    assert find_mlp_blocks(trained_mlp) == [
        MLPBlock("net.0", "net.2", "ReLU"),
        MLPBlock("net.2", "net.4", "ReLU"),
    ]
    assert find_mlp_blocks(trained_cnn) == [MLPBlock("head.0", "head.2", "ReLU")]
    assert find_mlp_blocks(TinyTransformer()) == [MLPBlock("ffn_in", "ffn_out", "GELU")]
    with pytest.raises(ValueError, match="cannot trace"):
        find_mlp_blocks(Untraceable())
    assert find_mlp_blocks(Untraceable(), torch.randn(2, 40)) == [MLPBlock("fc1", "fc2", "SiLU")]


def test_amount_zero_changes_no_output(trained_mlp, mnist1d):
    model = copy.deepcopy(trained_mlp)
    before = model(mnist1d.x_eval)
    report = variance_prune(model, _batches(mnist1d.x), 0.0)
    assert report["neurons_removed"] == 0
    assert count_parameters(model) == count_parameters(trained_mlp)
    torch.testing.assert_close(model(mnist1d.x_eval), before, rtol=0, atol=0)


def test_zero_variance_neurons_fold_exactly(trained_mlp, mnist1d):
    model = copy.deepcopy(trained_mlp)
    x = mnist1d.x[:1000]
    with torch.no_grad():  # make 40 neurons of the first block constant: 20 dead, 20 at a fixed value
        model.net[0].weight[:40] = 0
        model.net[0].bias[:20] = -1.0
        model.net[0].bias[20:40] = torch.linspace(0.5, 2.0, 20)
    ref = model(x)
    report = variance_prune(model, _batches(x), 40 / 512)
    assert report["blocks"][0]["hidden_after"] == 256 - 40
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_without_fold_constant_neurons_are_not_exact(trained_mlp, mnist1d):
    model = copy.deepcopy(trained_mlp)
    x = mnist1d.x[:1000]
    with torch.no_grad():
        model.net[0].weight[:40] = 0
        model.net[0].bias[:40] = 1.0
    ref = model(x)
    variance_prune(model, _batches(x), 40 / 512, mean_fold=False)
    assert (model(x) - ref).abs().max() > 1e-2


def test_half_the_neurons_beats_row_norm_and_no_fold(trained_mlp, mnist1d):
    acc = {}
    for label, kw in {
        "variance": {},
        "row_norm": {"statistic": "magnitude"},
        "no_fold": {"mean_fold": False},
        "pre_activation": {"statistic": "pre_activation_variance"},
    }.items():
        model = copy.deepcopy(trained_mlp)
        variance_prune(model, _batches(mnist1d.x), 0.5, **kw)
        acc[label] = evaluate(model, mnist1d.x_eval, mnist1d.y_eval)["accuracy"]
    assert acc["variance"] > acc["row_norm"] + 0.03, acc
    assert acc["variance"] > acc["no_fold"] + 0.03, acc


def test_parameter_count_drops_by_the_removed_rows_and_columns(trained_mlp, mnist1d):
    model = copy.deepcopy(trained_mlp)
    before, _ = count_parameters(model)
    report = variance_prune(model, _batches(mnist1d.x), 0.5)
    assert report["neurons_removed"] == 256
    r1 = 256 - report["blocks"][0]["hidden_after"]
    r2 = 256 - report["blocks"][1]["hidden_after"]
    assert r1 + r2 == 256
    # block 1 deletes rows (+bias) of net.0 and columns of net.2; block 2 rows of net.2 and columns of net.4
    expected = before - ((40 + 1) * (256 - r1) + (256 - r1) * (256 - r2) + (256 - r2) + (256 - r2) * 10 + 10)
    after, _ = count_parameters(model)
    assert before - after == expected
    assert model.net[0].out_features == 256 - r1
    assert model.net[2].in_features == 256 - r1 and model.net[2].out_features == 256 - r2
    assert model.net[4].in_features == 256 - r2
    assert isinstance(model.net[0], nn.Linear)


def test_min_neurons_per_block(trained_mlp, mnist1d):
    model = copy.deepcopy(trained_mlp)
    report = variance_prune(model, _batches(mnist1d.x[:500]), 0.99, min_neurons=8)
    assert all(b["hidden_after"] >= 8 for b in report["blocks"])
    assert model(mnist1d.x_eval[:4]).shape == (4, 10)


def test_transformer_ffn_tokens_are_samples():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(64, 40)
    with torch.no_grad():  # 6 constant hidden units: removable exactly
        model.ffn_in.weight[:6] = 0
        model.ffn_in.bias[:6] = 0.3
    ref = model(x)
    report = variance_prune(model, _batches(x, 16), 6 / 48)
    assert report["calibration_samples"] == 64 * 5  # every token counts
    assert model.ffn_in.out_features == 42 and model.ffn_out.in_features == 42
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    variance_prune(model, _batches(x, 16), 0.5)
    assert model.ffn_in.out_features == 21


def test_named_blocks_and_their_errors(trained_cnn, mnist1d):
    model = copy.deepcopy(trained_cnn)
    variance_prune(model, _batches(mnist1d.x[:500]), 0.25, blocks=[MLPBlock("head.0", "head.2")])
    assert model.head[0].out_features == 96
    with pytest.raises(ValueError, match="not nn.Linear"):
        variance_prune(copy.deepcopy(trained_cnn), [], 0.25, blocks=[MLPBlock("features.0", "head.2")])
    with pytest.raises(ValueError, match="no module named"):
        variance_prune(copy.deepcopy(trained_cnn), [], 0.25, blocks=[MLPBlock("head.9", "head.2")])
    with pytest.raises(ValueError, match="hidden widths differ"):
        variance_prune(copy.deepcopy(trained_cnn), [], 0.25, blocks=[MLPBlock("head.0", "head.0")])
    with pytest.raises(ValueError, match="allowed: variance, output_variance, pre_activation_variance, magnitude"):
        variance_prune(copy.deepcopy(trained_cnn), [], 0.25, statistic="l1")


def test_model_without_blocks_is_an_error():
    from compress.errors import InputError

    model = nn.Sequential(nn.Linear(40, 10))
    with pytest.raises(InputError, match="no Linear -> activation -> Linear block"):  # exit 2: bad input
        variance_prune(model, [torch.randn(4, 40)], 0.5)


@pytest.mark.slow  # importing transformers takes seconds
def test_hf_bert_ffn_found_by_hooks():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (8, 6))
    blocks = find_mlp_blocks(model, ids)
    assert [(b.first, b.second) for b in blocks] == [
        (f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense") for i in range(2)
    ]
    variance_prune(model, [ids], 0.5, example_input=ids)
    widths = [model.encoder.layer[i].intermediate.dense.out_features for i in range(2)]
    assert sum(widths) == 64


def test_block_scope_removes_the_same_fraction_everywhere(trained_mlp, mnist1d):
    model = copy.deepcopy(trained_mlp)
    report = variance_prune(model, _batches(mnist1d.x[:1000]), 0.5, scope="block")
    assert [b["hidden_after"] for b in report["blocks"]] == [128, 128]
    with pytest.raises(ValueError, match="allowed: global, block"):
        variance_prune(copy.deepcopy(trained_mlp), _batches(mnist1d.x[:500]), 0.5, scope="layer")
