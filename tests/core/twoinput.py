"""A tiny model whose ONNX form has two named inputs (test helper for named-input bundles)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.onnx_signature import OnnxSignature


class _Named(nn.Module):
    def __init__(self, model: TwoInput):
        super().__init__()
        self.model = model

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.model(torch.stack([a, b], 1))


class TwoInput(nn.Module):
    """Pipeline input (batch, 2, 8): two signals, exported as inputs ``a`` and ``b``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))

    def onnx_signature(self) -> OnnxSignature:
        return OnnxSignature(
            module=_Named(self),
            input_names=["a", "b"],
            dynamic_axes={"a": {0: "batch"}, "b": {0: "batch"}},
            split=lambda x: (x[:, 0], x[:, 1]),
        )


def two_input() -> nn.Module:
    torch.manual_seed(0)
    return TwoInput()


def data(split: str):
    rng = np.random.default_rng(0 if split == "train" else 1)
    x = rng.standard_normal((64, 2, 8)).astype(np.float32)
    return x, rng.integers(0, 4, 64)
