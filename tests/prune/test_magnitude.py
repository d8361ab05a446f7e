"""Magnitude pruning: masks, the cubic schedule, fine-tuning with masks enforced."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.utils.prune as tprune
from pydantic import ValidationError

from compress.metrics import evaluate
from compress.prune.config import MagnitudeConfig
from compress.prune.magnitude import (
    cubic_sparsity,
    default_skip,
    magnitude_masks,
    magnitude_prune,
    prunable_layers,
    select_weights,
    sparsity_table,
    table_sparsity,
)
from compress.train import TrainConfig


def _torch_masks(model, names, amount, scope):
    """What torch.nn.utils.prune selects for the same weights."""
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    pairs = [(mods[n.rsplit(".", 1)[0]], "weight") for n in names]
    if scope == "global":
        tprune.global_unstructured(pairs, pruning_method=tprune.L1Unstructured, amount=amount)
    else:
        for m, p in pairs:
            tprune.l1_unstructured(m, p, amount=amount)
    return {n: m.weight_mask.bool() for n, (m, _) in zip(names, pairs)}


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("amount", [0.3, 0.8, 0.95])
@pytest.mark.parametrize("model_name", ["trained_mlp", "trained_cnn"])
def test_masks_identical_to_torch_prune(request, model_name, scope, amount):
    model = request.getfixturevalue(model_name)
    names, _ = select_weights(model, [])  # every conv/linear layer
    params = dict(model.named_parameters())
    ours = magnitude_masks({n: params[n] for n in names}, amount, scope)
    theirs = _torch_masks(model, names, amount, scope)
    for n in names:
        assert torch.equal(ours[n], theirs[n]), n


def test_global_80_with_short_finetune_stays_within_one_point(trained_mlp, make_ctx, fresh_state, mnist1d):
    dense = evaluate(trained_mlp, mnist1d.x_eval, mnist1d.y_eval)["accuracy"]
    state = fresh_state(trained_mlp)
    ctx = make_ctx(trained_mlp)
    cfg = MagnitudeConfig(method="magnitude", amount=0.8, finetune=TrainConfig(epochs=2, lr=5e-4))
    magnitude_prune(state, cfg, ctx)
    acc = ctx.metrics["accuracy_finetuned"]
    assert acc >= dense - 0.01, (dense, ctx.metrics["accuracy_pruned"], acc)
    # pruned weights are exactly zero after fine-tuning, and the masks cover the pruned layers
    params = state.parameters_by_name()
    assert set(state.masks) == {"net.2.weight"}  # first and last layer dense by default
    for name, mask in state.masks.items():
        assert torch.all(params[name][~mask] == 0), name
    # the table adds up to the global figures
    rows = ctx.metrics["layers"]
    assert [r["name"] for r in rows] == ["net.0.weight", "net.2.weight", "net.4.weight"]
    total = sum(r["params"] for r in rows)
    assert ctx.metrics["weight_sparsity"] == pytest.approx(sum(r["pruned"] for r in rows) / total, abs=1e-12)
    pruned_rows = [r for r in rows if not r["skipped"]]
    assert ctx.metrics["pruned_layers_sparsity"] == pytest.approx(
        round(0.8 * sum(r["params"] for r in pruned_rows)) / sum(r["params"] for r in pruned_rows), abs=1e-12
    )
    zeros = sum(int((p == 0).sum()) for n, p in params.items() if n.endswith("weight"))
    assert zeros >= sum(r["pruned"] for r in rows)


def test_global_scope_all_layers_table_matches_global_amount(trained_cnn):
    names, skipped = select_weights(trained_cnn, [])
    params = dict(trained_cnn.named_parameters())
    masks = magnitude_masks({n: params[n] for n in names}, 0.7, "global")
    rows = sparsity_table(trained_cnn, masks, skipped)
    total = sum(r["params"] for r in rows)
    assert sum(r["pruned"] for r in rows) == round(0.7 * total)
    assert table_sparsity(rows) == pytest.approx(round(0.7 * total) / total)
    # global scope prunes layers unevenly; layer scope evenly
    assert len({round(r["sparsity"], 2) for r in rows}) > 1
    layer = magnitude_masks({n: params[n] for n in names}, 0.7, "layer")
    for _n, m in layer.items():
        assert int((~m).sum()) == round(0.7 * m.numel())


def test_layer_cap_limits_every_layer_and_keeps_the_total(trained_cnn):
    names, _ = select_weights(trained_cnn, [])
    params = dict(trained_cnn.named_parameters())
    weights = {n: params[n] for n in names}
    uncapped = magnitude_masks(weights, 0.8, "global")
    assert max(float((~m).float().mean()) for m in uncapped.values()) > 0.82
    capped = magnitude_masks(weights, 0.8, "global", max_layer_sparsity=0.82)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in capped.values()) == round(0.8 * total)
    for n, m in capped.items():
        assert float((~m).float().mean()) <= 0.82 + 1e-9, n
    with pytest.raises(ValueError, match="unreachable"):
        magnitude_masks(weights, 0.9, "global", max_layer_sparsity=0.5)


def test_prior_masks_stay_pruned(trained_mlp):
    params = dict(trained_mlp.named_parameters())
    w = {"net.2.weight": params["net.2.weight"]}
    first = magnitude_masks(w, 0.5, "global")
    # with different weights, earlier pruned entries still count as pruned
    shuffled = {"net.2.weight": torch.randn_like(params["net.2.weight"])}
    second = magnitude_masks(shuffled, 0.7, "global", prior=first)
    assert not torch.any(second["net.2.weight"] & ~first["net.2.weight"])
    assert int((~second["net.2.weight"]).sum()) == round(0.7 * w["net.2.weight"].numel())


def test_skip_defaults_and_globs(trained_cnn):
    layers = [n for n, _ in prunable_layers(trained_cnn)]
    assert layers == ["features.0", "features.2", "features.4", "head.0", "head.2"]
    assert default_skip(trained_cnn, "first_last") == ["features.0", "head.2"]
    pruned, skipped = select_weights(trained_cnn, ["head.*"])
    assert skipped == ["head.0.weight", "head.2.weight"]
    assert pruned == ["features.0.weight", "features.2.weight", "features.4.weight"]
    pruned, skipped = select_weights(trained_cnn, ["features.2.weight"])
    assert skipped == ["features.2.weight"]


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.0, 0.8, 0, 100) == 0.0
    assert cubic_sparsity(100, 0.0, 0.8, 0, 100) == pytest.approx(0.8)
    assert cubic_sparsity(500, 0.0, 0.8, 0, 100) == pytest.approx(0.8)
    assert cubic_sparsity(50, 0.1, 0.8, 0, 100) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**3)
    assert cubic_sparsity(10, 0.2, 0.8, 20, 100) == pytest.approx(0.2)  # before t0
    values = [cubic_sparsity(t, 0.0, 0.9, 0, 100) for t in range(0, 101, 10)]
    assert values == sorted(values)
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert steps == sorted(steps, reverse=True)  # prunes fast first, then slows down


def test_gradual_schedule_reaches_target_and_keeps_zeros(trained_mlp, make_ctx, fresh_state):
    state = fresh_state(trained_mlp)
    ctx = make_ctx(trained_mlp)
    cfg = MagnitudeConfig(
        method="magnitude", amount=0.9, schedule="gradual", frequency=5, finetune=TrainConfig(epochs=2, lr=5e-4)
    )
    magnitude_prune(state, cfg, ctx)
    mask = state.masks["net.2.weight"]
    assert int((~mask).sum()) == round(0.9 * mask.numel())
    assert torch.all(state.module.net[2].weight[~mask] == 0)
    # 64 steps, ramp to 48: updates at 0, 5, ..., 45
    assert ctx.metrics["schedule_updates"] == 10
    assert ctx.metrics["accuracy_finetuned"] > 0.5


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"amount": 1.0}, "less than 1"),
        ({"amount": 0.5, "scope": "row"}, "layer"),
        ({"amount": 0.5, "schedule": "gradual"}, "finetune"),
        ({"amount": 0.5, "extra_key": 1}, "Extra inputs"),
    ],
)
def test_config_errors(bad, match):
    with pytest.raises(ValidationError, match=match):
        MagnitudeConfig(method="magnitude", **bad)


def test_bad_scope_names_allowed_values(trained_mlp):
    with pytest.raises(ValueError, match="allowed: layer, global"):
        magnitude_masks({"w": trained_mlp.net[0].weight}, 0.5, "rows")
