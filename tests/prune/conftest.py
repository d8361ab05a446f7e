"""Fixtures of the prune tests: small models trained on MNIST-1D (seeded), single-threaded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compress.state import ModelState
from compress.testing import make_context, one_thread
from compress.train import TrainConfig, fit
from compress.zoo import mnist1d_cnn, mnist1d_mlp


@pytest.fixture(scope="module", autouse=True)
def _single_threaded():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def trained_mlp(mnist1d) -> torch.nn.Module:
    """mnist1d_mlp (40-256-256-10), 10 epochs: about 61% test accuracy, ~2 s."""
    torch.manual_seed(0)
    model = mnist1d_mlp()
    with one_thread():
        fit(model, mnist1d.x, mnist1d.y, TrainConfig(epochs=10, lr=3e-3))
    return model.eval()


@pytest.fixture(scope="session")
def trained_cnn(mnist1d) -> torch.nn.Module:
    """mnist1d_cnn, 6 epochs."""
    torch.manual_seed(0)
    model = mnist1d_cnn()
    with one_thread():
        fit(model, mnist1d.x, mnist1d.y, TrainConfig(epochs=6, lr=3e-3))
    return model.eval()


@pytest.fixture
def make_ctx(mnist1d, tmp_path: Path):
    """``make_ctx(reference, out_dir=None, calibration=None)`` -> StageContext on MNIST-1D."""

    def make(reference: torch.nn.Module, out_dir: Path | None = None, calibration: int | None = None, seed: int = 0):
        return make_context(mnist1d.bundle(calibration=calibration), reference, out_dir or tmp_path, seed)

    return make


def state_of(model: torch.nn.Module) -> ModelState:
    """A fresh ModelState around a copy of ``model`` (session models stay untouched)."""
    return ModelState(module=copy.deepcopy(model), input_shape=(1, 40))


@pytest.fixture
def fresh_state():
    return state_of
