"""Reference models that the examples and tests use.

Every factory takes keyword arguments only, so a recipe can name it
(``model: {factory: "compress.zoo:mnist1d_cnn"}``) and a stage can rebuild it.
Models take flat inputs (``(batch, 40)`` for MNIST-1D, ``(batch, 64)`` for digits) and
reshape inside, so data files stay simple 2-D arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> ReLU blocks then a classifier: the shape variance pruning works on."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN1d(nn.Module):
    """Three 1-D convolutions and an MLP head, for MNIST-1D (the paper's CNN, widened)."""

    def __init__(self, length: int = 40, channels: int = 32, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        flat = channels * ((length + 3) // 4)
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class CNN2d(nn.Module):
    """Two 2-D convolutions and an MLP head, for 8x8 digits."""

    def __init__(self, side: int = 8, channels: int = 16, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        flat = 2 * channels * ((side + 1) // 2) ** 2
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))


def mnist1d_mlp(hidden: tuple[int, ...] = (256, 256), classes: int = 10) -> nn.Module:
    return MLP(40, tuple(hidden), classes)


def mnist1d_cnn(channels: int = 32, hidden: int = 128, classes: int = 10) -> nn.Module:
    return CNN1d(40, channels, hidden, classes)


def digits_mlp(hidden: tuple[int, ...] = (128,), classes: int = 10) -> nn.Module:
    return MLP(64, tuple(hidden), classes)


def digits_cnn(channels: int = 16, hidden: int = 128, classes: int = 10) -> nn.Module:
    return CNN2d(8, channels, hidden, classes)


# name -> (factory, per-sample input shape, data source): used by the teacher script and tests.
ZOO: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], str]] = {
    "mnist1d_mlp": (mnist1d_mlp, (40,), "mnist1d"),
    "mnist1d_cnn": (mnist1d_cnn, (40,), "mnist1d"),
    "digits_mlp": (digits_mlp, (64,), "digits"),
    "digits_cnn": (digits_cnn, (64,), "digits"),
}
