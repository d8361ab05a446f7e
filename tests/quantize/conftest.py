"""Small models trained once per session on real data (a few seconds each, seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

# name -> (factory kwargs, epochs): MNIST-1D MLP and CNN, digits MLP.
TRAINED = {
    "mnist1d_mlp": ({}, 10),
    "mnist1d_cnn": ({}, 15),
    "digits_mlp": ({"hidden": (128,)}, 15),
}


@dataclass
class Trained:
    name: str
    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    accuracy: float

    def bundle(self, calibration: int = 1024):
        from compress.data import DataBundle, Split

        return DataBundle(
            {
                "train": Split("train", self.x_train, self.y_train, 128, 0),
                "eval": Split("eval", self.x_eval, self.y_eval, 256, 0),
                "calibration": Split("calibration", self.x_train[:calibration], None, 256, 0),
            }
        )


def train_zoo_model(name: str) -> Trained:
    from compress import zoo
    from compress.testing import builtin_dataset
    from compress.testing import train_zoo_model as train

    kwargs, epochs = TRAINED[name]
    model, accuracy = train(name, epochs, **kwargs)
    data = builtin_dataset(zoo.ZOO[name][2])
    return Trained(name, model, data.x, data.y, data.x_eval, data.y_eval, accuracy)


@pytest.fixture(scope="session")
def trained_models() -> dict[str, Trained]:
    """Lazily trained models, shared by every quantize test in the session."""
    cache: dict[str, Trained] = {}

    class _Lazy(dict):
        def __missing__(self, key: str) -> Trained:
            cache[key] = train_zoo_model(key)
            self[key] = cache[key]
            return cache[key]

    return _Lazy()


@pytest.fixture(scope="session")
def run_stage():
    """``run_stage(trained, config, masks=None) -> (state, ctx)``: the quantize stage on a copy."""
    return _run_stage


def _run_stage(trained: Trained, config, masks: dict | None = None):
    """Apply the quantize stage to a copy of ``trained.model``; return (state, ctx)."""
    import copy

    from compress.state import ModelState, StageContext

    model = copy.deepcopy(trained.model)
    state = ModelState(model, (1, *trained.x_eval.shape[1:]), masks=dict(masks or {}))
    ctx = StageContext(trained.bundle(), out_dir=None, device=torch.device("cpu"), reference=trained.model, seed=0)
    from compress.quantize.stage import apply

    return apply(state, config, ctx), ctx
