"""Integer-kernel exports: what onnxruntime actually runs (optimized graph op types), parity
by cosine, integer Gather for embeddings, folded weight-only convs, honest export checks."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.state import ModelState
from tests.export.test_quantized_export import _quantized_state, trained  # noqa: F401


def _export(state, tmp_path, name="model"):
    """Float export, then the integer rewrite with the state's activation quantization."""
    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import quantize_onnx_model

    float_model = export_onnx(state.module, state.example_input(2), tmp_path / f"{name}.float.onnx")
    qmodel = quantize_onnx_model(float_model, state.quant, activations=state.extras.get("activation_quantization"))
    path = tmp_path / f"{name}.onnx"
    onnx.save(qmodel, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return float_model, qmodel, path


def _cfg(**kw):
    from pydantic import TypeAdapter

    from compress.registry import stage_config

    return TypeAdapter(stage_config("quantize")).validate_python(kw)


def _token_state(model, ids):
    """A stage state of a copy of ``model`` and a context calibrating on the token ids ``ids``."""
    from compress.data import DataBundle, Split
    from compress.state import StageContext

    state = ModelState(copy.deepcopy(model), (1, 6), example=ids[:4])
    ctx = StageContext(
        DataBundle({"calibration": Split("calibration", ids, None, 64, 0)}),
        out_dir=None,
        device=torch.device("cpu"),
        reference=model,
    )
    return state, ctx


def _ops_and_outputs(state, tmp_path, x_eval, exact=False):
    from compress.export.quantized import optimized_op_types, ort_session
    from compress.metrics import predict
    from compress.runtime import ort_predict

    _, qmodel, path = _export(state, tmp_path)
    ort_out = ort_predict(ort_session(path, exact=exact), x_eval.numpy())
    torch_out = predict(state.module, x_eval).numpy()
    return optimized_op_types(path, exact=exact), qmodel, ort_out, torch_out


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_activations_run_as_dynamic_quantize_matmul(trained, tmp_path, bits):  # noqa: F811
    from compress.runtime import row_cosine

    model, calib, x_eval = trained["digits_mlp"]
    state = _quantized_state(model, calib, _cfg(method="gpfq", bits=bits, activations="dynamic"))
    assert state.extras["activation_quantization"]["mode"] == "dynamic"
    ops, qmodel, ort_out, torch_out = _ops_and_outputs(state, tmp_path, x_eval)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert ops["DynamicQuantizeMatMul"] == linears and ops["MatMulNBits"] == 0 and ops["Gemm"] == 0, ops
    dtypes = {i.data_type for i in qmodel.graph.initializer if i.name.endswith("_quantized")}
    # 4-bit file, int8 kernel; 8-bit codes keep within U8S8_PAIR_LIMIT, so int8 (the fast kernel) too.
    assert dtypes == {onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8}
    # Against PyTorch with the same activation rounding (batch 1: one dynamic range per
    # sample, as the simulation): only accumulation order and rounding ties differ.
    from compress.export.quantized import ort_session
    from compress.fake_quant import quantized_inputs
    from compress.metrics import predict
    from compress.runtime import ort_predict

    ort_one = ort_predict(ort_session(tmp_path / "model.onnx", exact=False), x_eval.numpy(), batch_size=1)
    with quantized_inputs(state.module, state.extras["activation_quantization"]):
        sim = predict(state.module, x_eval).numpy()
    cos = row_cosine(ort_one, sim)
    assert cos.min() > 0.999, cos.min()
    assert (ort_one.argmax(1) == sim.argmax(1)).mean() >= 0.99
    assert row_cosine(ort_out, torch_out).mean() > 0.99  # and close to the float-activation model


def test_asymmetric_4_8_bit_mix_stays_on_the_integer_gemm(trained, tmp_path):  # noqa: F811
    """recipes/minilm-int4.yaml's form: per-channel zero points, 4- and 8-bit layers mixed,
    every Linear on DynamicQuantizeMatMul (zero point as its B zero point), none on MatMulNBits."""
    from compress.export.quantized import ort_session
    from compress.fake_quant import quantized_inputs
    from compress.metrics import predict
    from compress.runtime import ort_predict, row_cosine

    model, calib, x_eval = trained["digits_mlp"]
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    cfg = _cfg(method="gpfq", bits=8, layer_bits={first: 4}, symmetric=False, activations="dynamic")
    state = _quantized_state(model, calib, cfg)
    assert state.quant[f"{first}.weight"].bits == 4 and state.quant[f"{first}.weight"].zero_point is not None
    ops, qmodel, _, _ = _ops_and_outputs(state, tmp_path, x_eval)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert ops["DynamicQuantizeMatMul"] == linears and ops["MatMulNBits"] == 0 and ops["Gemm"] == 0, ops
    assert any(i.data_type == onnx.TensorProto.INT4 for i in qmodel.graph.initializer)
    assert sum(i.name.endswith("_zero_point") for i in qmodel.graph.initializer) >= linears
    ort_one = ort_predict(ort_session(tmp_path / "model.onnx", exact=False), x_eval.numpy(), batch_size=1)
    with quantized_inputs(state.module, state.extras["activation_quantization"]):
        sim = predict(state.module, x_eval).numpy()
    assert row_cosine(ort_one, sim).min() > 0.999
    # and both are still the float model (the 8-bit layers' asymmetric codes once had their
    # pairs "bounded" through the zero point: agreement fell to chance)
    agree = (sim.argmax(1) == predict(model, x_eval).numpy().argmax(1)).mean()
    assert agree > 0.95, agree


@pytest.fixture(scope="module")
def teacher():
    """The shipped MNIST-1D CNN (94.9%): an under-trained CNN has too many near-ties for a
    top-1 agreement check."""
    from pathlib import Path

    from compress import zoo
    from compress.data import builtin

    model = zoo.ZOO["mnist1d_cnn"][0]()
    path = Path(__file__).resolve().parents[2] / "recipes" / "models" / "mnist1d_cnn.pt"
    model.load_state_dict(torch.load(path, weights_only=True))
    x, _ = builtin("mnist1d", "train")
    xe, ye = builtin("mnist1d", "test")
    return model.eval(), torch.as_tensor(x[:512]), torch.as_tensor(xe), ye


@pytest.mark.slow
def test_static_activations_run_as_qlinear_kernels(teacher, tmp_path):
    from compress.runtime import row_cosine

    model, calib, x_eval, y_eval = teacher
    state = _quantized_state(model, calib, _cfg(method="gpfq", bits=8, activations="static"))
    spec = state.extras["activation_quantization"]
    assert spec["mode"] == "static" and all(
        lo <= 0 <= hi or lo <= hi for lo, hi in (r["input"] for r in spec["layers"].values())
    )
    ops, _, ort_out, torch_out = _ops_and_outputs(state, tmp_path, x_eval)
    convs = sum(isinstance(m, nn.Conv1d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert ops["QLinearConv"] == convs and ops["QGemm"] == linears, ops
    assert ops["Conv"] + ops["FusedConv"] + ops["Relu"] == 0, ops  # every ReLU folded into a zero point
    assert row_cosine(ort_out, torch_out).mean() > 0.99
    assert (ort_out.argmax(1) == torch_out.argmax(1)).mean() >= 0.97
    float_acc = (model(x_eval).argmax(1).numpy() == y_eval).mean()
    assert (ort_out.argmax(1) == y_eval).mean() >= float_acc - 0.005  # the bar: within 0.5 points


def test_static_ranges_minmax_cover_percentile():
    from compress.quantize.activations import calibrate_ranges, fake_quantize_static, uint8_qparams

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(512, 8)
    mm = calibrate_ranges(model, ["0", "2"], x, method="minmax")
    pc = calibrate_ranges(model, ["0", "2"], x, method="percentile", percentile=99.0)
    assert mm["0.weight"]["input"] == pytest.approx([x.min().item(), x.max().item()])
    assert pc["0.weight"]["input"][1] < mm["0.weight"]["input"][1]
    assert mm["2.weight"]["input"][0] == 0.0  # after the ReLU
    scale, zp = uint8_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == 64
    q = fake_quantize_static(torch.tensor([-2.0, 0.0, 1.0, 5.0]), -1.0, 3.0)
    assert q[1] == 0 and q[0] == pytest.approx(-zp * scale) and q[3] == pytest.approx((255 - zp) * scale)


def test_gpfq_sees_quantized_activations(trained):  # noqa: F811
    """With activations quantized, X̃ differs from the float inputs even before any weight moves."""
    from compress.quantize.activations import activation_spec, quantized_inputs

    def _capture_input(model, layer, x):
        """What ``layer`` receives (after every pre-hook, as GPFQ's capture sees it)."""
        seen = []
        handle = layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
        return seen[0]

    model, calib, _ = trained["digits_mlp"]
    m = copy.deepcopy(model)
    spec = activation_spec(m, ["net.0"], calib, _cfg(method="gpfq", activations="static"))
    layer = dict(m.named_modules())["net.0"]
    plain = _capture_input(m, layer, calib[:64])
    with quantized_inputs(m, spec):
        quant = _capture_input(m, layer, calib[:64])
    err = (quant - plain).abs()
    lo, hi = spec["layers"]["net.0.weight"]["input"]
    assert 0 < err.max() <= (hi - lo) / 255  # rounded to the 8-bit grid (and clipped to it)
    assert torch.equal(_capture_input(m, layer, calib[:64]), plain)  # hooks removed


class TinyLM(nn.Module):
    """Token ids → embedding → Linear → logits over the vocabulary with the tied table."""

    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids):
        h = torch.relu(self.proj(self.emb(ids)))
        return (h @ self.emb.weight.T).mean(1)


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_tables_gather_integer_rows(tmp_path, bits):
    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import optimized_op_types, ort_session, quantize_onnx_model
    from compress.quantize.stage import apply
    from compress.runtime import ort_predict, row_cosine

    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 64, (128, 6))
    state, ctx = _token_state(model, ids)
    apply(state, _cfg(method="rtn", bits=8, embedding_bits=bits), ctx)
    assert state.quant["emb.weight"].bits == bits and state.quant["emb.weight"].granularity == "per_channel"
    fm = export_onnx(state.module, ids[:2], tmp_path / "f.onnx")
    qm = quantize_onnx_model(fm, state.quant)
    path = tmp_path / "q.onnx"
    onnx.save(qm, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    tables = [i for i in qm.graph.initializer if list(i.dims) == [64, 16]]
    integer = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.INT4)
    assert len(tables) == 1 and tables[0].data_type in integer  # one copy
    ops = optimized_op_types(path, exact=False)
    if bits == 8:  # rows gathered and dequantized in one node
        assert ops["GatherBlockQuantized"] == 1, ops
    else:  # codes and row scales gathered, not a dequantized table
        assert ops["Gather"] >= 2, ops
    out = ort_predict(ort_session(path, exact=False), ids.numpy())
    ref = state.module(ids).detach().numpy()
    assert row_cosine(out, ref).min() > 0.9999


class TwoTables(nn.Module):
    """Two tables read only by lookups (untied), 48 values a row."""

    def __init__(self, vocab=300, dim=48, positions=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(positions, dim)
        self.proj = nn.Linear(dim, 4)

    def forward(self, ids):
        return self.proj(self.emb(ids) + self.pos(ids % 8)).mean(1)


def test_untied_8bit_tables_gather_and_dequantize_in_one_node(tmp_path):
    """An 8-bit table only looked up is one GatherBlockQuantized per lookup (blocks of 16 of a
    48-value row, each the row's scale): no Cast or Mul left for it, the per-row scales stored
    once per row, and the rows equal to PyTorch's dequantized table."""
    from compress.export import fast_kernels as fk
    from compress.quantize.stage import apply

    assert (fk.gather_block(48), fk.gather_block(384), fk.gather_block(64), fk.gather_block(40)) == (16, 128, 64, None)
    torch.manual_seed(0)
    model = TwoTables().eval()
    ids = torch.randint(0, 300, (64, 6))
    state, ctx = _token_state(model, ids)
    apply(state, _cfg(method="rtn", bits=8, embedding_bits=8), ctx)
    ops, qmodel, ort_out, torch_out = _ops_and_outputs(state, tmp_path, ids)
    assert ops["GatherBlockQuantized"] == 2 and "Gather" not in ops and "Cast" not in ops, ops
    assert "Mul" not in ops, ops  # the row scales are applied inside the lookup
    inits = {i.name: i for i in qmodel.graph.initializer}
    tables = [i for i in inits.values() if list(i.dims) == [300, 48]]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.UINT8
    assert not [i for i in inits.values() if list(i.dims) == [300, 3]]  # repeated per block only at load
    np.testing.assert_allclose(ort_out, torch_out, rtol=1e-5, atol=1e-5)


def test_weight_only_conv_is_folded_to_float_at_load(trained, tmp_path):  # noqa: F811
    """A 4-bit Conv without integer activations must not dequantize on every run."""
    model, calib, x_eval = trained["mnist1d_cnn"]
    state = _quantized_state(model, calib, _cfg(method="rtn", bits=4))
    ops, qmodel, ort_out, torch_out = _ops_and_outputs(state, tmp_path, x_eval, exact=True)
    assert ops["DequantizeLinear"] == 0 and ops["Cast"] == 0, ops
    assert any(i.data_type == onnx.TensorProto.INT4 for i in qmodel.graph.initializer)
    np.testing.assert_allclose(ort_out, torch_out, rtol=1e-4, atol=1e-4)


def test_asymmetric_static_layer_falls_back_to_weight_only(trained, tmp_path):  # noqa: F811
    model, calib, x_eval = trained["digits_mlp"]
    state = _quantized_state(model, calib, _cfg(method="rtn", bits=8, symmetric=False, activations="static"))
    ops, _, ort_out, torch_out = _ops_and_outputs(state, tmp_path, x_eval)
    assert ops["QGemm"] == 0
    assert (ort_out.argmax(1) == torch_out.argmax(1)).mean() >= 0.97


def test_config_rejects_bad_activation_options():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="activations"):
        _cfg(method="gpfq", activations="int8")
    with pytest.raises(ValidationError, match="activation_percentile"):
        _cfg(method="rtn", activation_percentile=50)
    with pytest.raises(ValidationError, match="auto_holdout"):
        _cfg(method="gpfq", auto_holdout=1.0)
    with pytest.raises(ValidationError):
        _cfg(method="codebook", activations="dynamic")  # codebooks have no integer grid


def test_export_stage_judges_fast_kernels_by_cosine_and_times_float(tmp_path, digits_mlp_path):
    """The default export of integer activations passes an honest cosine check (not atol),
    and reports the latency ratio to the same model in float."""
    from compress.pipeline import run
    from compress.recipe import parse_recipe
    from tests.conftest import DIGITS_RECIPE

    text = DIGITS_RECIPE.format(
        stages="  - quantize: {method: rtn, bits: 8, activations: dynamic}\n  - export: {latency_runs: 10}",
        gates="  {}",
    )
    result = run(parse_recipe(text, "dyn.yaml"), digits_mlp_path, tmp_path / "o")
    export = result.report["stages"][-1]
    gates = {c["gate"] for c in result.report["checks"]}
    metrics = export["metrics"]
    assert result.passed, result.failures
    assert metrics["ort_fast_kernels"] and metrics["activations"] == "dynamic"
    assert metrics["ort_cosine_min"] >= 0.99 and metrics["ort_max_abs_error"] > 0  # reported, not hidden
    assert metrics["latency_vs_float"] > 0 and metrics["float_latency_p50_ms"] > 0
    assert export["latency_vs_float"] == metrics["latency_vs_float"]
    assert "onnx_parity_cosine" in gates and "onnx_parity_within_tolerance" not in gates
    assert not list((tmp_path / "o").rglob("float_reference.onnx"))  # the float twin is not left behind


class _SharedInput(nn.Module):
    """Three projections of one tensor (q/k/v-like), then a fourth layer: the export should
    quantize the shared activation once and fold every bias into the integer MatMul."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)) + self.v(x))


@pytest.mark.parametrize("smoothing", [None, 0.6])
def test_shared_activation_quantized_once_with_biases_fused(tmp_path, smoothing):
    from compress.data import DataBundle, Split
    from compress.export.quantized import optimized_op_types, ort_session
    from compress.fake_quant import quantized_inputs
    from compress.quantize.stage import apply
    from compress.runtime import ort_predict, row_cosine
    from compress.state import StageContext

    torch.manual_seed(0)
    model = _SharedInput().eval()
    x = torch.randn(256, 2, 32)  # a sequence of 2 positions: the Linears export as MatMul
    x[..., :3] *= 20  # outlier channels
    data = DataBundle({"calibration": Split("calibration", x, None, 64, 0)})
    state = ModelState(module=model, input_shape=(1, 2, 32))
    ctx = StageContext(data=data, out_dir=None, device=torch.device("cpu"), reference=copy.deepcopy(model), seed=0)
    state = apply(state, _cfg(method="rtn", bits=8, activations="dynamic", smoothing=smoothing), ctx)
    _, qmodel, path = _export(state, tmp_path)
    ops = optimized_op_types(path, exact=False)
    assert ops["DynamicQuantizeLinear"] == 1 and ops["MatMulIntegerToFloat"] == 3, ops
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["Add"] == 1, ops  # the one Add: "... + v(x)"
    muls = [n for n in qmodel.graph.node if n.op_type == "Mul" and "smooth" in "".join(n.input)]
    assert len(muls) == (0 if smoothing is None else 2)  # q/k/v share one scaling Mul, out has its own
    ort_one = ort_predict(ort_session(path, exact=False), x[:64].numpy(), batch_size=1)
    with torch.no_grad(), quantized_inputs(state.module, state.extras["activation_quantization"]):
        sim = torch.cat([state.module(x[i : i + 1]) for i in range(64)]).reshape(64, -1).numpy()
    assert row_cosine(ort_one.reshape(64, -1), sim).min() > 0.999


class _Residual1d(nn.Module):
    """Residual blocks written as ``out + x`` in forward (no special module), MaxPool, head."""

    def __init__(self, ch: int = 8):
        super().__init__()
        self.stem = nn.Conv1d(1, ch, 3, padding=1)
        self.c = nn.ModuleList(nn.Conv1d(ch, ch, 3, padding=1) for _ in range(4))
        self.head = nn.Linear(ch * 20, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x.unsqueeze(1)))
        for i in (0, 2):
            h = torch.relu(self.c[i + 1](torch.relu(self.c[i](h))) + h)
        return self.head(nn.functional.max_pool1d(h, 2).flatten(1))


def test_residual_adds_and_max_pool_run_on_uint8(tmp_path):
    """Static activations: a residual ``Add`` of two quantized tensors becomes QLinearAdd and
    MaxPool / Reshape run on uint8 (no float op left between the integer kernels), and the
    PyTorch simulation rounds exactly where the QDQ graph does."""
    import onnxruntime as ort

    from compress.fake_quant import quantized_inputs
    from compress.runtime import row_cosine

    torch.manual_seed(0)
    model = _Residual1d().eval()
    calib, x_eval = torch.randn(256, 40), torch.randn(64, 40)
    # 4-bit codes: the u8 x s8 kernel of a CPU without VNNI cannot saturate (see StaticQDQ.add).
    state = _quantized_state(model, calib, _cfg(method="rtn", bits=4, activations="static"))
    ops, _, ort_out, _ = _ops_and_outputs(state, tmp_path, x_eval)
    assert ops["QLinearAdd"] == 2 and ops["QLinearConv"] == 5 and ops["QGemm"] == 1, ops
    float_ops = {"Add", "Conv", "FusedConv", "Relu", "MaxPool", "Gemm", "DequantizeLinear"}
    assert not float_ops & {k for k, v in ops.items() if v}, ops  # one DequantizeLinear: QGemm's output is float
    with quantized_inputs(state.module, state.extras["activation_quantization"]), torch.no_grad():
        sim = state.module(x_eval).numpy()
    with torch.no_grad():
        unrounded = state.module(x_eval).numpy()
    # The unfused QDQ graph computes the rounding in float: it must match the simulation.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(tmp_path / "model.onnx"), so, providers=["CPUExecutionProvider"])
    qdq = ref.run(None, {"input": x_eval.numpy()})[0]
    # (biases included: the quantize stage put them on their int32 grid)
    assert np.abs(qdq - sim).max() < 1e-4, np.abs(qdq - sim).max()
    assert np.abs(qdq - unrounded).max() > 1e-3  # the rounding is not negligible
    assert row_cosine(ort_out, sim).min() > 0.999


def test_static_simulation_rounds_once_per_tensor():
    """Conv → ReLU → Conv: the second Conv's input is rounded once, on its own grid (the ReLU is
    folded into the first Conv's output quantizer); a Conv output read by anything else is
    rounded on the Conv's output grid; reading a tensor's shape is not a use of its values."""
    from compress.fake_quant import fake_quantize_static, quantized_inputs

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(1, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            n = y.shape[0]  # metadata only
            return self.b(torch.relu(y)).reshape(n, -1), y * 1.0

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(8, 1, 16)
    spec = {
        "mode": "static",
        "layers": {
            "a.weight": {"input": [-3.0, 3.0], "output": [-2.0, 2.5]},
            "b.weight": {"input": [0.0, 1.7], "output": [-1.0, 1.0]},
        },
    }
    seen = {}
    net.b.register_forward_hook(lambda _m, args, _o: seen.__setitem__("b_in", args[0]))
    with quantized_inputs(net, spec), torch.no_grad():
        _, y_used = net(x)
    with torch.no_grad():
        y = net.a(fake_quantize_static(x, -3.0, 3.0))
    torch.testing.assert_close(seen["b_in"], fake_quantize_static(torch.relu(y), 0.0, 1.7))
    torch.testing.assert_close(y_used, fake_quantize_static(y, -2.0, 2.5))


def _dynamic_linear_state(codes: torch.Tensor) -> ModelState:
    """One Linear (64 → 8) holding exactly the 8-bit ``codes`` (per-row scales), dynamic activations."""
    from compress.qtensor import UniformTensor

    rows = codes.shape[0]
    scale = torch.linspace(0.01, 0.02, rows).reshape(rows, 1)
    qt = UniformTensor(codes=codes.to(torch.int8), bits=8, scale=scale, zero_point=None, method="rtn")
    model = nn.Sequential(nn.Linear(codes.shape[1], rows)).eval()
    with torch.no_grad():
        model[0].weight.copy_(qt.dequantize())
        model[0].bias.copy_(torch.linspace(-1, 1, rows))
    state = ModelState(module=model, input_shape=(1, codes.shape[1]))
    state.quant = {"0.weight": qt}
    state.extras["activation_quantization"] = {"mode": "dynamic", "bits": 8, "layers": {"0.weight": {}}}
    return state


@pytest.mark.parametrize("bounded", [True, False])
def test_8bit_codes_never_saturate_the_integer_kernel(tmp_path, bounded):
    """onnxruntime's uint8 × int8 GEMM on CPUs without VNNI sums two adjacent input channels'
    products in int16. Codes within ``U8S8_PAIR_LIMIT`` are stored as int8 (that fast kernel),
    others as uint8 with zero point 128; either way the output is the exact integer product,
    even on inputs that drive every activation code to 0 or 255."""
    from compress.export.quantized import ort_session
    from compress.grid import fits_u8s8_pairs, limit_u8s8_pairs

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (8, 64), generator=g, dtype=torch.int32)
    codes[:, :6] = torch.tensor([127, 127, -128, -127, 100, 60])  # pairs far over the limit
    if bounded:
        codes = limit_u8s8_pairs(codes)
        codes[:, :6] = torch.tensor([64, 64, -128, 0, 127, -127])  # exactly at it
    assert fits_u8s8_pairs(codes) == bounded
    state = _dynamic_linear_state(codes)
    _, qmodel, path = _export(state, tmp_path)
    weight = next(i for i in qmodel.graph.initializer if i.name.endswith("_quantized"))
    assert weight.data_type == (onnx.TensorProto.INT8 if bounded else onnx.TensorProto.UINT8)
    x = (torch.rand(64, 64, generator=g) > 0.3).float()  # activations 0 or 1: codes 0 or 255, exactly
    x[0] = 1.0
    out = ort_session(path, exact=False).run(None, {"input": x.numpy()})[0]
    qt = state.quant["0.weight"]
    bias = state.module[0].bias.detach().double()
    exact = (x.double() * 255) @ qt.codes.double().T * (qt.scale.double().T / 255) + bias
    np.testing.assert_allclose(out, exact.numpy(), rtol=1e-5, atol=1e-4)


def test_scales_are_stored_compactly_and_folded_back_at_load(tmp_path, monkeypatch):
    """A 1024-row table's row steps lie on 256 log-spaced float16 levels (an 8-bit index each),
    weight scales and smoothing factors are float16: the file shrinks by those bytes, and the
    graph onnxruntime runs, and its outputs, are the uncompacted export's exactly."""
    from compress.export import fast_kernels as fk
    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import initializer_bytes, optimized_op_types, ort_session, quantize_onnx_model
    from compress.quantize.stage import apply
    from compress.runtime import ort_predict

    torch.manual_seed(0)
    model = TinyLM(vocab=1024, dim=64).eval()
    with torch.no_grad():  # row norms spread over 100x, as a real vocabulary's do
        model.emb.weight.mul_(torch.logspace(-1, 1, 1024)[:, None])
    ids = torch.randint(0, 1024, (128, 6))
    state, ctx = _token_state(model, ids)
    cfg = _cfg(method="rtn", bits=8, embedding_bits=8, activations="dynamic", smoothing=0.5)
    apply(state, cfg, ctx)
    table = state.quant["emb.weight"]
    w = model.emb.weight.detach()
    steps = table.scale.flatten()
    assert steps.unique().numel() <= 256
    assert (steps >= w.abs().amax(1) / 127).all()  # rounded up: nothing clipped
    peak = w.abs().amax(1)
    widest = (peak.max() / peak.min()) ** (1 / 255) * (1 + 2**-10)  # one log step, then float16
    assert (steps <= peak / 127 * widest).all() and widest < 1.03
    assert ((table.dequantize() - w).abs() <= steps[:, None] / 2 + 1e-7).all()

    fm = export_onnx(state.module, ids[:2], tmp_path / "f.onnx")
    act = state.extras["activation_quantization"]
    compact = quantize_onnx_model(fm, state.quant, activations=act)
    monkeypatch.setattr(fk, "compact_float_constants", lambda rw: {})
    plain = quantize_onnx_model(fm, state.quant, activations=act)
    paths = {}
    for name, m in (("compact", compact), ("plain", plain)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(m, str(paths[name]))
    onnx.checker.check_model(str(paths["compact"]), full_check=True)
    inits = {i.name: i for i in compact.graph.initializer}
    index = [i for i in inits.values() if i.data_type == onnx.TensorProto.UINT8 and list(i.dims) == [1024, 1]]
    assert len(index) == 1
    assert not [i for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [1024, 1]]
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits.values())  # proj's scales, smoothing
    saved = sum(initializer_bytes(plain).values()) - sum(initializer_bytes(compact).values())
    assert saved >= 3 * 1024 - 4 * 256 + 2 * 64
    assert optimized_op_types(paths["compact"], exact=False) == optimized_op_types(paths["plain"], exact=False)
    outs = [ort_predict(ort_session(paths[k], exact=False), ids.numpy()) for k in ("compact", "plain")]
    assert np.array_equal(outs[0], outs[1])


class _FirstConv(nn.Module):
    """One input channel at stride 2 (the pairs are neighbouring kernel positions), a conv
    over 8 channels (pairs of channels at one position), a Linear head (pairs of features)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 8, 4, stride=2, padding=1)
        self.b = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 20, 10)

    def forward(self, x):
        y = torch.relu(self.a(x.unsqueeze(1)))
        return self.head(torch.relu(self.b(y)).flatten(1))


@pytest.mark.parametrize("override", [False, True])
def test_static_int8_codes_keep_the_integer_kernels_exact(tmp_path, override):
    """Static int8 on random-initialised weights (codes spread over ±127, so pairs over
    ``U8S8_PAIR_LIMIT`` everywhere): the quantize stage bounds every layer's pairs in the
    order onnxruntime's kernels sum them, and onnxruntime's fused integer graph then agrees
    with the PyTorch simulation (before: parity cosine 0.43-0.93 on such models). Codes over
    the bound from elsewhere (``override``) are exported as uint8, exact on the u8u8 kernel."""
    import dataclasses

    from compress.fake_quant import quantized_inputs
    from compress.grid import conv_kernel_order, fits_u8s8_pairs
    from compress.runtime import row_cosine

    torch.manual_seed(0)
    model = _FirstConv().eval()
    calib, x_eval = torch.randn(256, 40), torch.randn(128, 40)
    state = _quantized_state(model, calib, _cfg(method="rtn", bits=8, activations="static"))
    for name, qt in state.quant.items():
        assert fits_u8s8_pairs(conv_kernel_order(qt.codes) if qt.codes.dim() == 3 else qt.codes), name
    if override:
        qt = state.quant["b.weight"]
        codes = qt.codes.clone()
        codes[:, :2, :] = 127  # channels 0 and 1 of every kernel position: 254 per pair
        state.quant["b.weight"] = dataclasses.replace(qt, codes=codes)
        state.sync_quantized()
    ops, qmodel, ort_out, _ = _ops_and_outputs(state, tmp_path, x_eval)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1, ops
    b_type = next(i.data_type for i in qmodel.graph.initializer if i.name.startswith("b.weight_quantized"))
    assert b_type == (onnx.TensorProto.UINT8 if override else onnx.TensorProto.INT8)
    with quantized_inputs(state.module, state.extras["activation_quantization"]), torch.no_grad():
        sim = state.module(x_eval).numpy()
    assert row_cosine(ort_out, sim).min() > 0.999


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.proj(x.reshape(x.shape[0], 10, 4))
        a, _ = self.att(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


def test_static_activations_leave_a_linear_never_called_as_a_module_float(tmp_path, caplog):
    """nn.MultiheadAttention uses its out_proj's weight directly, so no hook sees that Linear
    run: static calibration used to stop the stage (an internal error); the weight is now
    quantized, its activations stay float (said in the log), and the export keeps parity."""
    from compress.fake_quant import quantized_inputs
    from compress.runtime import row_cosine

    torch.manual_seed(0)
    model = _Attention().eval()
    calib, x_eval = torch.randn(128, 40), torch.randn(64, 40)
    with caplog.at_level("WARNING"):
        state = _quantized_state(model, calib, _cfg(method="gpfq", bits=8, activations="static"))
    spec = state.extras["activation_quantization"]
    assert "att.out_proj.weight" not in spec["layers"] and {"proj.weight", "head.weight"} <= set(spec["layers"])
    assert "att.out_proj.weight" in state.quant and "att.out_proj never called as a module" in caplog.text
    _, _, ort_out, _ = _ops_and_outputs(state, tmp_path, x_eval)
    with quantized_inputs(state.module, spec), torch.no_grad():
        sim = state.module(x_eval).numpy()
    assert row_cosine(ort_out, sim).min() > 0.999


class _Upsampling(nn.Module):
    """A decoder-style block: Conv1d, a transposed convolution (2 groups) with BatchNorm, a
    Conv3d over a reshaped map, a Linear head."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(1, 8, 4, stride=2, padding=1)
        self.d = nn.ConvTranspose1d(8, 8, 4, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm1d(8)
        self.v = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 8 * 40, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.d(torch.relu(self.c(x.unsqueeze(1))))))  # (B, 8, 40)
        return self.head(torch.relu(self.v(y.reshape(-1, 1, 8, 5, 8))).flatten(1))


@pytest.mark.parametrize("method", ["gpfq", "rtn"])
def test_transposed_and_3d_convolutions_are_quantized_and_export(tmp_path, method, caplog):
    """Their weights are quantized (GPFQ rounds them to nearest and the report says why), the
    BatchNorm after the transposed convolution is folded, and onnxruntime runs the export."""
    from compress.runtime import row_cosine
    from tests.arch.test_units import _randomise_bn

    torch.manual_seed(0)
    model = _randomise_bn(_Upsampling())
    calib, x_eval = torch.randn(128, 40), torch.randn(64, 40)
    with caplog.at_level("INFO", logger="compress.quantize.gpfq"):
        state = _quantized_state(model, calib, _cfg(method=method, bits=4))
    assert {"c.weight", "d.weight", "v.weight", "head.weight"} <= set(state.quant)
    assert isinstance(state.module.bn, nn.Identity)
    if method == "gpfq":
        for kind in ("ConvTranspose1d", "Conv3d"):
            assert f"{kind}: its inputs are not unfolded into patches, rounded to nearest" in caplog.text
    _, _, ort_out, torch_out = _ops_and_outputs(state, tmp_path, x_eval)
    assert row_cosine(ort_out, torch_out).min() > 0.9999


@pytest.mark.parametrize(
    "options",
    [
        {"method": "rtn", "bits": 8, "symmetric": False, "activations": "static"},
        {"method": "gpfq", "bits": 4, "granularity": "per_group", "group_size": 8, "activations": "static"},
        {"method": "rtn", "bits": 8, "granularity": "per_group", "group_size": 8, "activations": "dynamic"},
    ],
)
def test_layers_without_an_integer_kernel_keep_float_inputs_in_pytorch_too(tmp_path, caplog, options):
    """A per-group or (static) asymmetric grid has no integer kernel: the export writes the
    layer weight-only with float inputs, so the activation spec drops it and PyTorch stops
    rounding its inputs (before: ONNX parity cosine 0.96 on this random MLP)."""
    from compress.fake_quant import quantized_inputs
    from compress.runtime import row_cosine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    calib, x_eval = torch.randn(256, 40), torch.randn(128, 40)
    with caplog.at_level("WARNING"):
        state = _quantized_state(model, calib, _cfg(**options))
    spec = state.extras["activation_quantization"]
    assert spec["layers"] == {} and "weight-only, inputs left float" in caplog.text
    ops, _, ort_out, _ = _ops_and_outputs(state, tmp_path, x_eval)
    assert ops["QGemm"] + ops["DynamicQuantizeMatMul"] + ops["MatMulInteger"] == 0, ops
    with quantized_inputs(state.module, spec), torch.no_grad():
        sim = state.module(x_eval).numpy()
    assert row_cosine(ort_out, sim).min() > 0.9999
