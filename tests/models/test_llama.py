"""The Llama-style decoder wrapper: next-token logits at the last real token, padding-exact,
exported with input_ids/attention_mask (dynamic axes) and matched by onnxruntime.

Needs the ``transformers`` extra (skipped without it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

VOCAB = 512


@pytest.fixture(scope="module")
def decoder():
    from compress.models.llama import llama

    return llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)


def _batch(lengths: list[int], width: int = 12) -> torch.Tensor:
    """Right-padded ids on masks: one sample per length."""
    from compress.models.llama import random_tokens

    x = torch.as_tensor(random_tokens("test", len(lengths), width, VOCAB))
    for i, n in enumerate(lengths):
        x[i, :, n:] = 0
    return x


def test_config_is_tied_and_seeded(decoder):
    from compress.models.llama import llama

    lm = decoder.lm
    assert lm.config.tie_word_embeddings
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # one tensor, counted once
    again = llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    for (name, a), (_, b) in zip(decoder.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_last_token_logits_ignore_padding(decoder):
    x = _batch([12, 7, 3])
    with torch.no_grad():
        out = decoder(x)
        assert out.shape == (3, VOCAB)
        for i, n in enumerate([12, 7, 3]):
            alone = decoder(x[i : i + 1, :, :n])
            full = decoder.lm(input_ids=x[i : i + 1, 0, :n]).logits[:, -1]  # the plain causal LM
            torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alone, full, atol=1e-5, rtol=1e-4)
    assert decoder.token_mask(x).sum(1).tolist() == [12, 7, 3]


def test_token_windows_are_full_windows(tmp_path):
    from compress.models.llama import token_windows

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    x = token_windows("calibration", str(text), length=16, stride=8)
    assert x.dtype == np.int64 and x.shape[1:] == (2, 16) and len(x) >= 10
    assert (x[:, 1] == 1).all()
    np.testing.assert_array_equal(x[0, 0, 8:], x[1, 0, :8])  # stride 8: windows overlap by half
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows("calibration", str(text), length=10_000)


@pytest.mark.slow
def test_exports_with_named_inputs_and_matches_onnxruntime(decoder, tmp_path):
    from compress.export.onnx_export import export_onnx
    from compress.runtime import ort_predict, ort_session

    sig = decoder.onnx_signature()
    x = _batch([12, 9, 5, 1])
    export_onnx(decoder, x[:2], tmp_path / "decoder.onnx", signature=sig)
    session = ort_session(tmp_path / "decoder.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    got = ort_predict(session, x.numpy(), feeds=sig.feeds)
    with torch.no_grad():
        want = decoder(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    assert (got.argmax(1) == want.argmax(1)).all()
    # another sequence length than the export's example: the axis is dynamic
    short = _batch([4, 2], width=4)
    with torch.no_grad():
        np.testing.assert_allclose(
            ort_predict(session, short.numpy(), feeds=sig.feeds), decoder(short).numpy(), atol=1e-4
        )


@pytest.mark.slow
def test_bfloat16_checkpoint_quantizes_and_exports_in_float32(tmp_path):
    """A bf16 checkpoint's quantized weights cannot hold ``code × scale`` exactly: the export
    computes in float32 with the exact dequantized values (its ONNX parity holds against that
    model), and the stage state keeps the checkpoint's dtype."""
    import json

    import compress
    from compress.models.llama import llama
    from compress.recipe import load_recipe

    kwargs = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    kwargs["vocab_size"] = VOCAB
    model = llama(**kwargs)
    torch.save({k: v.bfloat16() for k, v in model.state_dict().items()}, tmp_path / "model.pt")
    tokens = {"fn": "compress.models.llama:random_tokens", "source": "callable"}
    recipe = {
        "version": 1,
        "name": "bf16",
        "model": {
            "factory": "compress.models.llama:llama",
            "kwargs": kwargs,
            "input_shape": [1, 2, 16],
            "input_dtype": "int64",
        },
        "data": {
            "calibration": {**tokens, "kwargs": {"samples": 16, "length": 16, "vocab_size": VOCAB}},
            "eval": {**tokens, "kwargs": {"samples": 8, "length": 16, "vocab_size": VOCAB}},
        },
        "stages": [
            {"quantize": {"method": "gpfq", "bits": 4, "scale_factor": 1.16}},
            {"export": {"min_agreement": 0.0, "compare_float": False, "latency_runs": 2}},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    result = compress.run(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "model.pt", tmp_path / "out")
    assert result.passed, result.failures
    export = next(r for r in result.report["stages"] if r["stage"] == "export")
    # exact kernels: elementwise parity with the float32 model holding the exact codes' values
    assert export["metrics"]["ort_within_tolerance"] == 1.0
    # the export computed in float32 and left the state as it was: bf16, the same weights
    stages = tmp_path / "out" / "stages"
    quantized = torch.load(next(stages.glob("*-quantize")) / "model.pt", weights_only=True)
    exported = torch.load(next(stages.glob("*-export")) / "model.pt", weights_only=True)
    name = "lm.model.layers.0.mlp.down_proj.weight"
    assert exported[name].dtype == torch.bfloat16
    assert all(torch.equal(quantized[k], exported[k]) for k in quantized)
