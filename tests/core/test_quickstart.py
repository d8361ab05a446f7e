"""The built-in example: the shipped teacher, its ONNX parity, and the quickstart recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.pipeline import run
from compress.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "recipes" / "models" / "mnist1d_cnn.pt"

EXPORT_ONLY = """\
version: 1
model: {factory: "compress.zoo:mnist1d_cnn", input_shape: [1, 40]}
data:
  eval: {source: mnist1d, split: test}
stages:
  - export: {opset: 21, latency_runs: 20}
"""


@pytest.fixture(scope="module")
def export_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return run(parse_recipe(EXPORT_ONLY, "export-only.yaml"), TEACHER, out).report


def test_shipped_teacher_reaches_90_percent(export_report):
    # MNIST-1D paper's CNN baseline: 94%
    assert export_report["stages"][0]["accuracy"] >= 0.90


def test_teacher_onnx_parity(export_report):
    m = export_report["stages"][1]["metrics"]
    assert m["ort_agreement"] == 1.0
    assert m["ort_max_abs_error"] < 1e-4
    assert export_report["passed"]


def test_teacher_metadata_matches_its_file():
    meta = json.loads(TEACHER.with_suffix(".json").read_text())
    assert meta["model"] == "mnist1d_cnn" and meta["test_accuracy"] >= 0.90


@pytest.mark.slow
def test_quickstart_recipe_end_to_end(tmp_path, cli):
    out = tmp_path / "qs"
    code, stdout, stderr = cli("run", ROOT / "recipes" / "quickstart.yaml", TEACHER, "-o", out)
    assert code == 0, stderr + stdout
    report = json.loads((out / "report.json").read_text())
    names = [s.name for s in load_recipe(ROOT / "recipes" / "quickstart.yaml").stages]
    assert [s["stage"] for s in report["stages"]] == ["input", *names]
    assert (out / "model.onnx").is_file()
