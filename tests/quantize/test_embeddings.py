"""Embedding-table quantization (``embedding_bits``): per-row scales, max vs MSE-chosen range."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.quantize.activations import quantize_embeddings


def _heavy_tailed_table(rows: int = 256, cols: int = 64) -> nn.Module:
    """Rows like a word-embedding table: mostly small values, a few large ones per row."""
    torch.manual_seed(0)
    emb = nn.Embedding(rows, cols)
    with torch.no_grad():
        emb.weight.copy_(torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.05)
    return nn.Sequential(emb)


def _row_errors(qt, w: torch.Tensor) -> torch.Tensor:
    return ((qt.dequantize() - w) ** 2).sum(1)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_is_never_worse_per_row_and_better_at_4_bits(bits):
    model = _heavy_tailed_table()
    w = model[0].weight.detach()
    by_max = quantize_embeddings(model, bits)["0.weight"]
    by_mse = quantize_embeddings(model, bits, scale_from="mse")["0.weight"]
    e_max, e_mse = _row_errors(by_max, w), _row_errors(by_mse, w)
    assert (e_mse <= e_max * (1 + 1e-6)).all()  # 1.0 (max) is one of the candidates
    qmax = 2 ** (bits - 1) - 1
    assert by_mse.codes.abs().max() <= qmax and by_mse.zero_point is None
    assert by_mse.scale.shape == (256, 1) and (by_mse.scale <= by_max.scale * (1 + 1e-6)).all()
    if bits == 4:  # heavy tails: clipping the few large entries pays at 4 bits (measured: 0.88)
        assert (e_mse / e_max).median() < 0.93, (e_mse / e_max).median()


def test_max_range_keeps_every_value_within_half_a_step():
    model = _heavy_tailed_table()
    w = model[0].weight.detach()
    qt = quantize_embeddings(model, 4)["0.weight"]
    assert ((qt.dequantize() - w).abs() <= qt.scale / 2 + 1e-7).all()


def test_unknown_range_is_refused():
    with pytest.raises(ValueError, match="scale_from"):
        quantize_embeddings(_heavy_tailed_table(), 4, scale_from="percentile")


def test_config_accepts_only_known_embedding_ranges():
    from pydantic import TypeAdapter, ValidationError

    from compress.registry import stage_config

    adapter = TypeAdapter(stage_config("quantize"))
    assert (
        adapter.validate_python({"method": "rtn", "embedding_bits": 4, "embedding_range": "mse"}).embedding_range
        == "mse"
    )
    with pytest.raises(ValidationError, match="embedding_range"):
        adapter.validate_python({"method": "rtn", "embedding_bits": 4, "embedding_range": "p99"})


class _TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(64, 16)
        self.pos = nn.Embedding(8, 16)
        self.proj = nn.Linear(16, 4)

    def forward(self, ids):
        return self.proj(self.tok(ids) + self.pos.weight[: ids.shape[1]]).mean(1)


def _stage(cfg: dict):
    from pydantic import TypeAdapter

    from compress.data import DataBundle, Split
    from compress.quantize.stage import apply
    from compress.registry import stage_config
    from compress.state import ModelState, StageContext

    torch.manual_seed(0)
    model = _TwoTables().eval()
    ids = torch.randint(0, 64, (32, 8))
    state = ModelState(model, (1, 8), example=ids[:2])
    ctx = StageContext(
        DataBundle({"calibration": Split("calibration", ids, None, 16, 0)}), None, torch.device("cpu"), model
    )
    return apply(state, TypeAdapter(stage_config("quantize")).validate_python(cfg), ctx), ctx


def test_layer_bits_glob_gives_a_table_its_own_width():
    state, ctx = _stage({"method": "rtn", "bits": 4, "embedding_bits": 4, "layer_bits": {"pos*": 8}})
    assert state.quant["tok.weight"].bits == 4 and state.quant["pos.weight"].bits == 8
    assert ctx.metrics["quantize"]["layers"]["pos"]["bits"] == 8
    w = state.module.pos.weight.detach()
    # the 8-bit table: within half a step of 1/127 of each row's max
    assert ((state.quant["pos.weight"].dequantize() - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-7).all()


def test_table_width_other_than_4_or_8_is_refused():
    with pytest.raises(ValueError, match="embedding tables take 4 or 8 bits"):
        _stage({"method": "rtn", "bits": 4, "embedding_bits": 4, "layer_bits": {"pos*": 6}})
