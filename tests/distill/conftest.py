"""Shared fixtures of the distill tests: MNIST-1D and the shipped CNN teacher (no training)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

TEACHER = Path(__file__).resolve().parents[2] / "recipes" / "models" / "mnist1d_cnn.pt"


@dataclass
class MNIST1D:
    x: torch.Tensor
    y: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor

    def bundle(self, train_samples: int | None = None):
        from compress.data import DataBundle, Split

        n = train_samples or len(self.x)
        return DataBundle(
            {
                "train": Split("train", self.x[:n], self.y[:n], 128, 0),
                "eval": Split("eval", self.x_eval, self.y_eval, 256, 0),
            }
        )


@pytest.fixture(scope="session")
def mnist1d() -> MNIST1D:
    from compress.data import builtin

    x, y = (torch.as_tensor(a) for a in builtin("mnist1d", "train"))
    xe, ye = (torch.as_tensor(a) for a in builtin("mnist1d", "test"))
    return MNIST1D(x, y, xe, ye)


@pytest.fixture(scope="session")
def teacher() -> nn.Module:
    """The shipped MNIST-1D CNN (94.9% test accuracy), frozen, eval mode."""
    from compress.zoo import mnist1d_cnn

    model = mnist1d_cnn()
    model.load_state_dict(torch.load(TEACHER, map_location="cpu", weights_only=True))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_distill(mnist1d, teacher, one_thread):
    """``run_distill(config_dict, model=teacher, train_samples=None) -> (state, ctx, model_entering)``."""
    from pydantic import TypeAdapter

    from compress.state import ModelState, StageContext
    from compress.registry import stage_config

    DistillConfig = stage_config("distill")
    from compress.distill.stage import apply

    def run(config: dict, model: nn.Module | None = None, train_samples: int | None = None):
        entering = copy.deepcopy(model if model is not None else teacher)
        cfg = TypeAdapter(DistillConfig).validate_python(config)
        ctx = StageContext(mnist1d.bundle(train_samples), out_dir=None, device=torch.device("cpu"), reference=teacher, seed=0)
        state = apply(ModelState(entering, (1, 40)), cfg, ctx)
        return state, ctx, entering

    return run
