"""Small models of the shapes users bring (issue 12), for the architecture-coverage tests.

Every factory takes keyword arguments only, so a recipe names it as
``model: {factory: "tests.arch.zoo:<name>"}``. Inputs are flat, as the built-in data
sources give them: ``(batch, 64)`` scikit-learn digits, ``(batch, 40)`` MNIST-1D, or
``(batch, 8)`` int64 token ids (``token_data``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ConvBN1d(nn.Module):
    """MNIST-1D: Conv1d + BatchNorm1d + ReLU twice (bias-free convs, as usual before BN)."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * 20, classes)

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNetBN(nn.Module):
    """Digits (8x8): stem conv + BN, one identity block, one strided block with a 1x1 downsample."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        h = self.block2(self.block1(self.stem(x.reshape(-1, 1, 8, 8))))
        return self.head(h.mean((2, 3)))


class DepthwiseSeparable(nn.Module):
    """Digits: a stem, then depthwise 3x3 (groups = channels) + BN + ReLU, pointwise 1x1 + BN + ReLU, twice."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(2):
            layers += [
                nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).mean((2, 3)))


class Recurrent(nn.Module):
    """Digits as a sequence of 8 rows of 8 pixels: GRU or LSTM, last hidden state -> Linear.
    ``bidirectional``: ONNX holds both directions' weights in one ``W``/``R`` per layer."""

    def __init__(
        self, cell: str = "gru", hidden: int = 32, classes: int = 10, layers: int = 1, bidirectional: bool = False
    ):
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cell]
        self.rnn = rnn(8, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(-1, 8, 8))
        return self.head(out[:, -1])


def gru(**kw) -> nn.Module:
    return Recurrent("gru", **kw)


def lstm(**kw) -> nn.Module:
    return Recurrent("lstm", **kw)


def bilstm(**kw) -> nn.Module:
    return Recurrent("lstm", hidden=16, layers=2, bidirectional=True, **kw)


def bigru(**kw) -> nn.Module:
    return Recurrent("gru", hidden=16, layers=2, bidirectional=True, **kw)


class TiedEmbedding(nn.Module):
    """A tiny language-model head: embedding -> mean -> Linear + tanh -> output projection
    whose weight IS the embedding matrix (one Parameter used by two modules)."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids).mean(1))))


class Transformer(nn.Module):
    """Digits as 8 tokens of 8 pixels: Linear embedding, one TransformerEncoderLayer, mean pool, Linear."""

    def __init__(self, dim: int = 32, heads: int = 2, ffn: int = 64, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.reshape(-1, 8, 8))).mean(1))


class Untraceable(nn.Module):
    """Digits MLP with data-dependent control flow (torch.fx cannot trace it) and a
    residual: ``res_in``'s activation also feeds the add, so variance pruning must leave
    that block alone; ``fc1 -> relu -> fc2`` is an ordinary prunable block."""

    def __init__(self, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.res_in = nn.Linear(hidden, hidden)
        self.res_out = nn.Linear(hidden, hidden)
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.fc2(self.act(self.fc1(x)))
        if float(x.abs().sum()) > 0:  # data-dependent: fx cannot trace it
            t = self.act(self.res_in(h))
            h = self.res_out(t) + t
        return self.head(h)


class WeightNormMLP(nn.Module):
    """Digits MLP whose layers are weight-normalised (``torch.nn.utils.parametrizations``):
    each weight is computed from a direction and a norm, as in many audio models."""

    def __init__(self, hidden: int = 32, classes: int = 10):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.net = nn.Sequential(
            wn(nn.Linear(64, hidden)),
            nn.ReLU(),
            wn(nn.Linear(hidden, hidden)),
            nn.ReLU(),
            wn(nn.Linear(hidden, classes)),
        )

    def forward(self, x):
        return self.net(x)


def conv_bn1d(**kw) -> nn.Module:
    return ConvBN1d(**kw)


def resnet_bn(**kw) -> nn.Module:
    return ResNetBN(**kw)


def depthwise(**kw) -> nn.Module:
    return DepthwiseSeparable(**kw)


def tied(**kw) -> nn.Module:
    return TiedEmbedding(**kw)


def transformer(**kw) -> nn.Module:
    return Transformer(**kw)


def untraceable(**kw) -> nn.Module:
    return Untraceable(**kw)


def weightnorm(**kw) -> nn.Module:
    return WeightNormMLP(**kw)


FACTORIES = {
    "conv_bn1d": ConvBN1d,
    "resnet_bn": ResNetBN,
    "depthwise": DepthwiseSeparable,
    "gru": gru,
    "lstm": lstm,
    "bilstm": bilstm,
    "bigru": bigru,
    "tied": TiedEmbedding,
    "transformer": Transformer,
    "untraceable": Untraceable,
    "weightnorm": WeightNormMLP,
}

# The models of the full method matrix (test_matrix). The later ones (bidirectional
# recurrent layers, weight norm) are covered by targeted tests: the matrix already runs
# every method through GRU/LSTM and MLPs, and three more models would add ~10 minutes.
MATRIX = ["conv_bn1d", "resnet_bn", "depthwise", "gru", "lstm", "tied", "transformer", "untraceable"]

# The data source of each model: "digits", "mnist1d" or "tokens".
SOURCES = {"conv_bn1d": "mnist1d", "tied": "tokens"}


def token_data(split: str, n: int = 1200, vocab: int = 32, length: int = 8):
    """Synthetic token task: the label is the token repeated most in the sequence (4 of 8)."""
    rng = np.random.default_rng({"train": 0, "test": 1, "eval": 1}.get(split, 2))
    x = rng.integers(0, vocab, size=(n, length))
    y = rng.integers(0, vocab, size=n)
    pos = np.argsort(rng.random((n, length)), axis=1)[:, :4]
    np.put_along_axis(x, pos, y[:, None], axis=1)
    return x.astype(np.int64), y.astype(np.int64)
