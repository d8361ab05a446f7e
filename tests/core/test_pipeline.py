"""The runner: caching by content, atomic stage records, interrupted runs, reloads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from compress import registry
from compress.model_io import load_state, resize_to_state_dict, save_state
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.state import ModelState
from compress.zoo import digits_mlp


class FlakyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0


CALLS = {"n": 0, "fail": False}


def flaky_apply(state, config, ctx):
    """A test stage: scales the first layer; can die half-way through writing a file."""
    CALLS["n"] += 1
    (ctx.out_dir / "partial.bin").write_bytes(b"half")
    if CALLS["fail"]:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-stage
    with torch.no_grad():
        state.module.net[0].weight.mul_(config.scale)
    return state


@pytest.fixture
def flaky_stage():
    registry.register_stage("flaky", FlakyConfig, apply=f"{__name__}:flaky_apply", summary="test stage")
    CALLS.update(n=0, fail=False)
    yield
    registry._STAGES.pop("flaky", None)


def _run(write_recipe, model, out, stages, **kw):
    recipe = load_recipe(write_recipe(stages=stages))
    return run(recipe, model, out, **kw)


def test_rerun_reuses_finished_stages_and_force_redoes_them(flaky_stage, write_recipe, digits_mlp_path, tmp_path):
    out = tmp_path / "o"
    stages = "  - flaky: {scale: 0.5}"
    first = _run(write_recipe, digits_mlp_path, out, stages)
    assert CALLS["n"] == 1 and not first.report["stages"][1]["cached"]
    second = _run(write_recipe, digits_mlp_path, out, stages)
    assert CALLS["n"] == 1 and second.report["stages"][1]["cached"]
    assert second.report["stages"][1]["accuracy"] == first.report["stages"][1]["accuracy"]
    _run(write_recipe, digits_mlp_path, out, stages, force=True)
    assert CALLS["n"] == 2
    # a changed config is a different stage
    _run(write_recipe, digits_mlp_path, out, "  - flaky: {scale: 0.25}")
    assert CALLS["n"] == 3


def test_interrupted_stage_is_not_reused(flaky_stage, write_recipe, digits_mlp_path, tmp_path):
    out = tmp_path / "o"
    stages = "  - flaky: {scale: 0.5}"
    _run(write_recipe, digits_mlp_path, out, stages)
    CALLS["fail"] = True
    with pytest.raises(KeyboardInterrupt):
        _run(write_recipe, digits_mlp_path, out, stages, force=True)
    folder = out / "stages" / "01-flaky"
    assert not (folder / "stage.json").exists()  # the half-done folder carries no completion record
    CALLS["fail"] = False
    result = _run(write_recipe, digits_mlp_path, out, stages)
    assert not result.report["stages"][1]["cached"] and CALLS["n"] == 3


def test_tampered_artifact_is_redone(flaky_stage, write_recipe, digits_mlp_path, tmp_path):
    out = tmp_path / "o"
    stages = "  - flaky: {scale: 0.5}"
    _run(write_recipe, digits_mlp_path, out, stages)
    model_file = out / "stages" / "01-flaky" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated, as by a crash of another tool
    result = _run(write_recipe, digits_mlp_path, out, stages)
    assert CALLS["n"] == 2 and not result.report["stages"][1]["cached"]


def test_changed_model_invalidates_cache(flaky_stage, write_recipe, digits_mlp_path, tmp_path):
    out = tmp_path / "o"
    stages = "  - flaky: {scale: 0.5}"
    _run(write_recipe, digits_mlp_path, out, stages)
    other = tmp_path / "other.pt"
    sd = torch.load(digits_mlp_path, weights_only=True)
    sd["net.2.bias"] += 1
    torch.save(sd, other)
    _run(write_recipe, other, out, stages)
    assert CALLS["n"] == 2


def test_changed_code_redoes_cached_stages(flaky_stage, write_recipe, digits_mlp_path, tmp_path, monkeypatch):
    """The cache key holds the code that made a stage, not only compress's version: an
    edited (editable install) or upgraded compress, or another torch, redoes the stages."""
    import compress.pipeline

    out = tmp_path / "o"
    stages = "  - flaky: {scale: 0.5}"
    _run(write_recipe, digits_mlp_path, out, stages)
    monkeypatch.setattr(compress.pipeline, "code_fingerprint", lambda: "other code")
    assert not _run(write_recipe, digits_mlp_path, out, stages).report["stages"][1]["cached"]
    assert CALLS["n"] == 2
    assert _run(write_recipe, digits_mlp_path, out, stages).report["stages"][1]["cached"] and CALLS["n"] == 2


def test_edited_plugin_stage_is_redone(write_recipe, digits_mlp_path, tmp_path, monkeypatch):
    """A stage from outside compress is keyed on its module's source: editing it redoes the stage."""
    plugin = tmp_path / "plugin_stage_for_cache_test.py"
    body = "def apply(state, config, ctx):\n    ctx.out_dir.joinpath('ran').write_text('{}')\n    return state\n"
    plugin.write_text(body.format(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.register_stage("plugged", FlakyConfig, apply="plugin_stage_for_cache_test:apply", summary="test stage")
    try:
        out = tmp_path / "o"
        first = _run(write_recipe, digits_mlp_path, out, "  - plugged: {}")
        again = _run(write_recipe, digits_mlp_path, out, "  - plugged: {}")
        plugin.write_text(body.format(2))  # the plugin's code changes, its config does not
        edited = _run(write_recipe, digits_mlp_path, out, "  - plugged: {}")
    finally:
        registry._STAGES.pop("plugged", None)
    assert [r.report["stages"][1]["cached"] for r in (first, again, edited)] == [False, True, False]


def test_source_hash_follows_content_not_location(tmp_path):
    from compress.artifacts import source_hash

    for where in ("a", "b"):
        (tmp_path / where / "sub").mkdir(parents=True)
        (tmp_path / where / "m.py").write_text("x = 1\n")
        (tmp_path / where / "sub" / "n.py").write_text("y = 2\n")
        (tmp_path / where / "notes.txt").write_text(where)  # not source
    a, b = source_hash([tmp_path / "a"]), source_hash([tmp_path / "b"])
    assert a == b
    (tmp_path / "b" / "sub" / "n.py").write_text("y = 3\n")
    assert source_hash([tmp_path / "b"]) != a
    (tmp_path / "b" / "sub" / "n.py").write_text("y = 2\n")
    (tmp_path / "b" / "sub" / "n.py").rename(tmp_path / "b" / "sub" / "o.py")  # same bytes, other module
    assert source_hash([tmp_path / "b"]) != a


def test_code_fingerprint_covers_our_sources_and_library_versions(monkeypatch):
    import importlib.metadata

    import compress.artifacts as art

    base = art.code_fingerprint.__wrapped__()
    assert art.code_fingerprint() == base  # stable within a process
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.0-other" if n == "torch" else real(n))
    assert art.code_fingerprint.__wrapped__() != base
    monkeypatch.setattr(importlib.metadata, "version", real)
    monkeypatch.setattr(art, "source_hash", lambda roots: "edited")
    assert art.code_fingerprint.__wrapped__() != base
    assert any((r / "pipeline.py").is_file() for r in art._own_roots())  # compress's own folder is hashed


def test_report_records_every_stage(flaky_stage, write_recipe, digits_mlp_path, tmp_path):
    out = tmp_path / "o"
    result = _run(write_recipe, digits_mlp_path, out, "  - flaky: {scale: 0.0}\n  - export: {latency_runs: 5}")
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["input", "flaky", "export"]
    flaky = report["stages"][1]
    # zeroing the first layer: 64*32 weights become zero, and accuracy collapses
    assert flaky["nonzeros"] == flaky["parameters"] - 64 * 32
    assert flaky["accuracy"] < 0.3 and report["stages"][0]["accuracy"] > 0.9
    for key in ("size_bytes", "parameters", "seconds", "config_hash", "weight_bits"):
        assert key in flaky
    assert report["stages"][2]["latency_p50_ms"] > 0
    assert (out / "report.md").read_text().count("|") > 20
    assert result.passed


def test_state_reloads_after_structural_change(tmp_path):
    """A stage that shrinks a layer (structured pruning) must reload faithfully."""
    model = digits_mlp(hidden=(32,))
    with torch.no_grad():
        keep = torch.arange(0, 32, 2)
        first, last = model.net[0], model.net[2]
        model.net[0] = torch.nn.Linear(64, 16)
        model.net[0].weight.copy_(first.weight[keep])
        model.net[0].bias.copy_(first.bias[keep])
        model.net[2] = torch.nn.Linear(16, 10)
        model.net[2].weight.copy_(last.weight[:, keep])
        model.net[2].bias.copy_(last.bias)
    state = ModelState(module=model, input_shape=(1, 64), masks={"net.2.weight": model.net[2].weight != 0})
    save_state(state, tmp_path)
    again = load_state(tmp_path, lambda: digits_mlp(hidden=(32,)))
    x = torch.randn(8, 64)
    assert torch.equal(again.module(x), model(x))
    assert again.module.net[0].out_features == 16 and again.module.net[2].in_features == 16
    assert set(again.masks) == {"net.2.weight"}


def test_resize_updates_conv_and_norm_sizes():
    m = torch.nn.Sequential(torch.nn.Conv1d(1, 8, 3), torch.nn.BatchNorm1d(8), torch.nn.Conv1d(8, 4, 3))
    small = torch.nn.Sequential(torch.nn.Conv1d(1, 5, 3), torch.nn.BatchNorm1d(5), torch.nn.Conv1d(5, 4, 3))
    resize_to_state_dict(m, small.state_dict())
    m.load_state_dict(small.state_dict())
    assert m[0].out_channels == 5 and m[1].num_features == 5 and m[2].in_channels == 5
    x = torch.randn(2, 1, 20)
    small.eval(), m.eval()
    assert torch.equal(m(x), small(x))


def test_help_does_not_import_torch():
    code = "import sys\nfrom compress.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'LIGHT')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("LIGHT"), out
