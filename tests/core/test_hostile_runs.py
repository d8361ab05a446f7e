"""Hostile and broken inputs to `compress run` / `compress validate`, the output folder
protocol (lock, stale results, one published set) and honest artifacts. Each case exits
2 with a message naming the problem and leaves no half-published results."""

from __future__ import annotations

import errno
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from compress.zoo import digits_mlp
from tests.conftest import DIGITS_RECIPE

EXPORT = "  - export: {latency_runs: 5, exporter: legacy}"
RTN = "  - quantize: {method: rtn, bits: 4}"


@pytest.fixture
def recipe_text():
    def make(stages: str = EXPORT, gates: str = "  {}", data: str | None = None) -> str:
        text = DIGITS_RECIPE.format(stages=stages, gates=gates)
        if data is not None:
            text = text.replace(
                "  train: {source: digits, split: train}\n  eval: {source: digits, split: test}\n", data
            )
        return text

    return make


def _run(cli, tmp_path, text, model, *extra):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    return cli("run", recipe, model, *extra)


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _digits_xy():
    from compress.data import builtin

    return builtin("digits", "test")


# ----------------------------------------------------------------------------- data and model


def test_nan_in_data_x(cli, tmp_path, recipe_text, digits_mlp_path):
    x, y = _digits_xy()
    x = x.copy()
    x[3, 5] = np.nan
    x[7, 1] = np.inf
    _npz(tmp_path, x=x, y=y)
    code, _, err = _run(
        cli, tmp_path, recipe_text(data="  eval: {source: file, path: d.npz}\n"), digits_mlp_path, "-o", tmp_path / "o"
    )
    assert code == 2, err
    assert "data split 'eval'" in err and "2 NaN or infinite" in err


@pytest.mark.parametrize("label,message", [(99, "label 99 is out of range"), (-1, ">= 0, found -1")])
def test_labels_out_of_range(cli, tmp_path, recipe_text, digits_mlp_path, label, message):
    x, y = _digits_xy()
    y = y.copy()
    y[0] = label
    _npz(tmp_path, x=x, y=y)
    code, _, err = _run(
        cli, tmp_path, recipe_text(data="  eval: {source: file, path: d.npz}\n"), digits_mlp_path, "-o", tmp_path / "o"
    )
    assert code == 2, err
    assert message in err


def test_nan_model_weights(cli, tmp_path, recipe_text, digits_mlp_path):
    sd = torch.load(digits_mlp_path, weights_only=True)
    sd["net.0.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(sd, bad)
    code, _, err = _run(cli, tmp_path, recipe_text(), bad, "-o", tmp_path / "o")
    assert code == 2, err
    assert "NaN or infinite" in err and "net.0.weight" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_state_dict_mismatch_names_keys(cli, tmp_path, recipe_text, digits_mlp_path):
    sd = torch.load(digits_mlp_path, weights_only=True)
    sd["extra.weight"] = torch.zeros(2)
    del sd["net.2.bias"]
    bad = tmp_path / "mismatch.pt"
    torch.save(sd, bad)
    code, _, err = _run(cli, tmp_path, recipe_text(), bad, "-o", tmp_path / "o")
    assert code == 2, err
    assert "missing keys: net.2.bias" in err and "unexpected keys: extra.weight" in err


def test_pickle_with_blocked_global_is_named(cli, tmp_path, recipe_text):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, evil)
    code, _, err = _run(cli, tmp_path, recipe_text(), evil, "-o", tmp_path / "o")
    assert code == 2, err
    assert "pickled Python object" in err and "system" in err and "--trust-model" in err
    assert "weights_only=False" not in err
    assert not marker.exists()


def test_torchscript_without_factory_refused_up_front(cli, tmp_path, recipe_text, digits_mlp_path):
    model = digits_mlp(hidden=(32,))
    model.load_state_dict(torch.load(digits_mlp_path, weights_only=True))
    scripted = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(model), scripted)
    text = recipe_text(stages=RTN).replace("  factory: compress.zoo:digits_mlp\n  kwargs: {hidden: [32]}\n", "")
    code, _, err = _run(cli, tmp_path, text, scripted, "-o", tmp_path / "o")
    assert code == 2, err
    assert "TorchScript" in err and "model.factory" in err
    assert not (tmp_path / "o" / "stages").exists()


def test_torchscript_with_factory_runs_every_stage(cli, tmp_path, recipe_text, digits_mlp_path):
    model = digits_mlp(hidden=(32,))
    model.load_state_dict(torch.load(digits_mlp_path, weights_only=True))
    scripted = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(model), scripted)
    stages = "  - prune: {method: magnitude, amount: 0.5, skip: []}\n" + RTN + "\n" + EXPORT
    code, out, err = _run(cli, tmp_path, recipe_text(stages=stages), scripted, "-o", tmp_path / "o", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model_kind"] == "torchscript"
    final = report["stages"][-1]
    assert final["weight_bits"] < 8 and final["sparsity"] > 0.3
    assert report["stages"][0]["accuracy"] - final["accuracy"] < 0.1


# ----------------------------------------------------------------------------- honest artifacts


def test_stale_onnx_refused(cli, tmp_path, recipe_text, digits_mlp_path):
    code, _, err = _run(cli, tmp_path, recipe_text(stages=EXPORT + "\n" + RTN), digits_mlp_path, "-o", tmp_path / "o")
    assert code == 2, err
    assert "stage 2 (quantize) may change the model after stage 1 (export) writes its files" in err
    assert "add export again at the end" in err
    # refused from the plan, before any stage ran (and by `compress check` as well)
    assert not (tmp_path / "o" / "stages").exists() and not (tmp_path / "o" / "report.json").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(stages=EXPORT + "\n" + RTN))
    code, _, err = cli("check", recipe)
    assert code == 2 and "may change the model after stage 1 (export)" in err


def test_artifact_writers_in_any_order_among_themselves(cli, tmp_path, recipe_text):
    """compress after export changes nothing: no refusal."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(stages=RTN + "\n" + EXPORT + "\n  - compress: {}"))
    code, _, err = cli("check", recipe)
    assert code == 0, err


def test_export_again_after_a_change_is_fine(tmp_path, recipe_text, digits_mlp_path):
    from compress.pipeline import run
    from compress.recipe import parse_recipe

    result = run(parse_recipe(recipe_text(stages=EXPORT + "\n" + RTN + "\n" + EXPORT)), digits_mlp_path, tmp_path / "o")
    assert result.passed
    # the published model.onnx is the quantized one from the last stage
    assert (tmp_path / "o" / "model.onnx").read_bytes() == (
        tmp_path / "o" / "stages" / "03-export" / "model.onnx"
    ).read_bytes()
    assert result.report["stages"][-1]["weight_bits"] < 8


def test_failed_rerun_leaves_no_old_passed_report(cli, tmp_path, recipe_text, digits_mlp_path):
    out = tmp_path / "o"
    code, _, _ = _run(cli, tmp_path, recipe_text(), digits_mlp_path, "-o", out)
    assert code == 0 and json.loads((out / "report.json").read_text())["passed"]
    sd = torch.load(digits_mlp_path, weights_only=True)
    sd["net.0.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(sd, bad)
    code, _, err = _run(cli, tmp_path, recipe_text(), bad, "-o", out)
    assert code == 2, err
    for name in ("report.json", "report.md", "report.html", "model.onnx", "bundle.czip"):
        assert not (out / name).exists(), name


def test_output_folder_locked(tmp_path, recipe_text, digits_mlp_path):
    from compress.errors import InputError
    from compress.outdir import OutputFolder
    from compress.pipeline import run
    from compress.recipe import parse_recipe

    out = tmp_path / "o"
    with OutputFolder(out), pytest.raises(InputError, match=f"in use by pid {os.getpid()}"):
        run(parse_recipe(recipe_text()), digits_mlp_path, out)
    assert run(parse_recipe(recipe_text()), digits_mlp_path, out).passed  # released


def test_disk_full_while_publishing_publishes_nothing(tmp_path, recipe_text, digits_mlp_path, monkeypatch):
    from compress import pipeline
    from compress.errors import InputError
    from compress.recipe import parse_recipe

    real = pipeline.shutil.copyfile

    def full(src, dst, *a, **k):
        if str(dst).endswith("model.onnx"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(pipeline.shutil, "copyfile", full)
    out = tmp_path / "o"
    with pytest.raises(InputError, match=r"cannot write .*model\.onnx: No space left on device; [\d,]+ bytes free"):
        pipeline.run(parse_recipe(recipe_text()), digits_mlp_path, out)
    top = sorted(p.name for p in out.iterdir())
    assert top == [".compress.lock", "stages"], top  # no artifact, no report, no temp folder


def test_disk_full_during_a_stage_names_the_path(cli, tmp_path, recipe_text, digits_mlp_path, monkeypatch):
    from compress import model_io

    def full(state, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.pt"))

    monkeypatch.setattr("compress.pipeline.save_state", full)
    assert model_io  # the real save_state is untouched
    code, _, err = _run(cli, tmp_path, recipe_text(stages=RTN), digits_mlp_path, "-o", tmp_path / "o")
    assert code == 2, err
    assert "model.pt: No space left on device" in err and "bytes free" in err


def test_file_size_limit_end_to_end(tmp_path, recipe_text, digits_mlp_path):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses writes past 20 KB, as a full
    disk would): exit 2 naming a path, and neither the artifacts nor a report published."""
    import resource
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text())
    out = tmp_path / "o"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        [sys.executable, "-m", "compress", "run", str(recipe), str(digits_mlp_path), "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(root)),
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot write" in proc.stderr and str(out) in proc.stderr and "Traceback" not in proc.stderr
    top = {p.name for p in out.iterdir()}
    assert not top & {"report.json", "model.onnx", "bundle.czip"}, top
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".publish-")]


def test_export_restores_torch_log_levels():
    import logging

    from compress.export.onnx_export import _quiet_dynamo_logs

    logging.getLogger("torch.onnx").setLevel(logging.INFO)
    with _quiet_dynamo_logs():
        assert logging.getLogger("torch.onnx").level == logging.ERROR
    assert logging.getLogger("torch.onnx").level == logging.INFO


def test_cli_does_not_silence_warnings_for_children():
    import subprocess
    import sys

    code = "import os, compress.cli\ntry:\n    compress.cli.main()\nexcept SystemExit:\n    pass\nprint(os.environ.get('PYTHONWARNINGS'))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=env, check=False)
    assert out.stdout.strip().splitlines()[-1] == "None"


def test_report_json_never_holds_nan(tmp_path, recipe_text, digits_mlp_path):
    """A gate that could not be measured is null, not a bare NaN."""
    from compress.pipeline import run
    from compress.recipe import parse_recipe

    text = recipe_text(gates="  min_cosine: 0.5").replace(
        "  eval: {source: digits, split: test}\n", "  eval: {source: digits, split: test}\n"
    )
    result = run(parse_recipe(text), digits_mlp_path, tmp_path / "o")
    raw = (tmp_path / "o" / "report.json").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"bare {c} in report.json"))
    assert result.report["gates"][0]["measured"] is not None
    from compress.pipeline import json_safe

    assert json_safe({"a": [float("nan"), float("inf"), 1.5]}) == {"a": [None, None, 1.5]}


def test_report_records_bundle_sha256(cli, tmp_path, recipe_text, digits_mlp_path):
    import hashlib

    junit = tmp_path / "j.xml"
    code, out, err = _run(
        cli, tmp_path, recipe_text(), digits_mlp_path, "-o", tmp_path / "o", "--json", "--junit", junit
    )
    assert code == 0, err
    report = json.loads(out)
    digest = hashlib.sha256((tmp_path / "o" / "bundle.czip").read_bytes()).hexdigest()
    assert report["bundle_sha256"] == digest == report["artifact_sha256"]["bundle.czip"]
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    assert props["bundle.czip.sha256"] == digest


def test_report_md_escapes_html_from_the_recipe(tmp_path, recipe_text, digits_mlp_path):
    from compress.pipeline import run
    from compress.recipe import parse_recipe

    text = "name: '<script>alert(1)</script>'\n" + recipe_text()
    run(parse_recipe(text), digits_mlp_path, tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md


# ----------------------------------------------------------------------------- CLI paths


@pytest.mark.parametrize("where", ["missing", "readonly"])
def test_junit_path_checked_before_work(cli, tmp_path, recipe_text, digits_mlp_path, where):
    if where == "missing":
        junit = tmp_path / "nonexistent" / "dir" / "x.xml"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        junit = ro / "x.xml"
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
    code, _, err = _run(cli, tmp_path, recipe_text(), digits_mlp_path, "-o", tmp_path / "o", "--junit", junit)
    assert code == 2, err
    assert "--junit" in err
    assert not (tmp_path / "o").exists()  # nothing ran
    assert not (tmp_path / "nonexistent").exists()


def test_failed_run_still_writes_junit(cli, tmp_path, recipe_text, digits_mlp_path):
    junit = tmp_path / "j.xml"
    code, _, err = _run(
        cli, tmp_path, recipe_text(stages="  - export: {latency_runs: 0}"), digits_mlp_path, "--junit", junit
    )
    assert code == 2, err
    cases = list(ET.parse(junit).iter("testcase"))
    assert len(cases) == 1
    failure = cases[0].find("failure")
    assert failure is not None and "latency_runs" in failure.get("message")


def test_unknown_device_refused(cli, tmp_path, recipe_text, digits_mlp_path):
    code, _, err = _run(cli, tmp_path, recipe_text(), digits_mlp_path, "-o", tmp_path / "o", "--device", "tpu")
    assert code == 2 and "device" in err


def test_device_cpu_recorded(cli, tmp_path, recipe_text, digits_mlp_path):
    code, out, err = _run(
        cli,
        tmp_path,
        recipe_text(stages="  - finetune: {train: {epochs: 1}}"),
        digits_mlp_path,
        "-o",
        tmp_path / "o",
        "--json",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert json.loads(out)["device"] == "cpu"


def test_unknown_memory_mode_refused(cli, tmp_path, recipe_text, digits_mlp_path):
    code, _, err = _run(cli, tmp_path, recipe_text(), digits_mlp_path, "-o", tmp_path / "o", "--memory", "tiny")
    assert code == 2 and "unknown memory mode 'tiny'" in err


def test_memory_auto_is_fast_for_a_small_model(cli, tmp_path, recipe_text, digits_mlp_path):
    """``--memory auto`` leaves the allocator alone below 256 MB of model file (it would
    slow the test process otherwise); the report says which mode ran."""
    from compress.pipeline import LOW_MEMORY_MODEL_BYTES, resolve_memory

    code, out, err = _run(cli, tmp_path, recipe_text(), digits_mlp_path, "-o", tmp_path / "o", "--json")
    assert code == 0, err
    assert json.loads(out)["environment"]["memory"] == "fast"
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(LOW_MEMORY_MODEL_BYTES)  # sparse: no disk used
    assert resolve_memory("auto", big) == "low"
    assert resolve_memory("fast", big) == "fast" and resolve_memory("low", digits_mlp_path) == "low"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_cuda_matches_cpu(cli, tmp_path, recipe_text, digits_mlp_path):
    stages = (
        "  - finetune: {train: {epochs: 2}}\n  - prune: {method: magnitude, amount: 0.5, skip: []}\n"
        + RTN
        + "\n"
        + EXPORT
    )
    results = {}
    for dev in ("cpu", "cuda"):
        code, out, err = _run(
            cli, tmp_path, recipe_text(stages=stages), digits_mlp_path, "-o", tmp_path / dev, "--json", "--device", dev
        )
        assert code == 0, err
        results[dev] = json.loads(out)
    assert abs(results["cpu"]["stages"][-1]["accuracy"] - results["cuda"]["stages"][-1]["accuracy"]) < 0.03


def test_inspect_corrupt_stage_folder(cli, tmp_path, recipe_text, digits_mlp_path):
    out = tmp_path / "o"
    code, _, err = _run(cli, tmp_path, recipe_text(stages=RTN), digits_mlp_path, "-o", out)
    assert code == 0, err
    folder = next((out / "stages").iterdir())
    model = folder / "model.pt"
    model.write_bytes(model.read_bytes()[:300])
    code, _, err = cli("inspect", folder)
    assert code == 2, err
    assert "model.pt: corrupt" in err


def warning_stage_apply(state, config, ctx):
    import warnings

    warnings.warn("calibration set is tiny (test warning)", UserWarning, stacklevel=1)
    return state


def test_warnings_go_to_the_report_not_the_terminal(cli, tmp_path, recipe_text, digits_mlp_path):
    from pydantic import BaseModel, ConfigDict

    from compress import registry

    class WarnConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")

    registry.register_stage("warner", WarnConfig, apply=f"{__name__}:warning_stage_apply", summary="test stage")
    try:
        code, out, err = _run(
            cli, tmp_path, recipe_text(stages="  - warner: {}"), digits_mlp_path, "-o", tmp_path / "o", "--json"
        )
    finally:
        registry._STAGES.pop("warner", None)
    assert code == 0, err
    assert "calibration set is tiny (test warning)" in " ".join(json.loads(out)["warnings"])
    assert "test warning" not in err
