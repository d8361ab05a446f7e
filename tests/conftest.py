"""Shared fixtures: small seeded models trained on real (small) data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist1d():
    """MNIST-1D as tensors (``compress.testing.Dataset``: x, y, x_eval, y_eval, bundle())."""
    from compress.testing import builtin_dataset

    return builtin_dataset("mnist1d")


@pytest.fixture(scope="session")
def teacher():
    """The shipped MNIST-1D CNN (94.9% test accuracy), frozen, eval mode."""
    from compress.testing import load_teacher

    return load_teacher()


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (tiny models train faster so on shared cores)."""
    from compress.testing import one_thread as single

    with single():
        yield


@pytest.fixture(scope="session")
def digits_mlp_path(tmp_path_factory) -> Path:
    """A digits MLP (64-32-10) trained for a few epochs: ~95% test accuracy in ~1 s."""
    from compress.data import builtin
    from compress.train import TrainConfig, fit
    from compress.zoo import digits_mlp

    torch.manual_seed(0)
    model = digits_mlp(hidden=(32,))
    x, y = (torch.as_tensor(a) for a in builtin("digits", "train"))
    fit(model, x, y, TrainConfig(epochs=15, lr=3e-3, batch_size=64))
    path = tmp_path_factory.mktemp("models") / "digits_mlp.pt"
    torch.save(model.state_dict(), path)
    return path


DIGITS_RECIPE = """\
version: 1
model:
  factory: compress.zoo:digits_mlp
  kwargs: {{hidden: [32]}}
  input_shape: [1, 64]
data:
  train: {{source: digits, split: train}}
  eval: {{source: digits, split: test}}
stages:
{stages}
gates:
{gates}
"""


@pytest.fixture
def write_recipe(tmp_path):
    """Write a digits recipe with the given stages/gates YAML; return its path."""

    def write(
        stages: str = "  - export: {latency_runs: 5, exporter: legacy}", gates: str = "  {}", text: str | None = None
    ) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(text if text is not None else DIGITS_RECIPE.format(stages=stages, gates=gates))
        return path

    return write


@pytest.fixture
def cli(tmp_path):
    """Invoke the CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from compress.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return invoke
