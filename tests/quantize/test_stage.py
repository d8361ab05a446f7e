"""The quantize stage: registration, schema, what it writes into the state and metrics."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter

from compress.quantize.config import CodebookConfig, GPFQConfig, RTNConfig
from compress.quantize.stage import masks_respected
from compress.registry import stage_config

QuantizeConfig = stage_config("quantize")


def test_registered_with_calibration_need():
    from compress.registry import get_stage

    entry = get_stage("quantize")
    assert entry.needs == ("calibration",)
    assert entry.resolve().__name__ == "apply"


def test_every_schema_field_has_a_description():
    schema = TypeAdapter(QuantizeConfig).json_schema()
    for name, model in schema["$defs"].items():
        if name == "TrainConfig" or "properties" not in model:
            continue
        for field, spec in model["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


@pytest.mark.parametrize(
    "data,cls",
    [
        ({"method": "rtn"}, RTNConfig),
        ({"method": "gpfq", "bits": 3}, GPFQConfig),
        ({"method": "codebook", "bits": 4, "finetune": {"epochs": 1}}, CodebookConfig),
    ],
)
def test_union_dispatches_on_method(data, cls):
    cfg = TypeAdapter(QuantizeConfig).validate_python(data)
    assert isinstance(cfg, cls)
    assert TypeAdapter(QuantizeConfig).validate_python(cfg.model_dump()) == cfg  # round trip


@pytest.mark.parametrize(
    "config",
    [
        RTNConfig(bits=4),
        GPFQConfig(bits=4),
        GPFQConfig(bits=3, granularity="per_group", group_size=32, symmetric=False),
        CodebookConfig(bits=3),
    ],
    ids=["rtn", "gpfq", "gpfq-group-asym", "codebook"],
)
def test_apply_fills_state(trained_models, run_stage, config):
    trained = trained_models["mnist1d_cnn"]
    biases = {n: p.detach().clone() for n, p in trained.model.named_parameters() if n.endswith("bias")}
    state, ctx = run_stage(trained, config)
    weights = {n for n, _ in trained.model.named_parameters() if n.endswith("weight")}
    assert set(state.quant) == weights
    params = dict(state.module.named_parameters())
    for name, qt in state.quant.items():
        assert torch.equal(params[name], qt.dequantize())
        assert qt.method == config.method
    for name, b in biases.items():  # biases stay float (and unchanged without bias correction)
        assert torch.equal(params[name], b)
    report = ctx.metrics["quantize"]
    assert report["method"] == config.method and set(report["layers"]) == {n[: -len(".weight")] for n in weights}
    assert all(info["bits"] == config.bits for info in report["layers"].values())
    assert report["bits_per_weight"] < 8.5


def test_skip_and_layer_bits(trained_models, run_stage):
    trained = trained_models["mnist1d_cnn"]
    cfg = GPFQConfig(bits=4, skip=["features.0"], layer_bits={"head.*": 8})
    state, ctx = run_stage(trained, cfg)
    assert "features.0.weight" not in state.quant
    assert torch.equal(dict(state.module.named_parameters())["features.0.weight"], trained.model.features[0].weight)
    assert state.quant["head.0.weight"].bits == 8 and state.quant["features.2.weight"].bits == 4
    assert ctx.metrics["quantize"]["float_layers"] == ["features.0"]


@pytest.mark.parametrize(
    "config", [RTNConfig(bits=3), GPFQConfig(bits=3), CodebookConfig(bits=3)], ids=["rtn", "gpfq", "codebook"]
)
def test_masks_are_respected(trained_models, run_stage, config):
    trained = trained_models["digits_mlp"]
    g = torch.Generator().manual_seed(0)
    masks = {
        n: torch.rand(p.shape, generator=g) > 0.5 for n, p in trained.model.named_parameters() if n.endswith("weight")
    }
    state, _ = run_stage(trained, config, masks)
    assert masks_respected(state)
    for name, mask in masks.items():
        assert (dict(state.module.named_parameters())[name][~mask] == 0).all()
