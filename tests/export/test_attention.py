"""Attention subgraphs fused into onnxruntime's MultiHeadAttention (compress.export.attention):
which subgraphs are fused, that the fused graph computes what the exported one did, and what
is left alone."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compress.export.attention import fuse_attention
from compress.export.onnx_export import export_onnx


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _tiny_bert(impl: str):
    pytest.importorskip("transformers")
    from compress.models.minilm import bert

    return bert(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        seed=1,
        attn_implementation=impl,
    )


def _token_batch(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch):  # padding of different lengths
        mask[i, max(1, length - 2 * i) :] = 0
    return torch.stack([ids, mask], 1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_attention_fuses_into_one_kernel_per_layer_with_the_same_outputs(tmp_path, impl):
    """Both of torch's forms (the eager softmax(q·kᵀ/√d + mask)·v, and scaled_dot_product_attention's
    decomposition with √scale on q and k, a swapped-axes kᵀ and a NaN guard) become one
    MultiHeadAttention per layer; the outputs match the unfused graph at other batch sizes,
    other sequence lengths and with padding."""
    from compress.onnx_signature import onnx_signature_of

    model = _tiny_bert(impl)
    x = _token_batch(2, 10)
    exported = export_onnx(model, x, tmp_path / "m.onnx", signature=onnx_signature_of(model))
    fused, count = fuse_attention(_copy(exported))
    ops = _ops(fused)
    assert count == 2 and ops["MultiHeadAttention"] == 2
    assert ops["Softmax"] == 0 and ops["Transpose"] == 0 and ops["Reshape"] == 0 and ops["IsNaN"] == 0
    onnx.checker.check_model(fused, full_check=True)
    mha = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mha[0].attribute}
    assert attrs["num_heads"] == 4 and attrs["scale"] == pytest.approx(1 / math.sqrt(8), rel=1e-6)
    assert len(mha[0].input) == 6 and mha[0].input[5]  # the padding mask as attention_bias
    for batch, length in [(1, 7), (5, 13), (3, 10)]:
        xb = _token_batch(batch, length, seed=batch)
        feeds = {"input_ids": xb[:, 0].numpy(), "attention_mask": xb[:, 1].numpy()}
        want = _run(exported, feeds)
        np.testing.assert_allclose(_run(fused, feeds), want, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(want, model(xb).numpy(), atol=1e-5)


class _Attention(nn.Module):
    """A hand-written attention block (not transformers'): scale by division, no mask, and
    optionally the probabilities returned too."""

    def __init__(self, d=24, heads=3, with_probs=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads, self.with_probs = heads, with_probs

    def forward(self, x):
        b, s, d = x.shape
        h = self.heads

        def split(t):
            return t.reshape(b, s, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        out = self.o((probs @ v).transpose(1, 2).reshape(b, s, d))
        return (out, probs) if self.with_probs else out


def test_hand_written_attention_without_a_mask_fuses(tmp_path):
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 5, 24)
    exported = export_onnx(model, x, tmp_path / "a.onnx", dynamic_batch=False)
    fused, count = fuse_attention(_copy(exported))
    assert count == 1 and _ops(fused)["Softmax"] == 0
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    assert len(mha.input) == 3  # no mask input
    feeds = {exported.graph.input[0].name: x.numpy()}
    np.testing.assert_allclose(_run(fused, feeds), _run(exported, feeds), atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(_run(fused, feeds), model(x).numpy(), atol=1e-5)


def test_probabilities_read_elsewhere_and_plain_softmax_stay_as_exported(tmp_path):
    """A subgraph with an intermediate something else reads (here the attention
    probabilities, a graph output) is not fused; nor is a softmax that is not attention."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24)
    exported = export_onnx(_Attention(with_probs=True).eval(), x, tmp_path / "p.onnx", dynamic_batch=False)
    before = _copy(exported)
    fused, count = fuse_attention(exported)
    assert count == 0 and fused == before

    head = nn.Sequential(nn.Linear(8, 4), nn.Softmax(dim=-1)).eval()
    plain = export_onnx(head, torch.randn(3, 8), tmp_path / "s.onnx")
    before = _copy(plain)
    fused, count = fuse_attention(plain)
    assert count == 0 and fused == before


def test_export_stage_fuses_by_default_and_reports_it(tmp_path):
    """The export stage writes the fused graph and checks its parity with PyTorch;
    ``fuse_attention: false`` keeps torch's standard operators. The session it checks (and
    the bundle carries) switches off onnxruntime's SkipLayerNormalization fusion by default."""
    from compress.data import DataBundle, Split
    from compress.export.config import ExportConfig
    from compress.export.quantized import optimized_op_types
    from compress.export.stage import apply
    from compress.state import ModelState, StageContext

    model = _tiny_bert("eager")
    x = _token_batch(8, 9, seed=3)
    counts = {}
    for fuse in (True, False):
        out = tmp_path / str(fuse)
        out.mkdir()
        ctx = StageContext(
            DataBundle({"eval": Split("eval", x, None, 8, 0)}), out_dir=out, device=torch.device("cpu"), reference=model
        )
        state = ModelState(model, (1, 2, 9), example=x[:2])
        config = ExportConfig(fuse_attention=fuse, latency_runs=2, latency_warmup=0)
        if not fuse:
            config = config.model_copy(update={"ort_disabled_fusions": []})
        apply(state, config, ctx)
        written = onnx.load(str(out / "model.onnx"))
        counts[fuse] = (ctx.metrics["fused_attention"], _ops(written)["MultiHeadAttention"])
        disabled = ctx.outputs.runtime_session["disabled_optimizers"]
        assert disabled == (["SkipLayerNormFusion"] if fuse else [])
        runs = optimized_op_types(out / "model.onnx", disabled_optimizers=tuple(disabled))
        assert (runs["SkipLayerNormalization"] == 0) == fuse and runs["LayerNormalization"] >= (5 if fuse else 1)
        assert all(c["passed"] for c in ctx.checks), ctx.checks
        assert ctx.metrics["ort_max_abs_error"] < 1e-4
    assert counts == {True: (2, 2), False: (0, 0)}
