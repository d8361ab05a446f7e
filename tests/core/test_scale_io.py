"""Loading without copies (mmap, safetensors, meta-device build), the lazy reference model,
and per-stage peak RSS in the report."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from compress import registry
from compress.errors import ModelLoadError
from compress.metrics import PeakRSS, _current_rss
from compress.model_io import load_model, load_state, save_state
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.state import ModelState

MB = 1_000_000


class ProbeMLP(nn.Module):
    """The digits MLP under a class name no other test uses, so live instances can be counted."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TiedLM(nn.Module):
    """Input embedding and output projection share one matrix (as tied-embedding decoders do)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x).mean(1))


def _live(cls: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allocate_mb: int = 0
    read_reference: bool = False


def probe_apply(state, config, ctx):
    """A test stage: allocates and touches ``allocate_mb`` MB, counts the models alive, and
    (optionally) reads the reference model."""
    ctx.metrics["rss_start"] = _current_rss()
    ctx.metrics["models_alive"] = _live(ProbeMLP)
    if config.allocate_mb:
        block = torch.ones(config.allocate_mb * MB // 4)  # float32: 4 bytes each, every page written
        ctx.metrics["allocated_sum"] = float(block[::4096].sum())
        del block
    if config.read_reference:
        ref = ctx.reference
        ctx.metrics["models_alive_with_reference"] = _live(ProbeMLP)
        ctx.metrics["reference_frozen"] = not any(p.requires_grad for p in ref.parameters()) and not ref.training
        x = ctx.data["eval"].x[:64]
        ctx.metrics["reference_matches_state"] = bool(torch.equal(ref(x), state.module(x)))
    return state


@pytest.fixture
def probe_stage():
    registry.register_stage("probe", ProbeConfig, apply=f"{__name__}:probe_apply", summary="test stage")
    yield
    registry._STAGES.pop("probe", None)


@pytest.fixture
def probe_model(tmp_path, digits_mlp_path):
    path = tmp_path / "probe.pt"
    model = ProbeMLP()
    model.load_state_dict(torch.load(digits_mlp_path))  # the same layer names as digits_mlp(hidden=(32,))
    torch.save(model.state_dict(), path)
    return path


RECIPE = """\
version: 1
model:
  factory: tests.core.test_scale_io:ProbeMLP
  input_shape: [1, 64]
data:
  train: {{source: digits, split: train}}
  eval: {{source: digits, split: test}}
stages:
{stages}
"""


def _run(tmp_path, model, stages: str):
    recipe = tmp_path / "probe.yaml"
    recipe.write_text(RECIPE.format(stages=stages))
    return run(load_recipe(recipe), model, tmp_path / "out", force=True)


# ------------------------------------------------------------------------------ peak RSS


def test_peak_rss_sees_a_200_mb_block():
    before = _current_rss()
    with PeakRSS() as peak:
        block = torch.ones(200 * MB // 4)
        del block
    if peak.method != "VmHWM":
        pytest.skip(f"the peak mark cannot be reset here (measured by {peak.method})")
    # (a few resident pages freed by earlier tests may be reused: 5% slack below)
    assert 190 * MB <= peak.bytes - before <= 240 * MB


def test_stage_rows_carry_peak_rss_of_their_own_step(tmp_path, probe_stage, probe_model):
    stages = "  - probe: {allocate_mb: 200}\n  - probe: {allocate_mb: 0}"
    result = _run(tmp_path, probe_model, stages)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = report["stages"]
    assert [r["stage"] for r in rows] == ["input", "probe", "probe"]
    assert all(r["peak_rss_bytes"] > 0 for r in rows)
    if rows[1]["peak_rss_method"] != "VmHWM":
        pytest.skip(f"the peak mark cannot be reset here (measured by {rows[1]['peak_rss_method']})")
    big, small = rows[1], rows[2]
    # the stage's own 200 MB, plus at most the measuring and saving of a 2.4k-parameter MLP
    # (pages freed earlier in the process may be reused: 5% slack below)
    assert 190 * MB <= big["peak_rss_bytes"] - big["metrics"]["rss_start"] <= 260 * MB
    # the mark is reset per stage: the next stage does not inherit the 200 MB peak
    assert small["peak_rss_bytes"] - small["metrics"]["rss_start"] < 60 * MB
    assert rows[0]["seconds"] > 0  # the input row times the load step
    assert "peak RSS" in (tmp_path / "out" / "report.md").read_text()
    assert "peak RSS" in (tmp_path / "out" / "report.html").read_text()
    assert result.passed


# ---------------------------------------------------------------------- no held copies


def test_run_holds_one_model_and_builds_the_reference_only_when_read(tmp_path, probe_stage, probe_model):
    stages = "  - probe: {}\n  - probe: {read_reference: true}\n  - probe: {}"
    result = _run(tmp_path, probe_model, stages)
    m = [r["metrics"] for r in result.report["stages"][1:]]
    assert m[0]["models_alive"] == 1  # the stage's model only: no reference copy held
    assert m[1]["models_alive"] == 1 and m[1]["models_alive_with_reference"] == 2
    assert m[1]["reference_frozen"] and m[1]["reference_matches_state"]
    assert m[2]["models_alive"] == 1  # the reference was dropped after the stage that read it


def test_reference_refuses_a_model_file_changed_during_the_run(tmp_path, probe_model):
    loaded = load_model(probe_model, "tests.core.test_scale_io:ProbeMLP", {})
    sd = torch.load(probe_model)
    sd["net.0.bias"] += 1
    torch.save(sd, probe_model)
    with pytest.raises(ModelLoadError, match="changed since the run started"):
        loaded.reload()


# --------------------------------------------------------------------------- lazy loading


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_state_dict_loads_without_a_second_copy(tmp_path, fmt):
    """A 64 MB model: the load's peak stays near one copy (mapped file pages), not the
    two (factory's random init + the file read) of an eager load."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 2048))
    path = tmp_path / f"big.{fmt}"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, path) if fmt == "pt" else save_file(sd, str(path))
    size = path.stat().st_size
    del model, sd
    gc.collect()
    before = _current_rss()
    with PeakRSS() as peak:
        loaded = load_model(path, "tests.core.test_scale_io:big_mlp", {})
    if peak.method != "VmHWM":
        pytest.skip(f"the peak mark cannot be reset here (measured by {peak.method})")
    assert loaded.kind == ("state_dict" if fmt == "pt" else "safetensors")
    assert peak.bytes - before <= 1.25 * size  # eager: about 2 x size
    x = torch.randn(3, 2048)
    torch.manual_seed(0)
    expected = big_mlp()(x)  # same seed, same initialisation
    torch.testing.assert_close(loaded.module(x), expected, rtol=0, atol=0)


def big_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 2048))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_bfloat16_weights_stay_bfloat16(tmp_path, fmt):
    from safetensors.torch import save_file

    model = ProbeMLP()
    sd = {k: v.bfloat16() for k, v in model.state_dict().items()}
    path = tmp_path / f"bf16.{fmt}"
    torch.save(sd, path) if fmt == "pt" else save_file(sd, str(path))
    loaded = load_model(path, "tests.core.test_scale_io:ProbeMLP", {})
    params = list(loaded.module.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.numel() * p.element_size() for p in params) == 2 * sum(p.numel() for p in params)
    out = loaded.module(torch.randn(2, 64).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_tied_weights_stay_tied(tmp_path, fmt):
    from safetensors.torch import save_model

    torch.manual_seed(1)
    model = TiedLM()
    path = tmp_path / f"tied.{fmt}"
    torch.save(model.state_dict(), path) if fmt == "pt" else save_model(model, str(path))  # stores the tie once
    loaded = load_model(path, "tests.core.test_scale_io:TiedLM", {}).module
    assert loaded.out.weight is loaded.emb.weight
    assert sum(p.numel() for p in loaded.parameters()) == 50 * 16
    x = torch.randint(0, 50, (4, 7))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_state_reload_is_mapped_and_keeps_ties(tmp_path):
    torch.manual_seed(2)
    state = ModelState(module=TiedLM(), input_shape=(1, 7))
    save_state(state, tmp_path)
    again = load_state(tmp_path, TiedLM).module
    assert again.out.weight is again.emb.weight
    torch.testing.assert_close(again.emb.weight, state.module.emb.weight, rtol=0, atol=0)


class Parametrized(nn.Module):
    """Weight norm both ways (torch.nn.utils.parametrizations and the older hook), spectral norm."""

    def __init__(self):
        super().__init__()
        P = nn.utils.parametrizations
        self.a = P.weight_norm(nn.Linear(64, 32))
        self.b = nn.utils.weight_norm(nn.Linear(32, 32))  # deprecated hook form, still in old checkpoints
        self.c = P.spectral_norm(nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_parametrized_weights_are_folded_into_plain_weights(tmp_path):
    """A weight computed by a parametrization (weight norm, spectral norm) loads as the plain
    weight it computes: the same outputs, bit for bit, and a Linear every stage handles; a
    saved stage state loads back onto a fresh (parametrized) architecture."""
    import warnings

    from torch.nn.utils import parametrize

    warnings.simplefilter("ignore", FutureWarning)  # nn.utils.weight_norm is deprecated
    torch.manual_seed(3)
    model = Parametrized().eval()
    path = tmp_path / "wn.pt"
    torch.save(model.state_dict(), path)
    assert any(".parametrizations." in k for k in model.state_dict()) and "b.weight_g" in model.state_dict()
    loaded = load_model(path, "tests.core.test_scale_io:Parametrized", {}).module
    assert not any(parametrize.is_parametrized(m) for m in loaded.modules())
    assert not any(m._forward_pre_hooks for m in loaded.modules())
    assert sorted(n for n, _ in loaded.named_parameters()) == sorted(
        f"{layer}.{t}" for layer in "abc" for t in ("weight", "bias")
    )
    x = torch.randn(16, 64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    save_state(ModelState(module=loaded, input_shape=(1, 64)), tmp_path / "state")
    again = load_state(tmp_path / "state", Parametrized).module
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------- bad files


def test_bad_safetensors_files_exit_2_naming_the_file(cli, write_recipe, tmp_path):
    from safetensors.torch import save_file

    from compress.zoo import digits_mlp

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(100))
    code, _, err = cli("run", write_recipe(), junk)
    assert code == 2 and str(junk) in err and "not a valid safetensors file" in err

    truncated = tmp_path / "truncated.safetensors"
    save_file({"net.0.weight": torch.ones(32, 64)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    code, _, err = cli("run", write_recipe(), truncated)
    assert code == 2 and str(truncated) in err

    other = tmp_path / "other.safetensors"
    save_file({"net.0.weight": torch.ones(32, 64)}, str(other))
    code, _, err = cli("run", write_recipe(), other)
    assert code == 2 and str(other) in err and "missing keys: net.0.bias" in err

    nan = tmp_path / "nan.safetensors"
    weights = {k: v.contiguous() for k, v in digits_mlp(hidden=(32,)).state_dict().items()}
    weights["net.0.weight"][0, 0] = float("nan")
    save_file(weights, str(nan))
    code, _, err = cli("run", write_recipe(), nan)
    assert code == 2 and str(nan) in err and "NaN" in err


def test_safetensors_runs_through_the_cli(cli, write_recipe, digits_mlp_path, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "digits.safetensors"
    save_file(torch.load(digits_mlp_path), str(path))
    code, stdout, stderr = cli("run", write_recipe(), path, "-o", tmp_path / "out")
    assert code == 0, stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model_kind"] == "safetensors" and report["stages"][0]["accuracy"] > 0.9
    assert "peak RSS" in stdout


def test_a_model_returning_several_outputs_is_refused_with_a_way_out():
    from compress.model_io import check_forward

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(8, 4)

        def forward(self, x):
            return self.l1(x), {"aux": x}

    with pytest.raises(ModelLoadError, match=r"returned tuple\. Name a factory \(model\.factory\) that wraps it"):
        check_forward(TwoHeads(), (1, 8))
