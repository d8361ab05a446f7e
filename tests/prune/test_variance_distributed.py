"""Variance pruning under ``--nproc``: each process takes a share of the calibration data and
the moments are merged exactly, so the pruned neurons are those of a one-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compress.prune.variance import (
    RunningMoments,
    collect_statistics,
    find_mlp_blocks,
    merge_across_ranks,
    neuron_scores,
    select_pruned,
    variance_prune,
)
from compress.testing import run_cli
from tests.conftest import DIGITS_RECIPE

ROOT = Path(__file__).resolve().parents[2]


def _model_and_batches():
    """mnist1d_mlp (two MLP blocks, 256 + 256 hidden neurons), seeded, and 7 uneven batches."""
    from compress.testing import builtin_dataset
    from compress.zoo import mnist1d_mlp

    torch.manual_seed(0)
    model = mnist1d_mlp().eval()
    x = builtin_dataset("mnist1d").x[:900]
    return model, [x[i : i + 128] for i in range(0, len(x), 128)]  # 7 batches, the last one short


def _prune(amount: float = 0.5) -> dict:
    model, batches = _model_and_batches()
    blocks = find_mlp_blocks(model)
    stats = collect_statistics(model, blocks, batches)
    removed = select_pruned(neuron_scores(model, blocks, stats, "variance"), amount)
    report = variance_prune(model, batches, amount)
    return {
        "removed": {b.first: removed[b] for b in blocks},
        "mean": {b.first: stats[b].post.mean for b in blocks},
        "variance": {b.first: stats[b].post.variance for b in blocks},
        "samples": report["calibration_samples"],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_prune(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_processes_prune_the_neurons_one_process_prunes(tmp_path, world):
    one = _prune()
    init = f"file://{tmp_path / 'pg'}"
    mp.spawn(_worker, args=(world, init, str(tmp_path / "out")), nprocs=world, join=True)
    runs = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=True) for r in range(world)]
    for run in runs:
        assert run["samples"] == one["samples"] == 900  # all the data, not a shard of it
        for name, mask in one["removed"].items():
            assert torch.equal(run["removed"][name], mask), name  # the same neurons, bit for bit
            assert mask.sum() > 0
            torch.testing.assert_close(run["mean"][name], one["mean"][name], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(run["variance"][name], one["variance"][name], rtol=1e-12, atol=1e-15)
        assert run["state"].keys() == one["state"].keys()
        for k, v in one["state"].items():
            torch.testing.assert_close(run["state"][k], v, rtol=1e-6, atol=1e-7)  # the mean fold: float32


def test_one_process_merge_is_a_no_op():
    m = RunningMoments()
    m.update(torch.randn(10, 4))
    mean, m2 = m.mean.clone(), m.m2.clone()
    merge_across_ranks([m], [4])
    assert m.n == 10 and torch.equal(m.mean, mean) and torch.equal(m.m2, m2)


def test_chan_merge_of_shares_equals_one_stream():
    """What the ranks' merge computes: shares merged in order equal the moments of one stream."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(300, 6, generator=g, dtype=torch.float64) * 5 + 1e4
    whole = RunningMoments()
    for i in range(0, 300, 50):
        whole.update(data[i : i + 50])
    parts = [RunningMoments(), RunningMoments(), RunningMoments()]  # the third rank saw nothing
    for i in range(0, 150, 50):
        parts[0].update(data[i : i + 50])
    for i in range(150, 300, 50):
        parts[1].update(data[i : i + 50])
    merged = RunningMoments()
    for p in parts:
        if p.n:
            merged.merge(p.n, p.mean, p.m2)
    assert merged.n == 300
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(merged.variance, whole.variance, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.variance, data.var(0, unbiased=False), rtol=1e-9, atol=0)


@pytest.mark.slow
def test_nproc_2_variance_stage_matches_one_process(tmp_path, digits_mlp_path):
    recipe = tmp_path / "variance.yaml"
    recipe.write_text(
        DIGITS_RECIPE.format(stages="  - prune: {method: variance, amount: 0.4}", gates="  {}").replace(
            "  eval:", "  calibration: {source: digits, split: train, batch_size: 100}\n  eval:"
        )
    )
    one = run_cli(recipe, digits_mlp_path, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = run_cli(recipe, digits_mlp_path, tmp_path / "two", "--nproc", "2")
    assert two.returncode == 0, two.stderr
    r1, r2 = json.loads(one.stdout)["stages"][-1], json.loads(two.stdout)["stages"][-1]
    assert r1["metrics"]["blocks"] == r2["metrics"]["blocks"]
    assert r1["metrics"]["calibration_samples"] == r2["metrics"]["calibration_samples"]
    assert r1["parameters"] == r2["parameters"] and r1["accuracy"] == r2["accuracy"]
    w1 = torch.load(tmp_path / "one" / "stages" / "01-prune" / "model.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "stages" / "01-prune" / "model.pt", weights_only=True)
    for k, v in w1.items():
        torch.testing.assert_close(w2[k], v, rtol=1e-6, atol=1e-7)
