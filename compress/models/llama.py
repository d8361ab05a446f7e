"""A Llama-style decoder (transformers ``LlamaForCausalLM``) wrapped for the pipeline.

Random-initialised from a config (no weights ship here, nothing is downloaded): the scale
benchmark (``benchmarks/scale.py``) uses it for a 1.1 B-parameter decoder with tied
input/output embeddings. Needs the ``transformers`` extra.

As for ``compress.models.minilm``, a sample is ONE int64 tensor ``(2, L)``: token ids
stacked on the attention mask (right padding). ``LlamaDecoder`` returns the **next-token
logits at the last real token** of each sequence, ``(batch, vocab)``: a real output of a
language model whose top-1 is the predicted next token, so the pipeline's top-1 agreement
and per-sample cosine are meaningful fidelity metrics (next-token agreement with the float
model), and only one row of the ``vocab × hidden`` output projection is computed per
sequence. ``onnx_signature()`` exports it with ``input_ids`` and ``attention_mask``
(dynamic batch and sequence axes).

``token_windows`` makes calibration data: offline text, tokenized with the BERT WordPiece
tokenizer of the installed MiniLM package (ids < 30522 fit a 32000-token vocabulary; a
random-init model has no tokenizer of its own), concatenated and cut into full windows of
``length`` tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.models.text import TokenModel

log = logging.getLogger(__name__)

# TinyLlama-1.1B's shape: 1.10 B parameters with tied embeddings.
LLAMA_1B: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}


class LlamaDecoder(TokenModel):
    """``LlamaForCausalLM`` → next-token logits at each sequence's last real token.

    ``forward(x)`` takes the pipeline's ``(batch, 2, L)`` int64 ids-on-mask; ``logits(input_ids,
    attention_mask)`` the usual two. Sequences are right-padded: the causal mask keeps the
    padding after the last real token from reaching it.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm: Any = lm  # a transformers LlamaForCausalLM (typed loosely: transformers is optional)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = (attention_mask.sum(1) - 1).clamp_min(0)  # index of the last real token
        index = last.view(-1, 1, 1).expand(-1, 1, states.shape[-1])
        return self.lm.lm_head(torch.gather(states, 1, index).squeeze(1))

    from_ids = logits


def llama(
    hidden_size: int = 64,
    intermediate_size: int = 176,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 32000,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> LlamaDecoder:
    """A random-initialised Llama decoder (defaults: a tiny one for tests; ``LLAMA_1B`` for 1.1 B).

    Args:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, vocab_size, max_position_embeddings: the ``LlamaConfig`` fields.
        tie_word_embeddings: share the input embedding with the output projection.
        seed: the initialisation seed (the same seed gives the same weights).

    Raises:
        ImportError: ``transformers`` is not installed.
    """
    from compress.models.minilm import _transformers

    transformers = _transformers()
    config = transformers.LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    # eager attention: plain ops that export to any opset and run on every onnxruntime
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = transformers.LlamaForCausalLM(config)
    return LlamaDecoder(lm).eval()


def llama_1b(seed: int = 0) -> LlamaDecoder:
    """The 1.1 B configuration (``LLAMA_1B``, tied embeddings), random-initialised."""
    return llama(**LLAMA_1B, tie_word_embeddings=True, seed=seed)


def token_windows(
    split: str, path: str, length: int = 128, stride: int | None = None, samples: int | None = None
) -> np.ndarray:
    """Windows of ``length`` tokens cut from a text file: int64 ``(n, 2, length)`` ids on masks.

    A data callable for recipes (``source: callable``, ``fn: compress.models.llama:token_windows``).
    Every window is full (mask all ones): a calibration sequence of 128 tokens is 128 real
    tokens, not a short sentence and padding.

    Args:
        split: the recipe's split name (unused: the file decides).
        path: a UTF-8 text file.
        length: tokens per window.
        stride: tokens between window starts (default ``length``: disjoint windows); a smaller
            stride gives more, overlapping windows from a short text.
        samples: keep at most this many windows.

    Raises:
        ValueError: the text has fewer than ``length`` tokens, or a bad length/stride.
    """
    from compress.models.minilm import tokenizer

    stride = length if stride is None else stride
    if length < 2 or stride < 1:
        raise ValueError(f"length must be >= 2 and stride >= 1, got length={length}, stride={stride}")
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [i for row in tokenizer()(lines, add_special_tokens=False)["input_ids"] for i in row]
    if len(ids) < length:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one window of {length}")
    starts = range(0, len(ids) - length + 1, stride)
    windows = np.asarray([ids[s : s + length] for s in starts], dtype=np.int64)
    if samples is not None:
        windows = windows[:samples]
    log.info("%s: %d tokens -> %d windows of %d (stride %d)", path, len(ids), len(windows), length, stride)
    return np.stack([windows, np.ones_like(windows)], axis=1)


def random_tokens(
    split: str, samples: int = 64, length: int = 128, vocab_size: int = 32000, seed: int = 0
) -> np.ndarray:
    """Uniformly random token windows, int64 ``(samples, 2, length)`` (mask all ones).

    The fallback calibration data for a random-initialised model (whose weights carry no
    language): a data callable like ``token_windows``. ``split`` only varies the seed, so
    calibration and eval splits differ.
    """
    rng = np.random.default_rng([seed, sum(split.encode())])
    ids = rng.integers(0, vocab_size, size=(samples, length), dtype=np.int64)
    return np.stack([ids, np.ones_like(ids)], axis=1)
