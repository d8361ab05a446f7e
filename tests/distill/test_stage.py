"""The distill stage: config validation, every method through ``apply``, the registry and a pipeline run."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from compress.qtensor import CodebookTensor
from compress.registry import stage_config

DistillConfig = stage_config("distill")


HALF = {"student": "compress.zoo:mnist1d_cnn", "student_kwargs": {"channels": 16, "hidden": 64}}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"method": "kd", "student": "resnet"}, "student 'resnet' is not one of 'same', 'input'"),
        ({"method": "kd", "student": "same", "student_kwargs": {"a": 1}}, "student_kwargs are only used"),
        ({"method": "quantized", "bits": 1}, "bits must be between 2 and 8, got 1"),
        ({"method": "quantized", "rounding": "nearest"}, "'deterministic' or 'stochastic'"),
        ({"method": "kd", "alpha": 0, "mixup": 1}, "need the teacher"),
        ({"method": "differentiable_quantization", "student": "same"}, "set 'pretrain'"),
        ({"method": "differentiable_quantization", "bit_budget": 9}, "bit_budget 9.0 must lie between"),
        ({"method": "born_again", "variant": "bane"}, "'ban', 'ban_l', 'cwtm' or 'dkpp'"),
        ({"method": "born_again", "epochs": 3}, "Extra inputs are not permitted"),
        ({"method": "distil"}, "does not match any of the expected tags"),
    ],
)
def test_bad_configs_name_the_value(config, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        TypeAdapter(DistillConfig).validate_python(config)


def test_registered_stage():
    from compress.registry import get_stage

    entry = get_stage("distill")
    assert entry.needs == ("train",) and entry.apply_path == "compress.distill.stage:apply"


def _teacher_untouched(entering, teacher):
    return all(torch.equal(a, b) for a, b in zip(entering.parameters(), teacher.parameters()))


def test_kd_student_from_factory(run_distill, teacher):
    state, ctx, entering = run_distill({"method": "kd", **HALF, "train": {"epochs": 1}}, train_samples=512)
    assert state.module is not entering and _teacher_untouched(entering, teacher)
    assert state.module.features[0].out_channels == 16 and state.quant == {}
    m = ctx.metrics
    assert m["teacher_accuracy"] == pytest.approx(0.949)
    assert m["student_parameters"] < 13_000 and m["student_size_bytes"] == 4 * m["student_parameters"]
    assert 0 <= m["student_accuracy"] <= 1


def test_same_student_is_a_seeded_fresh_init(teacher):
    from compress.distill.kd import build_student

    a, b = build_student("same", {}, teacher, 3), build_student("same", {}, teacher, 3)
    c = build_student("same", {}, teacher, 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head[0].weight, c.head[0].weight)
    assert not torch.equal(a.head[0].weight, teacher.head[0].weight)
    with pytest.raises(ValueError, match="student factory 'compress.zoo:nope'"):
        build_student("compress.zoo:nope", {}, teacher, 0)


@pytest.mark.parametrize(
    "extra", [{"bits": 4}, {"bits": 3, "rounding": "stochastic", "keep_first_last_float": True, "mixup": 1}]
)
def test_quantized_stage_stores_exact_integers(run_distill, extra):
    state, ctx, _ = run_distill({"method": "quantized", **HALF, "train": {"epochs": 1}, **extra}, train_samples=512)
    params = state.parameters_by_name()
    expected = {"features.0.weight", "features.2.weight", "features.4.weight", "head.0.weight", "head.2.weight"}
    if extra.get("keep_first_last_float"):
        expected -= {"features.0.weight", "head.2.weight"}
    assert set(state.quant) == expected
    for name, qt in state.quant.items():
        assert qt.bits == extra["bits"] and qt.zero_point is not None
        assert torch.equal(qt.dequantize(), params[name].detach())
    assert ctx.metrics["student_bits"] == [extra["bits"]]
    assert ctx.metrics["student_size_bytes"] < ctx.metrics["student_parameters"]  # ~4 bits, not 32


def test_differentiable_quantization_stage_with_bit_budget(run_distill):
    state, ctx, _ = run_distill(
        {"method": "differentiable_quantization", "bit_budget": 3, "train": {"epochs": 1}}, train_samples=512
    )
    bits = ctx.metrics["layer_bits"]
    sizes = {n: state.quant[f"{n}.weight"].codes.numel() for n in bits}
    assert sum(bits[n] * sizes[n] for n in bits) <= 3 * sum(sizes.values())
    params = state.parameters_by_name()
    for name, qt in state.quant.items():
        assert isinstance(qt, CodebookTensor) and qt.bits == bits[name.rsplit(".", 1)[0]]
        assert torch.equal(qt.dequantize(), params[name].detach())


@pytest.mark.parametrize("variant, select", [("ban", "last"), ("cwtm", "best"), ("dkpp", "last")])
def test_born_again_stage_records_generations(run_distill, teacher, variant, select):
    state, ctx, entering = run_distill(
        {"method": "born_again", "generations": 2, "variant": variant, "select": select, "train": {"epochs": 1}},
        train_samples=256,
    )
    m = ctx.metrics
    assert [g["generation"] for g in m["generations"]] == [1, 2]
    assert 0 <= m["ensemble_accuracy"] <= 1 and m["ensemble_members"] == 2
    accs = [g["accuracy"] for g in m["generations"]]
    chosen = m["selected_generation"]
    assert chosen == (2 if select == "last" else 1 + accs.index(max(accs)))
    assert m["student_accuracy"] == accs[chosen - 1]
    assert type(state.module) is type(teacher) and _teacher_untouched(entering, teacher)


def test_pipeline_runs_distill(tmp_path, digits_mlp_path, write_recipe):
    from compress.pipeline import run
    from compress.recipe import load_recipe

    recipe = write_recipe(
        stages="  - distill: {method: quantized, bits: 4, bucket: 32, train: {epochs: 2, lr: 0.01}}", gates="  {}"
    )
    result = run(load_recipe(recipe), digits_mlp_path, tmp_path / "out")
    row = result.report["stages"][-1]
    assert row["stage"] == "distill" and row["method"] == "quantized"
    assert row["weight_bits"] < 5 and row["metrics"]["student_bits"] == [4]
    again = run(load_recipe(recipe), digits_mlp_path, tmp_path / "out")
    assert again.report["stages"][-1]["cached"] and again.report["stages"][-1]["accuracy"] == row["accuracy"]
