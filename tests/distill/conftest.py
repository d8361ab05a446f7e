"""Fixtures of the distill tests (MNIST-1D, the teacher and one_thread come from tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


@pytest.fixture
def run_distill(mnist1d, teacher, one_thread):
    """``run_distill(config_dict, model=teacher, train_samples=None) -> (state, ctx, model_entering)``."""
    from pydantic import TypeAdapter

    from compress.registry import stage_config
    from compress.state import ModelState, StageContext

    DistillConfig = stage_config("distill")
    from compress.distill.stage import apply

    def run(config: dict, model: nn.Module | None = None, train_samples: int | None = None):
        entering = copy.deepcopy(model if model is not None else teacher)
        cfg = TypeAdapter(DistillConfig).validate_python(config)
        ctx = StageContext(
            mnist1d.bundle(train_samples), out_dir=None, device=torch.device("cpu"), reference=teacher, seed=0
        )
        state = apply(ModelState(entering, (1, 40)), cfg, ctx)
        return state, ctx, entering

    return run
