"""The edge path: device bundles, `compress validate` without torch, JUnit XML, the HTML report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from compress.testing import render_in_chromium

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_mlp_path):
    """One pipeline run with an export stage: its bundle, ONNX file and reports."""
    from compress.pipeline import run
    from compress.recipe import parse_recipe
    from tests.conftest import DIGITS_RECIPE

    out = tmp_path_factory.mktemp("edge")
    text = DIGITS_RECIPE.format(
        stages="  - quantize: {method: rtn, bits: 4}\n  - export: {latency_runs: 20, exact_quantized_kernels: true}",
        gates="  max_latency_ms: 50",
    )
    result = run(parse_recipe(text, "edge.yaml"), digits_mlp_path, out)
    assert result.passed, result.failures
    return out


def _validate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compress", "validate", *map(str, args)],
        capture_output=True,
        text=True,
        env=env or dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=300,
    )


def _no_torch_env(tmp_path: Path) -> dict:
    """Run Python with torch and onnx made unimportable (as on an edge device)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'onnx', 'sklearn', 'brevitas', 'onnxscript'):\n    sys.modules[name] = None\n"
    )
    return dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}")


def test_bundle_validates_without_torch(run_dir, tmp_path):
    bundle = run_dir / "bundle.czip"
    proc = _validate(bundle, "--json", env=_no_torch_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["parity"]["agreement"] == 1.0 and report["parity"]["max_abs_error"] < 1e-4
    assert report["accuracy"] > 0.9 and report["samples"] == 360
    assert report["latency"]["latency_p50_ms"] > 0 and report["peak_rss_mb"] > 0
    assert {c["gate"] for c in report["checks"]} == {"min_agreement", "max_latency_ms"}
    assert report["environment"]["onnxruntime"]


def test_validate_fails_on_limits_it_cannot_meet(run_dir, tmp_path):
    junit = tmp_path / "v.xml"
    proc = _validate(
        run_dir / "bundle.czip", "--max-latency-ms", "0.000001", "--junit", junit, env=_no_torch_env(tmp_path)
    )
    assert proc.returncode == 1
    assert "FAIL max_latency_ms" in proc.stdout
    suite = ET.parse(junit).getroot().find("testsuite")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["max_latency_ms"] and suite.get("failures") == "1"


def test_validate_plain_onnx_with_data_and_reference(run_dir, tmp_path):
    from compress.bundle import open_bundle

    b = open_bundle(run_dir / "bundle.czip", tmp_path)
    np.savez(tmp_path / "data.npz", x=b.inputs, y=b.labels)
    wrong = b.outputs.copy()
    wrong[:50] = wrong[:50, ::-1]  # flips the argmax of 50 samples
    np.savez(tmp_path / "ref.npz", outputs=wrong)
    proc = _validate(
        run_dir / "model.onnx",
        "--data",
        tmp_path / "data.npz",
        "--reference",
        tmp_path / "ref.npz",
        "--min-agreement",
        "0.99",
    )
    assert proc.returncode == 1 and "FAIL min_agreement" in proc.stdout
    proc = _validate(run_dir / "model.onnx", "--data", tmp_path / "data.npz")
    assert proc.returncode == 0 and "accuracy" in proc.stdout


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_bundle_is_refused(run_dir, tmp_path, damage):
    data = bytearray((run_dir / "bundle.czip").read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x40
    else:
        data = data[: len(data) - 100]
    bad = tmp_path / "bad.czip"
    bad.write_bytes(bytes(data))
    proc = _validate(bad, env=_no_torch_env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "checksum" in proc.stderr.lower() or "corrupt" in proc.stderr.lower() or "truncated" in proc.stderr.lower()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx"], "not found"),
        (["MODEL"], "--data"),
        (["MODEL", "--data", "nope.npz"], "data file not found"),
    ],
)
def test_validate_bad_input(run_dir, tmp_path, args, message):
    args = [str(run_dir / "model.onnx") if a == "MODEL" else a for a in args]
    proc = _validate(*args)
    assert proc.returncode == 2 and message in proc.stderr


def test_validate_wrong_input_shape(run_dir, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 40), np.float32))
    proc = _validate(run_dir / "model.onnx", "--data", tmp_path / "d.npz")
    assert proc.returncode == 2 and "shape [40]" in proc.stderr


def test_run_junit_has_one_failure_per_failed_gate(cli, write_recipe, digits_mlp_path, tmp_path):
    junit = tmp_path / "run.xml"
    code, _, _ = cli(
        "run",
        write_recipe(gates="  max_size_bytes: 10\n  min_accuracy: 0.999\n  max_accuracy_drop: 0.5"),
        digits_mlp_path,
        "-o",
        tmp_path / "o",
        "--junit",
        junit,
    )
    assert code == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = {c.get("name"): c.find("failure") is not None for c in suite.iter("testcase")}
    assert cases["max_size_bytes"] and cases["min_accuracy"] and not cases["max_accuracy_drop"]
    assert cases["onnx_top1_agreement"] is False  # passing stage checks are test cases too
    assert int(suite.get("failures")) == sum(cases.values())


def test_inspect_lists_a_bundle_without_decoding(cli, run_dir):
    code, out, err = cli("inspect", run_dir / "bundle.czip")
    assert code == 0, err
    assert "device bundle" in out and "extra/inputs" in out and "ratio" in out


def test_html_report_is_self_contained(run_dir):
    page = (run_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 4
    for forbidden in ("http://", "https://", "<script", "<link", "src="):
        assert forbidden not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "net.0.weight" in page and "PASSED" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium(run_dir, tmp_path):
    shot = tmp_path / "report.png"
    proc = render_in_chromium((run_dir / "report.html").as_uri(), shot, window="1200,1600")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Accuracy against size" in proc.stdout and "<svg" in proc.stdout  # the DOM it rendered
    png = shot.read_bytes() if shot.exists() else b""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a real page, not a blank one


@pytest.mark.slow
def test_edge_install_has_no_torch_and_validates(run_dir, tmp_path):
    """As a new user on a device: a venv with requirements-edge.txt and the package without deps."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements-edge.txt")], check=True, timeout=600)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, timeout=600, cwd=tmp_path)
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list"], capture_output=True, text=True).stdout
    assert "torch" not in listed and "onnxruntime" in listed
    proc = subprocess.run(
        [str(venv / "bin" / "compress"), "validate", str(run_dir / "bundle.czip")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # a limit no model meets: a gate failure (exit 1); an impossible one (--min-agreement 1.01) is exit 2
    proc = subprocess.run(
        [str(venv / "bin" / "compress"), "validate", str(run_dir / "bundle.czip"), "--max-latency-ms", "1e-9"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr


def test_bundle_of_a_model_with_named_inputs(tmp_path):
    """A model exported with several named ONNX inputs: the bundle stores one array per
    input and validate feeds them by name."""
    import torch

    from compress.bundle import open_bundle
    from compress.pipeline import run
    from compress.recipe import parse_recipe
    from tests.core.twoinput import two_input

    model_path = tmp_path / "two.pt"
    torch.save(two_input().state_dict(), model_path)
    text = """\
version: 1
model: {factory: "tests.core.twoinput:two_input", input_shape: [1, 2, 8]}
data:
  eval: {source: callable, fn: "tests.core.twoinput:data", split: test}
stages:
  - export: {latency_runs: 5}
"""
    out = tmp_path / "o"
    assert run(parse_recipe(text, "two.yaml"), model_path, out).passed
    bundle = open_bundle(out / "bundle.czip", tmp_path)
    assert set(bundle.inputs) == {"a", "b"} and bundle.inputs["a"].shape == (64, 8)
    proc = _validate(out / "bundle.czip", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["samples"] == 64 and report["parity"]["max_abs_error"] < 1e-5
    np.savez(tmp_path / "named.npz", a=bundle.inputs["a"], b=bundle.inputs["b"], y=bundle.labels)
    proc = _validate(bundle.model, "--data", tmp_path / "named.npz")
    assert proc.returncode == 0, proc.stderr
    np.savez(tmp_path / "wrong.npz", a=bundle.inputs["a"])
    proc = _validate(bundle.model, "--data", tmp_path / "wrong.npz")
    assert proc.returncode == 2 and "the model's inputs are ['a', 'b']" in proc.stderr


@pytest.mark.parametrize(
    "stage",
    [
        "  - export: {latency_runs: 5, ort_format: true}",
        "  - quantize: {method: rtn, bits: 4}\n  - export: {latency_runs: 5, ort_format: true}",
    ],
)
def test_ort_format_for_minimal_builds(cli, write_recipe, digits_mlp_path, tmp_path, stage):
    import onnxruntime as ort

    out = tmp_path / "o"
    code, _, err = cli("run", write_recipe(stages=stage), digits_mlp_path, "-o", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.ort").read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier
    assert report["stages"][-1]["metrics"]["ort_format_max_abs_error"] < 1e-4
    assert report["passed"]  # includes the ort_format_parity check
    sess = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input"


# ----------------------------------------------------------------------------- hostile validate input


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--min-agreement", "2", "between 0 and 1"),
        ("--max-latency-ms", "-1", "positive"),
        ("--max-abs-error", "nan", "finite"),
        ("--expect-sha256", "abc", "64 hexadecimal"),
    ],
)
def test_validate_impossible_limits(cli, run_dir, flag, value, message):
    code, _, err = cli("validate", run_dir / "bundle.czip", flag, value)
    assert code == 2 and message in err


def test_validate_expect_sha256(cli, run_dir):
    import hashlib

    digest = hashlib.sha256((run_dir / "bundle.czip").read_bytes()).hexdigest()
    assert json.loads((run_dir / "report.json").read_text())["bundle_sha256"] == digest
    code, out, err = cli(
        "validate", run_dir / "bundle.czip", "--expect-sha256", digest.upper(), "--runs", "5", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["sha256"] == digest
    wrong = "0" * 64
    code, _, err = cli("validate", run_dir / "bundle.czip", "--expect-sha256", wrong)
    assert code == 2 and f"SHA-256 is {digest}" in err


def test_validate_reference_of_another_width(cli, run_dir, tmp_path):
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    np.savez(tmp_path / "ref.npz", outputs=np.zeros((8, 7), np.float32))
    code, _, err = cli(
        "validate", run_dir / "model.onnx", "--data", tmp_path / "d.npz", "--reference", tmp_path / "ref.npz"
    )
    assert code == 2, err
    assert "shape [8, 10]" in err and "[8, 7]" in err


def test_validate_string_data(cli, run_dir, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([["a"] * 64] * 4))
    code, _, err = cli("validate", run_dir / "model.onnx", "--data", tmp_path / "d.npz")
    assert code == 2, err
    assert "'x' must be numeric" in err


def test_validate_error_still_writes_junit(cli, run_dir, tmp_path):
    junit = tmp_path / "v.xml"
    code, _, _ = cli("validate", run_dir / "model.onnx", "--junit", junit)
    assert code == 2
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert failure is not None and "--data" in failure.get("message")
