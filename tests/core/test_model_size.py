"""compress.metrics.model_size: the one size accounting (tied tensors once, quantized packed)."""

from __future__ import annotations

import torch
from torch import nn

from compress.metrics import model_size
from compress.qtensor import CodebookTensor, UniformTensor


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight  # one Parameter, two modules
        self.norm = nn.BatchNorm1d(8)


def test_tied_counted_once_and_buffers_in_dense_bytes():
    m = Tied()
    size = model_size(m)
    assert size["parameters"] == 80 + 16  # embedding once + BN affine
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    assert size["dense_bytes"] == 4 * 96 + buffers == size["stored_bytes"]
    assert size["weight_bits"] == 32.0


def test_quantized_tensors_count_at_their_width():
    lin = nn.Linear(16, 4, bias=True)
    codes = torch.randint(-8, 8, (4, 16), dtype=torch.int8)
    uq = UniformTensor(codes=codes, bits=4, scale=torch.ones(4, 1))
    size = model_size(lin, {"weight": uq})
    assert size["stored_bytes"] == (64 * 4 + 4 * 32) // 8 + 4 * 4  # codes + scales, float bias
    assert size["weight_bits"] == round((64 * 4 + 4 * 32) / 68, 3)
    cq = CodebookTensor(codes=torch.zeros(4, 16, dtype=torch.uint8), bits=2, codebook=torch.zeros(1, 4))
    assert model_size(lin, {"weight": cq})["stored_bytes"] == (64 * 2 + 4 * 32) // 8 + 16
