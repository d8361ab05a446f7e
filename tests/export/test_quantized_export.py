"""Quantized ONNX export: real integer initializers, ORT parity, fused kernels, file size."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from compress.state import ModelState

MODELS = {"digits_mlp": ({"hidden": (128,)}, 10), "mnist1d_cnn": ({}, 4)}


@pytest.fixture(scope="module")
def trained():
    from compress import zoo
    from compress.data import builtin
    from compress.train import TrainConfig, fit

    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (kwargs, epochs) in MODELS.items():
            factory, _shape, source = zoo.ZOO[name]
            x, y = (torch.as_tensor(a) for a in builtin(source, "train"))
            xe, _ye = (torch.as_tensor(a) for a in builtin(source, "test"))
            torch.manual_seed(0)
            model = factory(**kwargs)
            fit(model, x, y, TrainConfig(epochs=epochs, lr=3e-3, seed=0))
            out[name] = (model.eval(), x[:512], xe)
    finally:
        torch.set_num_threads(threads)
    return out


def _quantized_state(model, calib, config) -> ModelState:
    from compress.data import DataBundle, Split
    from compress.quantize.stage import apply
    from compress.state import StageContext

    state = ModelState(copy.deepcopy(model), (1, calib.shape[1]))
    ctx = StageContext(
        DataBundle({"calibration": Split("calibration", calib, None, 256, 0)}),
        out_dir=None,
        device=torch.device("cpu"),
        reference=model,
    )
    return apply(state, config, ctx)


def _export(state, tmp_path, name="model"):
    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import quantize_onnx_model

    float_model = export_onnx(state.module, state.example_input(2), tmp_path / f"{name}.float.onnx")
    qmodel = quantize_onnx_model(float_model, state.quant)
    path = tmp_path / f"{name}.onnx"
    onnx.save(qmodel, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return float_model, qmodel, path


CONFIGS = {
    "gpfq-int4": {"method": "gpfq", "bits": 4},
    "gpfq-int4-group32": {"method": "gpfq", "bits": 4, "granularity": "per_group", "group_size": 32},
    "rtn-int3-asym": {"method": "rtn", "bits": 3, "symmetric": False},
    "gpfq-int8": {"method": "gpfq", "bits": 8},
    "codebook-4": {"method": "codebook", "bits": 4},
    "codebook-6x2": {"method": "codebook", "bits": 6, "codebooks_per_layer": 2},
}


@pytest.mark.parametrize("model_name", ["digits_mlp", pytest.param("mnist1d_cnn", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_parity_and_fusion(trained, tmp_path, model_name, cfg_name):
    from pydantic import TypeAdapter

    from compress.export.quantized import optimized_op_types, ort_session
    from compress.metrics import predict
    from compress.registry import stage_config
    from compress.runtime import ort_predict

    QuantizeConfig = stage_config("quantize")

    model, calib, x_eval = trained[model_name]
    state = _quantized_state(model, calib, TypeAdapter(QuantizeConfig).validate_python(CONFIGS[cfg_name]))
    _, qmodel, path = _export(state, tmp_path)

    init_names = {i.name for i in qmodel.graph.initializer}
    assert not init_names & {i.name for i in qmodel.graph.input}
    assert not init_names & set(state.quant)  # no float copy of a quantized weight is left

    ort_out = ort_predict(ort_session(path), x_eval.numpy())
    torch_out = predict(state.module, x_eval).numpy()
    agreement = (ort_out.argmax(1) == torch_out.argmax(1)).mean()
    assert agreement >= 0.995
    np.testing.assert_allclose(ort_out, torch_out, rtol=1e-4, atol=1e-4)

    # Weight-only: the integer weights are folded into float ones at load, so onnxruntime
    # runs the float model's own graph (never slower than float).
    ops = optimized_op_types(path)
    float_ops = optimized_op_types(tmp_path / "model.float.onnx")
    assert ops["MatMulNBits"] == 0 and ops["DequantizeLinear"] + ops["GatherElements"] + ops["Gather"] == 0, ops
    assert ops == float_ops, (ops, float_ops)


def test_matmul_nbits_form_is_opt_in(trained, tmp_path):
    """``weight_only="matmul_nbits"`` keeps the fused N-bit kernel (4-bit weights in memory)."""
    from pydantic import TypeAdapter

    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import optimized_op_types, ort_session, quantize_onnx_model
    from compress.metrics import predict
    from compress.registry import stage_config
    from compress.runtime import ort_predict

    model, calib, x_eval = trained["digits_mlp"]
    cfg = TypeAdapter(stage_config("quantize")).validate_python({"method": "gpfq", "bits": 4})
    state = _quantized_state(model, calib, cfg)
    float_model = export_onnx(state.module, state.example_input(2), tmp_path / "m.float.onnx")
    path = tmp_path / "m.onnx"
    onnx.save(quantize_onnx_model(float_model, state.quant, weight_only="matmul_nbits"), str(path))
    linears = sum(1 for m in state.module.modules() if isinstance(m, torch.nn.Linear))
    assert optimized_op_types(path)["MatMulNBits"] == linears
    np.testing.assert_allclose(
        ort_predict(ort_session(path), x_eval.numpy()), predict(state.module, x_eval).numpy(), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="weight_only"):
        quantize_onnx_model(float_model, state.quant, weight_only="nbits")


def test_int4_bytes_are_an_eighth_of_float_plus_scales(trained, tmp_path):
    from pydantic import TypeAdapter

    from compress.export.quantized import initializer_bytes
    from compress.registry import stage_config

    QuantizeConfig = stage_config("quantize")

    model, calib, _ = trained["digits_mlp"]
    state = _quantized_state(model, calib, TypeAdapter(QuantizeConfig).validate_python({"method": "gpfq", "bits": 4}))
    float_model, qmodel, _ = _export(state, tmp_path)
    fbytes, qbytes = initializer_bytes(float_model), initializer_bytes(qmodel)
    float_w = sum(fbytes[n] for n in state.quant)
    int_w = sum(qbytes[f"{n}_quantized"] for n in state.quant)
    # The scales are float16 values (compress.grid.float16_ceil), stored as such from 64 on.
    stored = {n: f"{n}_scale_float16" if state.quant[n].scale.numel() >= 64 else f"{n}_scale" for n in state.quant}
    scales = sum(qbytes[s] for s in stored.values())
    assert scales == sum((2 if s.endswith("16") else 4) * state.quant[n].scale.numel() for n, s in stored.items())
    assert int_w == pytest.approx(float_w / 8, rel=0.01)
    assert qbytes.keys().isdisjoint(state.quant)
    assert sum(qbytes.values()) <= sum(fbytes.values()) - float_w + float_w / 8 + scales + 64
    dtypes = {i.name: i.data_type for i in qmodel.graph.initializer}
    assert all(dtypes[f"{n}_quantized"] == onnx.TensorProto.INT4 for n in state.quant)


def test_exact_parity_needs_the_session_option(trained, tmp_path):
    """MatMulNBits: ORT's default accuracy level quantizes activations; level 1 reproduces
    PyTorch exactly. The default folded form is exact under both."""
    from pydantic import TypeAdapter

    from compress.export.quantized import ort_session, quantize_onnx_model
    from compress.metrics import predict
    from compress.registry import stage_config
    from compress.runtime import ort_predict

    QuantizeConfig = stage_config("quantize")

    model, calib, x_eval = trained["digits_mlp"]
    state = _quantized_state(model, calib, TypeAdapter(QuantizeConfig).validate_python({"method": "rtn", "bits": 4}))
    float_model, _, folded = _export(state, tmp_path)
    nbits = tmp_path / "nbits.onnx"
    onnx.save(quantize_onnx_model(float_model, state.quant, weight_only="matmul_nbits"), str(nbits))
    ref = predict(state.module, x_eval).numpy()
    exact = np.abs(ort_predict(ort_session(nbits, exact=True), x_eval.numpy()) - ref).max()
    default = np.abs(ort_predict(ort_session(nbits, exact=False), x_eval.numpy()) - ref).max()
    assert exact < 1e-4 < default
    for flag in (True, False):
        assert np.abs(ort_predict(ort_session(folded, exact=flag), x_eval.numpy()) - ref).max() < 1e-4


def test_old_opset_and_missing_names_are_rejected(trained, tmp_path):
    from compress.export.quantized import quantize_onnx_model
    from compress.quantize.rtn import rtn_quantize

    model, _, _ = trained["digits_mlp"]
    state = ModelState(copy.deepcopy(model), (1, 64))
    state.quant = {n: rtn_quantize(p, 4) for n, p in model.named_parameters() if n.endswith("weight")}
    state.sync_quantized()  # the module runs the dequantized weights, as after the quantize stage
    float_model, _, _ = _export(state, tmp_path)
    old = onnx.ModelProto()
    old.CopyFrom(float_model)
    old.opset_import[0].version = 18
    with pytest.raises(ValueError, match="opset"):
        quantize_onnx_model(old, state.quant)
    other = rtn_quantize(torch.randn_like(model.net[0].weight), 4)  # values no initializer holds
    with pytest.raises(ValueError, match="no ONNX initializer holds exactly"):
        quantize_onnx_model(float_model, {"nope.weight": other})
    # A name alone is not enough: the initializer called net.0.weight holds other values.
    with pytest.raises(ValueError, match="has that name but other values"):
        quantize_onnx_model(float_model, {"net.0.weight": other})


def test_fast_quantized_kernels_option_is_carried_to_the_bundle(tmp_path, digits_mlp_path):
    """exact_quantized_kernels: false drops the fp32 accuracy-level entry, and the bundle says so."""
    import json

    from compress.bundle import open_bundle
    from compress.pipeline import run
    from compress.recipe import parse_recipe
    from tests.conftest import DIGITS_RECIPE

    text = DIGITS_RECIPE.format(
        stages="  - quantize: {method: rtn, bits: 4}\n  - export: {latency_runs: 5, exact_quantized_kernels: false, "
        "atol: 0.5, min_agreement: 0.9}",
        gates="  {}",
    )
    out = tmp_path / "o"
    result = run(parse_recipe(text, "fast.yaml"), digits_mlp_path, out)
    assert result.passed, result.failures
    session = result.report["stages"][-1]["metrics"]["ort_session"]
    assert "session.qdq_matmulnbits_accuracy_level" not in session["config"]
    assert open_bundle(out / "bundle.czip", tmp_path).manifest["session"] == json.loads(json.dumps(session))
