"""GPFQ block by block: the streaming path gives the whole-model path's codes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.quantize.gpfq import AUTO_SCALE_FACTORS, RTN_GRID, LayerPlan, find_block_chain, gpfq_quantize_model
from compress.quantize.stage import weight_targets

transformers = pytest.importorskip("transformers")


def _plans(model: nn.Module, bits: int = 4, masks: bool = False) -> dict[str, LayerPlan]:
    g = torch.Generator().manual_seed(3)
    plans = {}
    for t in weight_targets(model).values():
        w = model.get_submodule(t.layer).get_parameter(t.attr)
        mask = torch.rand(w.shape, generator=g) > 0.3 if masks else None
        plans[t.layer if t.attr == "weight" else f"{t.layer}.{t.attr}"] = LayerPlan(bits, mask=mask)
    return plans


def _both_paths(model: nn.Module, x: torch.Tensor, plans: dict, **kw):
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    qa, ra = gpfq_quantize_model(a, x, plans, **kw)
    qb, rb = gpfq_quantize_model(b, x, plans, streaming=False, **kw)
    return (a, qa, ra), (b, qb, rb)


def _assert_same(stream, whole):
    (a, qa, ra), (b, qb, rb) = stream, whole
    assert list(ra) == list(rb)
    for k in qa:
        assert torch.equal(qa[k].codes, qb[k].codes), k
        assert torch.equal(qa[k].scale, qb[k].scale), k
    for k in ra:
        assert ra[k]["output_rel_error"] == pytest.approx(rb[k]["output_rel_error"], rel=1e-9, abs=1e-12)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n  # biases too (bias correction)


def _tiny_bert():
    from compress.models.minilm import MiniLMEmbedder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = MiniLMEmbedder(transformers.BertModel(cfg)).eval()
    ids = torch.randint(1, 64, (12, 12))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0  # padded sentences: their padding rows stay out of the statistics
    return model, torch.stack([ids, mask], 1)


@pytest.mark.slow
def test_bert_chain_found_and_streaming_codes_equal_whole_model():
    """Auto C with hold-out, bias correction, pruning masks, dynamic activations, q/k/v sharing
    one Gram, the pooler after the chain: every code and every parameter bit-identical."""
    model, x = _tiny_bert()
    chain = find_block_chain(model, x[:2])
    assert chain is not None and chain.block_names == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    plans = _plans(model, masks=True)
    assert "bert.pooler.dense" in plans  # a weight after the chain
    linear = [k for k in plans if isinstance(model.get_submodule(k), nn.Linear)]
    spec = {"mode": "dynamic", "bits": 8, "layers": {f"{k}.weight": {} for k in linear}}
    stream, whole = _both_paths(
        model,
        x,
        plans,
        batch_size=5,
        scale_factor=(*AUTO_SCALE_FACTORS, RTN_GRID),
        auto_holdout=0.25,
        bias_correction=True,
        activation_spec=spec,
    )
    _assert_same(stream, whole)
    # the pruned weights stay pruned
    for k, plan in plans.items():
        assert (stream[1][f"{k}.weight"].codes[~plan.mask] == 0).all()


def test_llama_tied_embeddings_streaming_codes_equal_whole_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()  # use_cache on: the replay drops the KV cache
    x = torch.randint(0, 64, (8, 10))
    assert find_block_chain(model, x[:2]).prefix == "model.layers"
    plans = _plans(model)
    assert "lm_head" in plans  # tied to the embedding: after the chain
    _assert_same(*_both_paths(model, x, plans, batch_size=3))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, scale):
        return h + scale * self.fc2(torch.relu(self.fc1(self.norm(h))))


class _Stack(nn.Module):
    """A weight before the chain, blocks fed a side input (keyword), a head after (with
    ``deep_head``, two weights after: the float input of the second needs the first's float
    weight, the last one's own weight is never needed by the float network)."""

    def __init__(self, d=8, deep_head=False):
        super().__init__()
        self.proj = nn.Linear(6, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(3))
        self.head = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 3)) if deep_head else nn.Linear(d, 3)

    def forward(self, x):
        h, scale = self.proj(x), x[..., :1].sigmoid()
        for block in self.blocks:
            h = block(h, scale=scale)
        return self.head(h)


@pytest.mark.parametrize("deep_head", [False, True])
def test_weights_before_the_chain_and_side_inputs(deep_head):
    torch.manual_seed(0)
    model = _Stack(deep_head=deep_head).eval()
    x = torch.randn(20, 5, 6)
    assert find_block_chain(model, x[:2]).prefix == "blocks"
    _assert_same(*_both_paths(model, x, _plans(model, bits=3), batch_size=6, bias_correction=True))


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3)),
    ],
)
def test_no_chain_in_plain_layer_stacks(model):
    assert (
        find_block_chain(model, torch.randn(2, 4, 9) if isinstance(model[0], nn.Conv1d) else torch.randn(2, 4)) is None
    )


def test_chain_that_does_not_replay_is_refused():
    """Blocks that read state beside their input (here a counter) do not replay: no chain."""

    class Counting(nn.Module):
        calls = 0

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, h):
            Counting.calls += 1
            return self.fc(h) + Counting.calls

    model = nn.Sequential(Counting(), Counting())
    assert find_block_chain(model, torch.randn(2, 4)) is None


@pytest.mark.slow
def test_bf16_model_keeps_its_dtype_and_close_codes():
    model, x = _tiny_bert()
    plans = _plans(model)
    ref, _ = gpfq_quantize_model(copy.deepcopy(model), x, plans, batch_size=6)
    half = copy.deepcopy(model).to(torch.bfloat16)
    quant, report = gpfq_quantize_model(half, x, plans, batch_size=6)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    # the bf16 network's activations differ from fp32's by bf16 rounding: most codes agree
    agree = sum((quant[k].codes == ref[k].codes).float().mean().item() for k in ref) / len(ref)
    assert agree > 0.8
    assert all(r["output_rel_error"] < 0.2 for r in report.values())
