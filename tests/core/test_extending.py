"""Extending the pipeline: a new method is one config class, one function and one
registration, and the recipe parser, `compress schema`, `compress check` and `compress
run` see it; the installed wheel holds one top-level package; the Python API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field

import compress
from compress.quantize.config import LayerSelection
from compress.registry import methods, register_method, unregister_method

ROOT = Path(__file__).resolve().parents[2]


class SignConfig(LayerSelection):
    """1-bit sign quantization, w = sign(w) * mean|w| per output row (a toy method)."""

    method: Literal["sign"] = Field(description="Sign quantization.")
    bits: int = Field(2, description="Stored width (codes are -1 and 1).")


CALLS: list[str] = []


def sign_method(state, config, ctx, chosen, masks):
    from compress.qtensor import UniformTensor

    params = state.parameters_by_name()
    new, report = {}, {}
    for pname, (target, bits) in chosen.items():
        weight = params[pname].detach()
        w = weight.reshape(len(weight), -1)
        scale = w.abs().mean(dim=1, keepdim=True)
        codes = torch.where(w >= 0, 1, -1).to(torch.int8)
        new[pname] = UniformTensor(codes=codes.reshape(weight.shape), bits=bits, scale=scale, method="sign")
        report[target.key] = {"bits": bits}
        CALLS.append(pname)
    return new, report


@pytest.fixture
def sign_registered():
    register_method("quantize", SignConfig, apply=sign_method)
    yield
    unregister_method("quantize", "sign")


def test_a_new_method_reaches_schema_check_and_run(sign_registered, cli, write_recipe, digits_mlp_path, tmp_path):
    assert "sign" in methods("quantize")
    code, out, _ = cli("schema")
    assert code == 0 and "Sign quantization." in out and '"sign"' in out

    recipe = write_recipe(
        "  - quantize: {method: sign}\n  - export: {latency_runs: 5, exporter: legacy, min_agreement: 0}"
    )
    code, _, err = cli("check", recipe)
    assert code == 0 and "quantize (sign)" in err

    CALLS.clear()
    code, out, err = cli("run", recipe, digits_mlp_path, "-o", tmp_path / "run", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert CALLS, "the registered function was not called"
    quantize = next(r for r in report["stages"] if r["stage"] == "quantize")
    assert quantize["method"] == "sign" and quantize["weight_bits"] < 32

    code, _, err = cli("check", write_recipe("  - quantize: {method: sgn}"))
    assert code == 2 and "unknown method 'sgn'" in err and "sign" in err


def test_method_registration_needs_a_method_tag():
    class NoTag(LayerSelection):
        bits: int = 4

    with pytest.raises(TypeError, match="method"):
        register_method("quantize", NoTag, apply=sign_method)


def test_python_api_runs_a_recipe(write_recipe, digits_mlp_path, tmp_path):
    result = compress.run(write_recipe(), digits_mlp_path, tmp_path / "api")
    assert result.passed and (tmp_path / "api" / "report.json").is_file()
    assert result.report["stages"][-1]["stage"] == "export"
    recipe = compress.load_recipe(write_recipe())
    assert [s.name for s in recipe.stages] == ["export"]
    assert isinstance(compress.ModelState, type) and callable(compress.register_method)


def test_import_compress_stays_light():
    code = "import sys, compress; compress.__version__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_wheel_installs_one_top_level_package(tmp_path):
    """The wheel holds `compress` only; in a venv with it installed, `import prune` fails."""
    wheels = tmp_path / "wheels"
    build_dir_existed = (ROOT / "build").exists()
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(wheels),
                str(ROOT),
            ],
            check=True,
            cwd=tmp_path,
        )
    finally:
        if not build_dir_existed:  # setuptools builds inside the source tree: leave it as found
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        top = {n.split("/")[0] for n in zf.namelist()}
        entry_points = next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
        assert "[compress.stages]" in zf.read(entry_points).decode()
    assert {t for t in top if not t.endswith(".dist-info")} == {"compress"}
    assert {"compress/prune/__init__.py", "compress/quantize/gpfq.py"} <= set(zipfile.ZipFile(wheel).namelist())

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
    )
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "compress"]
    probe = (
        "import importlib.util as u, compress, compress.registry as r\n"
        f"assert compress.__file__.startswith({str(target)!r}), compress.__file__\n"
        "assert u.find_spec('prune') is None and u.find_spec('quantize') is None, 'bare stage names importable'\n"
        "print(sorted(r.stages()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, cwd=tmp_path, env=env, capture_output=True, text=True
    ).stdout
    assert "quantize" in out and "export" in out
