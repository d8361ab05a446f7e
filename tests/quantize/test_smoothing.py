"""SmoothQuant smoothing (``smoothing: alpha``): the same function in float, less activation
quantization error where a few input channels carry outliers, kept through save/reload and
the ONNX export (a Mul before the integer MatMul)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from compress.fake_quant import quantized_inputs
from compress.quantize.smooth import smooth_model, smoothing_scales
from compress.smoothing import is_smoothed


def _outlier_model_and_data(seed: int = 0):
    """An MLP whose first layer's inputs have 4 channels ~60× larger than the rest, the
    pattern of transformer LayerNorm outputs that per-tensor 8-bit activations handle badly."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 60
    return model, x


def _dynamic_spec(model):
    return {"mode": "dynamic", "bits": 8, "layers": {"0.weight": {}, "2.weight": {}}}


def test_smoothing_keeps_the_float_function_and_cuts_activation_error():
    model, x = _outlier_model_and_data()
    with torch.no_grad():
        ref = model(x)
        with quantized_inputs(model, _dynamic_spec(model)):
            err_plain = (model(x) - ref).norm() / ref.norm()
    report = smooth_model(model, ["0", "2"], x[:256], alpha=0.7)
    assert report["layers"] == 2 and is_smoothed(model[0])
    before, after = report["input_spread_before_after"]["0"]
    assert after < before / 5  # the outlier channels were flattened
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)  # same function in float
        with quantized_inputs(model, _dynamic_spec(model)):
            err_smooth = (model(x) - ref).norm() / ref.norm()
    assert err_smooth < 0.5 * err_plain, (err_smooth, err_plain)


def test_scales_are_bounded_and_dead_channels_untouched():
    act = torch.tensor([0.0, 1.0, 100.0, 1e-12])
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    s = smoothing_scales(act, w, 0.5)
    assert s[0] == 1 and s[1] == 1  # a dead activation, a dead weight column
    assert s[2] == pytest.approx(10.0) and s[3] >= 1e-4
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smoothing_scales(act, w, 1.5)


def test_tied_weight_is_not_smoothed():
    model, x = _outlier_model_and_data()
    model[2].weight = nn.Parameter(torch.randn(10, 64))

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.extra = model, nn.Linear(64, 10)
            self.extra.weight = model[2].weight  # the same Parameter in two layers

        def forward(self, x):
            return self.net(x) + self.extra(torch.relu(x))

    report = smooth_model(Tied(), ["net.0", "net.2"], x[:64], alpha=0.5)
    assert "net.2" in report["skipped"] and "tied" in report["skipped"]["net.2"]
    assert is_smoothed(model[0]) and not is_smoothed(model[2])


def _cfg(**kw):
    from pydantic import TypeAdapter

    from compress.registry import stage_config

    return TypeAdapter(stage_config("quantize")).validate_python(kw)


def test_config_needs_quantized_activations_and_alpha_in_range():
    with pytest.raises(ValidationError, match="only helps quantized activations"):
        _cfg(method="rtn", bits=8, smoothing=0.5)
    with pytest.raises(ValidationError, match=r"must be in \[0, 1\]"):
        _cfg(method="rtn", bits=8, activations="dynamic", smoothing=2)
    assert _cfg(method="gpfq", bits=8, activations="dynamic", smoothing=0.7).smoothing == 0.7
    with pytest.raises(ValidationError, match=r"smoothing\['\*'\].*must be in \[0, 1\]"):
        _cfg(method="rtn", bits=8, activations="dynamic", smoothing={"head": None, "*": 1.5})
    per_layer = _cfg(method="rtn", bits=8, activations="dynamic", smoothing={"*.output.dense": None, "*": 0.6})
    assert per_layer.smoothing_for("layer.0.output.dense") is None
    assert per_layer.smoothing_for("layer.0.intermediate.dense") == 0.6


def test_per_layer_alphas():
    """A ``{layer: alpha}`` mapping smooths only the layers it names, each with its alpha;
    layers reading one tensor must share one."""
    model, x = _outlier_model_and_data()
    report = smooth_model(model, ["0", "2"], x[:128], alpha={"0": 0.7})
    assert report["layers"] == 1 and report["alpha"] == {"0": 0.7}
    assert is_smoothed(model[0]) and not is_smoothed(model[2])

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(64, 8), nn.Linear(64, 8)

        def forward(self, x):
            return self.q(x) + self.k(x)

    with pytest.raises(ValueError, match="read one tensor.*0.7, 0.5"):
        smooth_model(Shared(), ["q", "k"], x[:64], alpha={"q": 0.7, "k": 0.5})


def test_stage_save_reload_and_export_parity(tmp_path):
    """Through the quantize stage (GPFQ int8, dynamic activations, smoothing), a save/reload,
    and the ONNX export: the Mul carries the scaling, DynamicQuantizeMatMul the integer GEMM,
    and onnxruntime matches the PyTorch simulation."""
    from compress.data import DataBundle, Split
    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import optimized_op_types, ort_session, quantize_onnx_model
    from compress.model_io import load_state, save_state
    from compress.quantize.stage import apply
    from compress.runtime import ort_predict, row_cosine
    from compress.state import ModelState, StageContext

    model, x = _outlier_model_and_data(1)
    ref = model(x).detach()
    data = DataBundle({"calibration": Split("calibration", x[:256], None, 64, 0)})
    state = ModelState(module=model, input_shape=(1, 64))
    ctx = StageContext(data=data, out_dir=None, device=torch.device("cpu"), reference=model, seed=0)
    state = apply(state, _cfg(method="gpfq", bits=8, activations="dynamic", smoothing=0.7), ctx)
    assert ctx.metrics["quantize"]["smoothing"]["layers"] == 2
    spec = state.extras["activation_quantization"]
    with torch.no_grad(), quantized_inputs(state.module, spec):
        sim = state.module(x)
    assert (sim - ref).norm() / ref.norm() < 0.02

    save_state(state, tmp_path / "s")
    rebuilt = load_state(tmp_path / "s", lambda: nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)))
    assert is_smoothed(rebuilt.module[0])
    with torch.no_grad(), quantized_inputs(rebuilt.module, spec):
        torch.testing.assert_close(rebuilt.module(x), sim)

    float_model = export_onnx(state.module, x[:2], tmp_path / "f.onnx")
    path = tmp_path / "q.onnx"
    import onnx

    onnx.save(quantize_onnx_model(float_model, state.quant, activations=spec), str(path))
    ops = optimized_op_types(path, exact=False)
    assert ops["DynamicQuantizeMatMul"] == 2 and ops["Mul"] >= 2, ops
    ort_one = ort_predict(ort_session(path, exact=False), x[:64].numpy(), batch_size=1)
    assert row_cosine(ort_one, sim[:64].numpy()).min() > 0.999


def test_smoothing_min_bits_leaves_the_4_bit_layers_of_a_mix_unsmoothed():
    """In a 4/8-bit mix, ``smoothing_min_bits: 8`` smooths only the 8-bit layer; the model
    still computes the float function before its weights are rounded."""
    from compress.data import DataBundle, Split
    from compress.quantize.stage import apply
    from compress.state import ModelState, StageContext

    model, x = _outlier_model_and_data(2)
    data = DataBundle({"calibration": Split("calibration", x[:256], None, 64, 0)})
    state = ModelState(module=model, input_shape=(1, 64))
    ctx = StageContext(data=data, out_dir=None, device=torch.device("cpu"), reference=model, seed=0)
    cfg = _cfg(method="rtn", bits=8, layer_bits={"2": 4}, activations="dynamic", smoothing=0.7, smoothing_min_bits=8)
    state = apply(state, cfg, ctx)
    assert is_smoothed(state.module[0]) and not is_smoothed(state.module[2])
    assert ctx.metrics["quantize"]["smoothing"]["layers"] == 1
    assert state.quant["0.weight"].bits == 8 and state.quant["2.weight"].bits == 4
    with pytest.raises(ValidationError, match="smoothing_min_bits"):
        _cfg(method="rtn", bits=8, activations="dynamic", smoothing=0.7, smoothing_min_bits=9)


def test_auto_alpha_is_judged_on_held_out_calibration_data():
    """``alpha: "auto"`` picks, per layer group, the alpha with the lowest simulated 8-bit error
    on the held-out quarter of the calibration data. Outlier channels get smoothed; when the
    held-out part has an outlier channel the fit part never showed, the alphas that fit the
    seen maxima tightly lose to a milder one (or to none)."""
    model, x = _outlier_model_and_data()
    with torch.no_grad():
        ref = model(x)
        with quantized_inputs(model, _dynamic_spec(model)):
            err_plain = (model(x) - ref).norm() / ref.norm()
    report = smooth_model(model, ["0", "2"], x[:256], alpha="auto")
    first = report["auto"]["0"]
    assert first["alpha"] is not None and first["heldout_error"]["None"] > 2 * min(first["heldout_error"].values())
    assert first["heldout_error"][str(first["alpha"])] == min(first["heldout_error"].values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        with quantized_inputs(model, _dynamic_spec(model)):
            assert (model(x) - ref).norm() / ref.norm() < 0.5 * err_plain

    surprise, x2 = _outlier_model_and_data()
    x2 = x2[:256].clone()
    x2[192:, 4] *= 60  # only in the held-out quarter
    seen = smooth_model(_outlier_model_and_data()[0], ["0"], x[:256], alpha="auto")["auto"]["0"]["alpha"]
    unseen = smooth_model(surprise, ["0"], x2, alpha="auto")["auto"]["0"]["alpha"]
    assert seen is not None and (unseen is None or unseen < seen), (seen, unseen)


def test_auto_alpha_in_the_config():
    from pydantic import TypeAdapter

    from compress.registry import stage_config

    cfg = TypeAdapter(stage_config("quantize")).validate_python(
        {"method": "rtn", "bits": 8, "activations": "dynamic", "smoothing": {"*out": None, "*": "auto"}}
    )
    assert cfg.smoothing_for("a.out") is None and cfg.smoothing_for("a.in") == "auto"
    with pytest.raises(ValidationError):
        TypeAdapter(stage_config("quantize")).validate_python(
            {"method": "rtn", "bits": 8, "activations": "dynamic", "smoothing": "best"}
        )


def _gelu_fed_layer():
    """A Linear fed by a GELU, like a transformer's FFN output: 4 outlier channels, 28 mostly
    "off" channels (values near GELU's floor −0.17, large weight columns), 32 ordinary ones."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.GELU(), nn.Linear(64, 16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model[1].weight[:, 4:32] *= 5
    x = torch.randn(512, 8, 64, generator=g)
    x[..., 4:32] = x[..., 4:32] * 0.3 - 0.75
    x[..., :4] = x[..., :4].abs() * 20
    return model, x


def test_range_magnitude_weighs_the_narrow_side():
    from compress.quantize.smooth import range_magnitude

    lo, hi = torch.tensor([-0.17, -0.1, -2.0]), torch.tensor([10.0, 0.05, 1.0])
    torch.testing.assert_close(range_magnitude(lo, hi, 1.0), torch.tensor([10.0, 0.1, 2.0]))
    torch.testing.assert_close(range_magnitude(lo, hi, 0.25), torch.tensor([10.0, 0.4, 8.0]))
    # the mirror: the positive side is the narrow one
    torch.testing.assert_close(range_magnitude(-hi, -lo, 0.25), torch.tensor([10.0, 0.4, 8.0]))
    with pytest.raises(ValueError, match="skew"):
        range_magnitude(lo, hi, 0.0)


def test_skew_keeps_small_channels_tails_from_stretching_the_asymmetric_grid():
    """With max|x_j| (skew 1), the mostly-off channels' −0.17 tails, divided by their small
    s_j, set the smoothed tensor's minimum (the uint8 grid spans both sides); a skew of 0.25
    keeps that side within a quarter of the positive one and cuts the 8-bit output error.
    ``auto`` finds a skew below 1 on held-out calibration data. The float function is kept."""
    spec = {"mode": "dynamic", "bits": 8, "layers": {"1.weight": {}}}
    results = {}
    for skew in (1.0, 0.25, "auto"):
        model, x = _gelu_fed_layer()
        with torch.no_grad():
            ref = model(x)
        report = smooth_model(model, ["1"], x[:256], alpha=0.7, skew=skew)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
            with quantized_inputs(model, spec):
                err = float((model(x) - ref).norm() / ref.norm())
        h = nn.functional.gelu(x) * model[1].smooth_inv
        results[skew] = (err, float(-h.min() / h.max()), report)
    assert results[1.0][1] > 0.25  # the narrow side stretched by the small channels
    assert results[0.25][1] <= 0.25
    assert results[0.25][0] < 0.9 * results[1.0][0]
    picked = results["auto"][2]["auto"]["1"]
    assert picked["alpha"] == 0.7 and picked["skew"] < 1.0
    assert picked["heldout_error"][f"0.7/{picked['skew']}"] == min(picked["heldout_error"].values())
    assert results["auto"][0] < 0.9 * results[1.0][0]
    with pytest.raises(ValueError, match="skew"):
        smooth_model(_gelu_fed_layer()[0], ["1"], _gelu_fed_layer()[1][:64], alpha=0.7, skew=1.5)


def test_smoothing_skew_in_the_config():
    cfg = _cfg(method="rtn", bits=8, activations="dynamic", smoothing=0.7, smoothing_skew="auto")
    assert cfg.smoothing_skew == "auto"
    assert _cfg(method="rtn", bits=8, activations="dynamic", smoothing=0.7).smoothing_skew == 1.0
    for bad in (0.0, 1.5, "best"):
        with pytest.raises(ValidationError, match="smoothing_skew"):
            _cfg(method="rtn", bits=8, activations="dynamic", smoothing=0.7, smoothing_skew=bad)
