"""Helpers for tests of the pipeline and of code that extends it: the offline data sets as
tensors, a stage context on them, seeded small models trained on real data.

Used by the project's own tests (tests/conftest.py turns them into fixtures) and meant for
a plugin's tests too: ``make_context(dataset.bundle(), reference=model)`` is all a method
needs to run outside the pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from compress.data import DataBundle
    from compress.state import StageContext

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "recipes" / "models" / "mnist1d_cnn.pt"


@dataclass(frozen=True)
class Dataset:
    """A built-in data set as tensors: train ``x``/``y`` and held-out ``x_eval``/``y_eval``."""

    x: torch.Tensor
    y: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor

    def bundle(self, train_samples: int | None = None, calibration: int | None = None) -> DataBundle:
        """Splits ``train`` (the first ``train_samples``), ``eval`` and, when asked for,
        an unlabelled ``calibration`` split of the first ``calibration`` train samples."""
        from compress.data import DataBundle, Split

        n = train_samples or len(self.x)
        splits = {
            "train": Split("train", self.x[:n], self.y[:n], 128, 0),
            "eval": Split("eval", self.x_eval, self.y_eval, 256, 0),
        }
        if calibration is not None:
            splits["calibration"] = Split("calibration", self.x[:calibration], None, 256, 0)
        return DataBundle(splits)


@functools.cache
def builtin_dataset(source: str) -> Dataset:
    """``mnist1d`` (generated locally) or ``digits`` (scikit-learn) as tensors, cached."""
    from compress.data import builtin

    x, y = (torch.as_tensor(a) for a in builtin(source, "train"))
    xe, ye = (torch.as_tensor(a) for a in builtin(source, "test"))
    return Dataset(x, y, xe, ye)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train faster on one intra-op thread than on two contended ones (the
    threads' spin-waiting can slow training tenfold on shared cores); restores the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def frozen(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode with gradients off (a stage's reference model)."""
    ref = copy.deepcopy(module).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def make_context(data: DataBundle, reference: nn.Module, out_dir: Path | None = None, seed: int = 0) -> StageContext:
    """A ``StageContext`` on ``data`` with a frozen copy of ``reference``, on the CPU."""
    from compress.state import StageContext

    return StageContext(
        data=data, out_dir=out_dir or Path("."), device=torch.device("cpu"), reference=frozen(reference), seed=seed
    )


def train_zoo_model(name: str, epochs: int, seed: int = 0, **kwargs: object) -> tuple[nn.Module, float]:
    """A model of ``compress.zoo`` trained on its data set (seeded, one thread); returns
    the model in eval mode and its held-out accuracy."""
    from compress import zoo
    from compress.metrics import evaluate
    from compress.train import TrainConfig, fit

    factory, _shape, source = zoo.ZOO[name]
    data = builtin_dataset(source)
    with one_thread():
        torch.manual_seed(seed)
        model = factory(**kwargs)
        fit(model, data.x, data.y, TrainConfig(epochs=epochs, lr=3e-3, batch_size=128, seed=seed))
    model.eval()
    return model, evaluate(model, data.x_eval, data.y_eval)["accuracy"]


def load_teacher() -> nn.Module:
    """The shipped MNIST-1D CNN teacher (94.9% test accuracy), frozen, eval mode."""
    from compress.zoo import mnist1d_cnn

    model = mnist1d_cnn()
    model.load_state_dict(torch.load(TEACHER, map_location="cpu", weights_only=True))
    return frozen(model)


def render_in_chromium(url: str, screenshot: Path, window: str = "1200,1600", timeout: float = 120):
    """Render ``url`` in headless Chromium (Debian's ``chromium``): returns the finished
    process, whose stdout is the DOM it rendered; the page's screenshot goes to ``screenshot``.
    Nothing is fetched from the network (background networking, sync and updates are off)."""
    import subprocess

    profile = screenshot.with_name(screenshot.stem + "-profile")
    return subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={window}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli(recipe: Path, model: Path, out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``compress run RECIPE MODEL -o OUT --json [extra...]`` as a separate process (how CI and
    torchrun see it: its own interpreter, exit code and stdout), with this checkout importable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "compress", "run", str(recipe), str(model), "-o", str(out), "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
