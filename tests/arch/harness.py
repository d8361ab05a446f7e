"""Train the zoo's models once and run them through ``compress run`` in-process."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.arch import zoo

DATA = {
    "digits": "{source: digits, split: %s}",
    "mnist1d": "{source: mnist1d, split: %s}",
    "tokens": "{source: callable, fn: 'tests.arch.zoo:token_data', split: %s}",
}
INPUT = {"digits": ("[1, 64]", "float32"), "mnist1d": ("[1, 40]", "float32"), "tokens": ("[1, 8]", "int64")}
EPOCHS = {
    "tied": 30,
    "conv_bn1d": 8,
    "depthwise": 15,
    "gru": 10,
    "lstm": 10,
    "bilstm": 10,
    "bigru": 10,
    "transformer": 10,
}

RECIPE = """\
version: 1
seed: 0
model:
  factory: tests.arch.zoo:{name}
  input_shape: {shape}
  input_dtype: {dtype}
data:
  train: {train}
  eval: {test}
  calibration: {calib}
stages:
{stages}
gates: {{}}
output: {{dir: {out}}}
"""


def source(name: str) -> str:
    return zoo.SOURCES.get(name, "digits")


def train_model(name: str, folder: Path) -> Path:
    """Train zoo model ``name`` a few epochs (seeded) and save its state_dict."""
    from compress.data import builtin
    from compress.train import TrainConfig, fit

    path = folder / f"{name}.pt"
    if path.is_file():
        return path
    torch.manual_seed(0)
    model = zoo.FACTORIES[name]()
    src = source(name)
    x, y = zoo.token_data("train") if src == "tokens" else builtin(src, "train")
    fit(model, torch.as_tensor(x), torch.as_tensor(y), TrainConfig(epochs=EPOCHS.get(name, 6), lr=3e-3, batch_size=64))
    torch.save(model.eval().state_dict(), path)
    return path


def write_recipe(name: str, stages: str, folder: Path, calib_samples: int = 256) -> Path:
    src = source(name)
    shape, dtype = INPUT[src]
    text = RECIPE.format(
        name=name,
        shape=shape,
        dtype=dtype,
        train=DATA[src] % "train",
        test=DATA[src] % "test",
        calib=DATA[src][:-1] % "train" + f", samples: {calib_samples}}}",
        stages=stages,
        out=folder / "out",
    )
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def run_cli(recipe: Path, model: Path, *extra: str) -> tuple[int, str, dict | None]:
    """``compress run`` in-process: exit code, console output, report (when written)."""
    from typer.testing import CliRunner

    from compress.cli import app

    result = CliRunner().invoke(app, ["run", str(recipe), str(model), *extra])
    report_path = recipe.parent / "out" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return result.exit_code, result.stdout + (result.stderr or ""), report
