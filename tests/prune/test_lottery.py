"""Lottery tickets with rewinding: tickets match dense, the control does worse, runs resume.

The accuracy claims are checked at one seed (five prune-and-retrain rounds per run); their
median over seeds is ``python benchmarks/prune.py --seeds 3``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import compress.prune.training as prune_training
from compress.prune.config import LotteryConfig
from compress.prune.lottery import CHECKPOINT, _RewindSnapshot, lottery_prune, reinitialize
from compress.train import TrainConfig, fit
from compress.zoo import mnist1d_mlp


def _config(**kw) -> LotteryConfig:
    base = {"method": "lottery", "rounds": 5, "rate": 0.2, "train": TrainConfig(epochs=10, lr=3e-3)}
    return LotteryConfig(**{**base, **kw})


@pytest.mark.slow
def test_five_rounds_match_dense_and_beat_random_reinit(make_ctx, fresh_state):
    model = mnist1d_mlp()
    state = fresh_state(model)
    ctx = make_ctx(model)
    lottery_prune(state, _config(rewind_to=20, control="random_reinit"), ctx)
    rounds = ctx.metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(6))
    # (1 - 0.2)^5 = 0.328 of the pruned layers' weights survive (round to whole weights)
    assert rounds[-1]["density"] == pytest.approx(0.8**5, abs=1e-3)
    assert all(a["density"] > b["density"] for a, b in itertools.pairwise(rounds))
    dense, ticket = rounds[0]["accuracy"], rounds[-1]["accuracy"]
    assert ticket >= dense - 0.01, rounds
    assert ctx.metrics["control"]["accuracy"] < ticket - 0.02, (ctx.metrics["control"], ticket)
    # the ticket is handed on masked, output layer dense
    assert set(state.masks) == {"net.0.weight", "net.2.weight"}
    params = state.parameters_by_name()
    for name, mask in state.masks.items():
        assert torch.all(params[name][~mask] == 0)
    assert state.extras["lottery"]["ticket_density"] == rounds[-1]["density"]


def test_resume_after_interruption_gives_the_same_ticket(make_ctx, fresh_state, tmp_path, monkeypatch):
    cfg = _config(rounds=3, rate=0.3, rewind_to=5, train=TrainConfig(epochs=1, lr=3e-3))
    model = mnist1d_mlp(hidden=(32,))

    full_ctx = make_ctx(model, out_dir=tmp_path / "full")
    full = lottery_prune(fresh_state(model), cfg, full_ctx)

    real = prune_training.finetune
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # dense training and round 1 are done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_training, "finetune", crash_on_third)
    ctx = make_ctx(model, out_dir=tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        lottery_prune(fresh_state(model), cfg, ctx)
    assert (tmp_path / "resumed" / CHECKPOINT).is_file()
    assert not (tmp_path / "resumed" / (CHECKPOINT + ".tmp")).exists()

    calls["n"] = -100  # no more crashes; count the trainings the resumed run needs
    resumed = lottery_prune(fresh_state(model), cfg, ctx)
    assert calls["n"] == -100 + 2  # rounds 2 and 3 only
    assert ctx.metrics["rounds"] == full_ctx.metrics["rounds"]
    for (n, a), (_, b) in zip(full.module.state_dict().items(), resumed.module.state_dict().items()):
        assert torch.equal(a, b), n
    for n in full.masks:
        assert torch.equal(full.masks[n], resumed.masks[n])

    # a finished run re-run with the same config trains nothing
    calls["n"] = -100
    lottery_prune(fresh_state(model), cfg, ctx)
    assert calls["n"] == -100
    # another config starts over
    lottery_prune(fresh_state(model), cfg.model_copy(update={"rounds": 1}), ctx)
    assert calls["n"] == -100 + 2


def test_rewind_snapshot_is_the_weights_after_k_steps(mnist1d):
    cfg = TrainConfig(epochs=1, lr=1e-3, schedule="constant")
    x, y = mnist1d.x[:1024], mnist1d.y[:1024]
    a = reinitialize(mnist1d_mlp(hidden=(16,)), seed=3)
    b = reinitialize(mnist1d_mlp(hidden=(16,)), seed=3)
    snap = _RewindSnapshot(a, 3)
    fit(a, x, y, cfg, after_step=snap)
    fit(b, x, y, cfg, max_steps=3)
    for k, v in b.state_dict().items():
        assert torch.equal(snap.weights[k], v), k


def test_reinitialize_is_seeded_and_leaves_global_rng_alone():
    a = mnist1d_mlp(hidden=(16,))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    reinitialize(a, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = reinitialize(mnist1d_mlp(hidden=(16,)), seed=7)
    c = reinitialize(mnist1d_mlp(hidden=(16,)), seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def test_rewind_past_the_end_is_an_error(make_ctx, fresh_state):
    model = mnist1d_mlp(hidden=(16,))
    with pytest.raises(ValueError, match="rewind_to 10000"):
        lottery_prune(fresh_state(model), _config(rewind_to=10000, train=TrainConfig(epochs=1)), make_ctx(model))
