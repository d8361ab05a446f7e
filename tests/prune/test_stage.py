"""The prune stage: registration, config parsing, dispatch, size report, ONNX shrinkage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from compress.prune.config import LotteryConfig, MagnitudeConfig, VarianceConfig
from compress.prune.stage import apply, size_metrics
from compress.registry import get_stage, stage_config
from compress.train import TrainConfig

PruneConfig = stage_config("prune")

SIZE_KEYS = {"parameters", "nonzeros", "sparsity", "dense_bytes"}


def test_registered_with_its_union_and_needs():
    entry = get_stage("prune")
    assert entry.apply_path == "compress.prune.stage:apply"
    assert entry.needs == ("train", "calibration")
    adapter = TypeAdapter(entry.config)
    assert isinstance(adapter.validate_python({"method": "magnitude", "amount": 0.5}), MagnitudeConfig)
    assert isinstance(adapter.validate_python({"method": "variance", "amount": 0.5}), VarianceConfig)
    lot = adapter.validate_python({"method": "lottery", "train": {"epochs": 2}})
    assert isinstance(lot, LotteryConfig) and lot.train.epochs == 2


def test_schema_describes_every_field():
    schema = TypeAdapter(PruneConfig).json_schema()
    defs = schema["$defs"]
    for name in ("MagnitudeConfig", "VarianceConfig", "LotteryConfig"):
        for field, prop in defs[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"method": "random", "amount": 0.5}, "magnitude.*variance.*lottery"),
        ({"method": "variance", "amount": 0.5, "statistic": "l1"}, "pre_activation_variance"),
        ({"method": "variance", "amount": 0.5, "blocks": [["a"]]}, "blocks"),
        ({"method": "lottery", "rate": 1.5}, "rate"),
        ({"method": "magnitude", "amount": 0.5, "finetune": {"epoch": 1}}, "epoch"),
    ],
)
def test_bad_configs_name_the_value(raw, match):
    with pytest.raises(ValidationError, match=match):
        TypeAdapter(PruneConfig).validate_python(raw)


def test_magnitude_stage_sets_masks_and_reports_size(trained_mlp, make_ctx, fresh_state):
    state = fresh_state(trained_mlp)
    ctx = make_ctx(trained_mlp)
    state = apply(state, MagnitudeConfig(method="magnitude", amount=0.5, skip=[]), ctx)
    assert set(ctx.metrics) >= SIZE_KEYS
    params = sum(p.numel() for p in trained_mlp.parameters())
    assert ctx.metrics["parameters"] == params  # masks do not shrink the dense model
    assert ctx.metrics["dense_bytes"] == 4 * params
    weights = sum(p.numel() for n, p in trained_mlp.named_parameters() if n.endswith("weight"))
    assert params - ctx.metrics["nonzeros"] >= round(0.5 * weights)
    assert ctx.metrics["sparsity"] == pytest.approx(1 - ctx.metrics["nonzeros"] / params)
    assert set(state.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert ctx.metrics["accuracy_before"] > ctx.metrics["accuracy_after"] - 0.05
    assert state.extras["prune"]["method"] == "magnitude"


def test_variance_stage_shrinks_model_and_onnx(trained_cnn, make_ctx, fresh_state, tmp_path, mnist1d):
    ort = pytest.importorskip("onnxruntime")
    state = fresh_state(trained_cnn)
    ctx = make_ctx(trained_cnn, calibration=1024)
    cfg = VarianceConfig(method="variance", amount=0.5, finetune=TrainConfig(epochs=1, lr=5e-4))
    state = apply(state, cfg, ctx)
    assert ctx.metrics["parameters"] < ctx.metrics["before"]["parameters"]
    assert ctx.metrics["neurons_removed"] == 64
    assert ctx.metrics["calibration_samples"] == 1024
    assert state.module.head[0].out_features == 64
    assert ctx.metrics["accuracy_finetuned"] is not None

    x = mnist1d.x_eval[:64]
    sizes = {}
    for label, model in (("dense", trained_cnn), ("pruned", state.module)):
        path = tmp_path / f"{label}.onnx"
        torch.onnx.export(
            model.eval(),
            (x[:1],),
            str(path),
            opset_version=18,
            dynamo=False,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
        sizes[label] = path.stat().st_size
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    removed_bytes = 4 * (ctx.metrics["before"]["parameters"] - ctx.metrics["parameters"])
    assert sizes["dense"] - sizes["pruned"] == pytest.approx(removed_bytes, rel=0.05)


def test_lottery_stage_hands_on_a_masked_ticket(make_ctx, fresh_state):
    from compress.zoo import mnist1d_mlp

    model = mnist1d_mlp(hidden=(32,))
    state = fresh_state(model)
    ctx = make_ctx(model)
    cfg = LotteryConfig(method="lottery", rounds=2, rate=0.5, train=TrainConfig(epochs=1, lr=3e-3))
    state = apply(state, cfg, ctx)
    assert set(state.masks) == {"net.0.weight"}  # the output layer stays dense
    assert float(state.masks["net.0.weight"].float().mean()) == pytest.approx(0.25, abs=1e-3)
    assert len(ctx.metrics["rounds"]) == 3
    assert ctx.metrics["nonzeros"] <= ctx.metrics["parameters"] - int(0.75 * 32 * 40)
    assert size_metrics(state.module)["nonzeros"] == ctx.metrics["nonzeros"]


def test_pipeline_runs_prune_then_export(write_recipe, digits_mlp_path, tmp_path):
    from compress.pipeline import run
    from compress.recipe import load_recipe

    stages = "  - prune: {method: variance, amount: 0.25}\n  - export: {latency_runs: 5, exporter: legacy}"
    result = run(load_recipe(write_recipe(stages=stages)), digits_mlp_path, tmp_path / "out")
    rows = {r["stage"]: r for r in result.report["stages"]}
    # digits_mlp(32): 64*32+32 + 32*10+10 = 2410 parameters; 8 of 32 neurons go: 8 * (64+1+10)
    assert rows["input"]["parameters"] == 2410
    assert rows["prune"]["parameters"] == 2410 - 8 * 75
    assert rows["export"]["parameters"] == rows["prune"]["parameters"]
    assert rows["prune"]["agreement"] > 0.9


def test_registering_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, prune; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
