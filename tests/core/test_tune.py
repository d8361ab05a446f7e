"""compress tune: the knapsack, sensitivity, the search end to end on a tiny model, the
written recipe's exact reproduction, and a goal nobody meets."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from compress.tune.allocate import ChoiceTable, _greedy, allocate

TUNE_RECIPE = """\
version: 1
model:
  factory: compress.zoo:digits_mlp
  kwargs: {{hidden: [32]}}
  input_shape: [1, 64]
data:
  train: {{source: digits, split: train}}
  eval: {{source: digits, split: test}}
stages:
  - quantize: {{method: gpfq, bits: 4}}
  - compress: {{}}
gates:
{gates}
search:
  bits: [2, 4, 8, float]
  budget: {{candidates: {candidates}}}
"""


def _random_table(seed: int, layers: int = 4, choices: int = 4) -> ChoiceTable:
    rng = np.random.default_rng(seed)
    # Fewer bits: cheaper and more divergent, as in real tables (with noise, so not sorted).
    cost = np.sort(rng.uniform(1, 100, (layers, choices)), axis=1)
    div = np.sort(rng.uniform(0, 1, (layers, choices)), axis=1)[:, ::-1].copy()
    div[:, -1] = 0.0  # the costliest choice (float) is exact
    return ChoiceTable([f"l{i}" for i in range(layers)], [str(c) for c in range(choices)], div, cost)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_exact_knapsack_optimum(seed):
    table = _random_table(seed)
    rows = np.arange(len(table.layers))
    for budget in (0.0, 0.3, 0.8, 1.5, 4.0):
        best = min(
            (
                table.cost[rows, list(p)].sum()
                for p in itertools.product(range(4), repeat=4)
                if table.divergence[rows, list(p)].sum() <= budget + 1e-12
            ),
        )
        picks = allocate(table, budget)
        div, cost = table.total(picks)
        assert div <= budget + 1e-9
        assert cost == pytest.approx(best, rel=1e-9)
        greedy = _greedy(table.divergence, table.cost, np.ones_like(table.cost, bool), budget)
        g_div, g_cost = table.total(greedy)
        assert g_div <= budget + 1e-9 and g_cost >= best - 1e-9  # feasible, never better than exact


def test_allocation_without_a_feasible_choice_is_none():
    table = ChoiceTable(["a"], ["2", "4"], np.array([[0.5, 0.2]]), np.array([[1.0, 2.0]]))
    assert allocate(table, 0.1) is None
    assert allocate(table, 0.2) == [1]
    assert allocate(table, 0.5) == [0]


def test_search_section_is_validated_with_file_and_line(tmp_path):
    from compress.errors import RecipeError
    from compress.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.01", candidates=4).replace(
            "bits: [2, 4, 8, float]", "bits: [2, 16]"
        )
    )
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: search\.bits.*1\.\.8"):
        load_recipe(path)
    path.write_text(TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.01", candidates=4).replace("budget:", "budgt:"))
    with pytest.raises(RecipeError, match="did you mean 'budget'"):
        load_recipe(path)


def test_sensitivity_grows_as_bits_shrink_and_restores_the_model(digits_mlp_path):
    import torch

    from compress.data import DataBundle, load_split
    from compress.model_io import load_model
    from compress.quantize.config import GPFQConfig
    from compress.recipe import parse_recipe
    from compress.state import ModelState
    from compress.tune.sensitivity import measure

    recipe = parse_recipe(TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.01", candidates=4))
    loaded = load_model(digits_mlp_path, "compress.zoo:digits_mlp", {"hidden": [32]})
    data = DataBundle({n: load_split(n, s, Path.cwd(), (1, 64)) for n, s in recipe.doc.data.splits()})
    state = ModelState(module=loaded.rebuild(), input_shape=(1, 64))
    state.module.load_state_dict(loaded.module.state_dict())
    before = {k: v.clone() for k, v in state.module.state_dict().items()}
    table = measure(state, GPFQConfig(), ["net.0", "net.2"], [2, 4, 8, "float"], data, loaded.module, 0, 256, "kl")
    for layer in ("net.0", "net.2"):
        row = table[layer]
        assert row["float"]["divergence"] == 0.0
        assert row["2"]["divergence"] > row["4"]["divergence"] > row["8"]["divergence"] >= 0
        assert row["2"]["packed_size"] < row["4"]["packed_size"] < row["8"]["packed_size"] < row["float"]["packed_size"]
        assert row["2"]["onnx_size"] == pytest.approx(row["4"]["onnx_size"])  # both in 4-bit containers
    after = state.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not state.quant


# One search (7 candidates through quantize and the lossless stage) shared by the slow tests below.
@pytest.fixture(scope="module")
def tuned(tmp_path_factory, digits_mlp_path):
    from compress.recipe import load_recipe
    from compress.tune.search import tune

    root = tmp_path_factory.mktemp("tune")
    path = root / "recipe.yaml"
    path.write_text(TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.01", candidates=7))
    return tune(load_recipe(path), digits_mlp_path, root / "out")


@pytest.mark.slow
def test_search_finds_a_model_no_larger_than_the_best_uniform_one(tuned):
    report = tuned.report
    assert tuned.passed and tuned.chosen is not None
    assert 0 < report["candidates_run"] <= 7
    baselines = [c for c in tuned.candidates if c.kind == "baseline"]
    assert sorted({next(iter(c.layer_bits.values())) for c in baselines}) == [2, 4, 8]
    passing = [c.metrics["packed_size"] for c in baselines if c.passed]
    assert passing and tuned.chosen.metrics["packed_size"] <= min(passing)
    drop = tuned.chosen.metrics["input_accuracy"] - tuned.chosen.metrics["accuracy"]
    assert drop <= 0.01 + 1e-12
    # Every candidate went through the real stages: its packed size is the lossless stage's artifact.
    assert all(c.metrics["packed_size"] > 0 for c in tuned.candidates if c.error is None)
    saved = json.loads((tuned.out_dir / "search.json").read_text())
    assert saved["chosen"]["id"] == tuned.chosen.id and len(saved["candidates"]) == len(tuned.candidates)
    assert {row["layer"] for row in saved["layers"]} == {"net.0", "net.2"}


@pytest.mark.slow
def test_tuned_recipe_is_plain_and_reproduces_the_metrics_exactly(tuned, digits_mlp_path, tmp_path):
    import yaml

    from compress.pipeline import run
    from compress.recipe import load_recipe
    from compress.tune.search import summarize

    assert tuned.recipe_path.name == "recipe.tuned.yaml"
    doc = yaml.safe_load(tuned.recipe_path.read_text())
    assert "search" not in doc
    quant = doc["stages"][0]["quantize"]
    chosen = tuned.chosen.layer_bits
    for layer, bits in chosen.items():
        if bits == "float":
            assert layer in quant["skip"]
        else:
            assert quant["layer_bits"][layer] == bits  # spelled out per layer
    assert tuned.report["tuned_run"]["reproduced"] is True
    again = summarize(run(load_recipe(tuned.recipe_path), digits_mlp_path, tmp_path / "rerun").report)
    for key in ("accuracy", "agreement", "cosine", "packed_size", "weight_bits"):
        assert again[key] == tuned.chosen.metrics[key], key


@pytest.mark.slow
def test_sensitivity_is_cached(tuned, digits_mlp_path, caplog, tmp_path):
    import shutil

    from compress.recipe import load_recipe
    from compress.tune.config import SearchSpec
    from compress.tune.search import tune

    shutil.copytree(tuned.out_dir / "sensitivity", tmp_path / "out" / "sensitivity")
    recipe_path = tuned.recipe_path.parents[1] / "recipe.yaml"
    spec = SearchSpec(bits=[2, 4, 8, "float"], baselines=False, budget={"candidates": 1})
    with caplog.at_level("INFO", logger="compress.tune.search"):
        again = tune(load_recipe(recipe_path), digits_mlp_path, tmp_path / "out", spec=spec)
    assert any("reused" in r.getMessage() for r in caplog.records)
    assert again.report["sensitivity"] == tuned.report["sensitivity"]


@pytest.mark.slow
def test_tune_report_is_self_contained_with_the_tradeoff(tuned):
    page = (tuned.out_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 1
    for forbidden in ("http://", "https://", "<script", "<link", "src="):
        assert forbidden not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for text in ("Pareto front", "uniform bits", "chosen", "net.0", "Trade-off"):
        assert text in page


def test_a_goal_nobody_meets_exits_1_with_the_best_candidate_and_the_distance(cli, tmp_path, digits_mlp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        TUNE_RECIPE.format(gates="  min_accuracy: 0.999", candidates=2).replace("[2, 4, 8, float]", "[4, float]")
    )
    code, out, err = cli("tune", path, digits_mlp_path, "-o", tmp_path / "out")
    assert code == 1, err
    assert "no candidate passes" in out and "best: candidate" in out
    line = next(t for t in out.splitlines() if t.startswith("FAILED min_accuracy"))
    measured = float(line.split("measured ")[1].split("%")[0]) / 100
    missed = float(line.split("missed by ")[1].split(" pt")[0]) / 100
    assert missed == pytest.approx(0.999 - measured, abs=1e-4)
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    assert not report["passed"] and report["missed_gates"][0]["gate"] == "min_accuracy"
    assert (tmp_path / "out" / "recipe.best.yaml").is_file() and (tmp_path / "out" / "report.html").is_file()


def test_tune_refuses_a_recipe_without_quantize_or_gates(cli, tmp_path, digits_mlp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.01", candidates=3).replace(
            "  - quantize: {method: gpfq, bits: 4}\n", ""
        )
    )
    code, _, err = cli("tune", path, digits_mlp_path, "-o", tmp_path / "out")
    assert code == 2 and "quantize stage" in err
    path.write_text(TUNE_RECIPE.format(gates="  {}", candidates=3))
    code, _, err = cli("tune", path, digits_mlp_path, "-o", tmp_path / "out")
    assert code == 2 and "needs gates" in err
    path.write_text(
        TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.01", candidates=3).replace(
            "bits: [2, 4, 8, float]", "bits: [2]\n  methods: [gpfqq]"
        )
    )
    code, _, err = cli("tune", path, digits_mlp_path, "-o", tmp_path / "out")
    assert code == 2 and "unknown quantize method 'gpfqq'" in err


def test_gate_lines_carry_units():
    from compress.report import gate_line

    assert (
        gate_line({"gate": "max_latency_ms", "measured": 0.026905, "limit": 5, "passed": True})
        == "PASS max_latency_ms: measured 0.0269 ms, limit 5 ms"
    )
    assert (
        gate_line({"gate": "max_accuracy_drop", "measured": 0.004, "limit": 0.01, "passed": True})
        == "PASS max_accuracy_drop: measured 0.4 pt, limit 1 pt"
    )
    assert "29,493 B" in gate_line({"gate": "max_size_bytes", "measured": 29493, "limit": 30000, "passed": True})
    assert "n/a" in gate_line({"gate": "min_cosine", "measured": math.nan, "limit": 0.9, "passed": False})


def test_a_candidate_whose_stage_fails_is_recorded_and_the_search_goes_on(tmp_path, digits_mlp_path, monkeypatch):
    import compress.pipeline
    from compress.errors import StageError
    from compress.recipe import load_recipe
    from compress.tune.search import tune

    real_run, calls = compress.pipeline.run, []

    def flaky_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise StageError("stage 1 (quantize) failed: RuntimeError: simulated")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(compress.pipeline, "run", flaky_run)
    path = tmp_path / "r.yaml"
    path.write_text(
        TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.05", candidates=2).replace("[2, 4, 8, float]", "[4, 8, float]")
    )
    result = tune(load_recipe(path), digits_mlp_path, tmp_path / "out")
    first, second = result.candidates
    assert first.error and "simulated" in first.error and not first.passed
    assert second.error is None and second.passed and result.chosen is second


def test_bad_values_in_the_search_options_exit_2(cli, tmp_path, digits_mlp_path):
    path = tmp_path / "r.yaml"
    text = TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.01", candidates=2)
    path.write_text(
        text.replace("bits: [2, 4, 8, float]", "bits: [4]\n  options: {granularity: [per_channel, diagonal]}")
    )
    code, _, err = cli("tune", path, digits_mlp_path, "-o", tmp_path / "out")
    assert code == 2 and "granularity" in err and "diagonal" in err
    path.write_text(text.replace("bits: [2, 4, 8, float]", "bits: [4]\n  options: {bits: [2]}"))
    code, _, err = cli("tune", path, digits_mlp_path, "-o", tmp_path / "out")
    assert code == 2 and "search.bits" in err


def test_written_recipe_spells_out_layers_and_keeps_data_paths_valid(tmp_path):
    import yaml

    from compress.recipe import load_recipe
    from compress.tune.config import SearchSpec
    from compress.tune.search import Candidate, _plan, candidate_yaml

    src, dst = tmp_path / "a", tmp_path / "b" / "out"
    src.mkdir()
    dst.mkdir(parents=True)
    np.savez(src / "data.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    text = TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.01", candidates=2).replace(
        "eval: {source: digits, split: test}", "eval: {source: file, path: data.npz}"
    )
    (src / "r.yaml").write_text(text)
    plan = _plan(load_recipe(src / "r.yaml"), SearchSpec(bits=[2, 4, "float"]))
    cand = Candidate(
        id=3,
        kind="search",
        variant="gpfq",
        sparsity=None,
        method="gpfq",
        options={},
        layer_bits={"net.0": 2, "net.2": "float"},
        proxy_divergence=0.1,
        estimated_bytes=1.0,
    )
    (dst / "recipe.tuned.yaml").write_text(candidate_yaml(plan, cand, dst, tuned=True))
    written = load_recipe(dst / "recipe.tuned.yaml")
    assert written.doc.search is None and written.name.endswith("-tuned")
    assert (dst / written.doc.data.eval.path).resolve() == (src / "data.npz").resolve()
    quant = yaml.safe_load((dst / "recipe.tuned.yaml").read_text())["stages"][0]["quantize"]
    assert quant["bits"] == 2 and quant["layer_bits"] == {"net.0": 2} and quant["skip"] == ["net.2"]


def test_options_become_variants_of_their_own(tmp_path, digits_mlp_path):
    from compress.recipe import load_recipe
    from compress.tune.search import tune

    path = tmp_path / "r.yaml"
    path.write_text(
        TUNE_RECIPE.format(gates="  max_accuracy_drop: 0.05", candidates=2).replace(
            "bits: [2, 4, 8, float]", "bits: [4, float]\n  options: {granularity: [per_channel, per_tensor]}"
        )
    )
    result = tune(load_recipe(path), digits_mlp_path, tmp_path / "out")
    assert sorted(result.report["sensitivity"]) == ["gpfq, granularity=per_channel", "gpfq, granularity=per_tensor"]
    assert {c.variant for c in result.candidates} == set(result.report["sensitivity"])
    assert all(c.options["granularity"] in ("per_channel", "per_tensor") for c in result.candidates)
