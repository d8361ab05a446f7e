"""Shared fixtures of the prune tests: MNIST-1D and small models trained on it (seeded)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from compress.data import DataBundle, Split, builtin
from compress.state import ModelState, StageContext
from compress.train import TrainConfig, fit
from compress.zoo import mnist1d_cnn, mnist1d_mlp


@contextlib.contextmanager
def one_thread():
    """These models are too small to gain from intra-op threads, and on shared cores the
    threads' spin-waiting can slow training tenfold; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _single_threaded():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def mnist1d() -> dict[str, torch.Tensor]:
    x, y = builtin("mnist1d", "train")
    xt, yt = builtin("mnist1d", "test")
    return {"x": torch.as_tensor(x), "y": torch.as_tensor(y), "xt": torch.as_tensor(xt), "yt": torch.as_tensor(yt)}


@pytest.fixture(scope="session")
def trained_mlp(mnist1d) -> torch.nn.Module:
    """mnist1d_mlp (40-256-256-10), 10 epochs: about 61% test accuracy, ~2 s."""
    torch.manual_seed(0)
    model = mnist1d_mlp()
    with one_thread():
        fit(model, mnist1d["x"], mnist1d["y"], TrainConfig(epochs=10, lr=3e-3))
    return model.eval()


@pytest.fixture(scope="session")
def trained_cnn(mnist1d) -> torch.nn.Module:
    """mnist1d_cnn, 6 epochs."""
    torch.manual_seed(0)
    model = mnist1d_cnn()
    with one_thread():
        fit(model, mnist1d["x"], mnist1d["y"], TrainConfig(epochs=6, lr=3e-3))
    return model.eval()


@pytest.fixture
def make_ctx(mnist1d, tmp_path: Path):
    """``make_ctx(reference, out_dir=None, calibration=None)`` -> StageContext on MNIST-1D."""

    def make(reference: torch.nn.Module, out_dir: Path | None = None, calibration: int | None = None, seed: int = 0):
        splits = {
            "train": Split("train", mnist1d["x"], mnist1d["y"], 128, 0),
            "eval": Split("eval", mnist1d["xt"], mnist1d["yt"], 256, 0),
        }
        if calibration is not None:
            splits["calibration"] = Split("calibration", mnist1d["x"][:calibration], None, 256, 0)
        ref = copy.deepcopy(reference).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return StageContext(
            data=DataBundle(splits), out_dir=out_dir or tmp_path, device=torch.device("cpu"), reference=ref, seed=seed
        )

    return make


def state_of(model: torch.nn.Module) -> ModelState:
    """A fresh ModelState around a copy of ``model`` (session models stay untouched)."""
    return ModelState(module=copy.deepcopy(model), input_shape=(1, 40))


@pytest.fixture
def fresh_state():
    return state_of
