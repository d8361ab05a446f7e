"""Quantization benchmark: one table over the zoo models, plus GPFQ's over-parametrisation curve.

    python benchmarks/quantize.py [--quick]
    python benchmarks/quantize.py --cnn-speed   # integer kernels on CNNs (issue 11)

Rows: float, round-to-nearest, this GPFQ, brevitas GPFQ (PARAMETER_FROM_STATS scale, one
forward pass first: its stock per-channel quantizer diverges), brevitas GPTQ, k-means
codebook, and onnxruntime's own int8 (quantize_dynamic) and N-bit (MatMulNBitsQuantizer).
Columns: top-1 accuracy on the test split at 2/3/4/8 bits, seconds to quantize (4 bits),
ONNX file size and ORT p50 latency (1 sample, 1 thread) of the 4-bit export (8-bit for ORT int8).
All weight-only, per output channel (ORT N-bit: blocks of 32), same calibration data (1024
training samples).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import zoo
from compress.data import DataBundle, Split, builtin
from compress.metrics import evaluate
from compress.state import ModelState, StageContext
from compress.train import TrainConfig, fit

BITS = (2, 3, 4, 8)
MODELS = {"mnist1d_mlp": ({}, 60), "mnist1d_cnn": ({}, 60), "digits_mlp": ({"hidden": (128,)}, 30)}
CALIB = 1024
TEACHER = Path(__file__).resolve().parents[1] / "recipes" / "models" / "mnist1d_cnn.pt"


def train(name: str):
    """A well-trained model (the teacher recipe of scripts/train_teacher.py): quantization
    comparisons on under-trained models mostly measure noise. The MNIST-1D CNN is the
    shipped teacher itself."""
    factory, _shape, source = zoo.ZOO[name]
    kwargs, epochs = MODELS[name]
    x, y = (torch.as_tensor(a) for a in builtin(source, "train"))
    xe, ye = (torch.as_tensor(a) for a in builtin(source, "test"))
    torch.manual_seed(0)
    model = factory(**kwargs)
    if name == "mnist1d_cnn" and TEACHER.is_file():
        model.load_state_dict(torch.load(TEACHER, weights_only=True))
    else:
        fit(model, x, y, TrainConfig(epochs=epochs, lr=1e-2, optimizer="adamw", batch_size=100, seed=0))
    return model.eval(), x, y, xe, ye


def run_ours(model, x, y, config):
    from compress.quantize.stage import apply

    state = ModelState(copy.deepcopy(model), (1, x.shape[1]))
    bundle = DataBundle(
        {"train": Split("train", x, y, 128, 0), "calibration": Split("calibration", x[:CALIB], None, 256, 0)}
    )
    ctx = StageContext(bundle, out_dir=Path("."), device=torch.device("cpu"), reference=model)
    t = time.perf_counter()
    apply(state, config, ctx)
    return state, time.perf_counter() - t


# --- brevitas -----------------------------------------------------------------------------------


def brevitas_model(model: nn.Module, bits: int) -> nn.Module:
    """The model with every Linear/Conv replaced by a brevitas weight-quantized twin."""
    import brevitas.nn as qnn
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat

    class WeightQuant(Int8WeightPerChannelFloat):
        scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS
        bit_width = bits

    qmodel = copy.deepcopy(model)
    for parent in list(qmodel.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                new = qnn.QuantLinear(
                    child.in_features, child.out_features, bias=child.bias is not None, weight_quant=WeightQuant
                )
            elif isinstance(child, (nn.Conv1d, nn.Conv2d)):
                cls = qnn.QuantConv1d if isinstance(child, nn.Conv1d) else qnn.QuantConv2d
                new = cls(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    weight_quant=WeightQuant,
                )
            else:
                continue
            new.load_state_dict(child.state_dict(), strict=False)  # the scale is initialised from stats
            setattr(parent, child_name, new)
    return qmodel


def run_brevitas(model, calib, bits: int, algo: str):
    from brevitas.graph.gpfq import gpfq_mode
    from brevitas.graph.gptq import gptq_mode

    qmodel = brevitas_model(model, bits).eval()
    t = time.perf_counter()
    with torch.no_grad():
        qmodel(calib[:256])  # initialises the PARAMETER_FROM_STATS scales
        mode = gpfq_mode if algo == "gpfq" else gptq_mode
        with mode(qmodel, use_quant_activations=False) as q:
            inner = q.model
            for _ in range(q.num_layers):
                for i in range(0, len(calib), 256):
                    inner(calib[i : i + 256])
                q.update()
    return qmodel, time.perf_counter() - t


# --- ONNX -----------------------------------------------------------------------------------------


def gemm_to_matmul(model):
    """Gemm(transB=1) → MatMul(+Add) with a transposed float weight (what ORT's quantizers look for)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Gemm" and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            new_w = numpy_helper.from_array(np.ascontiguousarray(w.T), n.input[1] + "_T")
            m.graph.initializer.append(new_w)
            m.graph.initializer.remove(inits[n.input[1]])
            mm = n.output[0] + "_mm"
            nodes.append(helper.make_node("MatMul", [n.input[0], new_w.name], [mm]))
            nodes.append(helper.make_node("Add", [mm, n.input[2]], [n.output[0]]))
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def ort_eval(path: Path, xe, ye, exact_config: bool) -> tuple[float, float]:
    from compress.export.quantized import ort_session
    from compress.runtime import measure_latency, ort_predict

    sess = ort_session(path, exact=exact_config, disabled_optimizers=("MatMulAddFusion",) if exact_config else ())
    out = ort_predict(sess, xe.numpy())
    acc = float((out.argmax(1) == ye.numpy()).mean())
    lat = measure_latency(sess, xe[:1].numpy(), runs=200, warmup=20)["latency_p50_ms"]
    return acc, lat


def export_ours(state, tmp: Path, tag: str) -> Path:
    import onnx

    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import quantize_onnx_model

    fm = export_onnx(state.module, state.example_input(2), tmp / f"{tag}.float.onnx")
    path = tmp / f"{tag}.onnx"
    onnx.save(quantize_onnx_model(fm, state.quant), str(path))
    return path


def benchmark_model(name: str, tmp: Path) -> list[dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from compress.export.onnx_export import export_onnx
    from compress.quantize.config import CodebookConfig, GPFQConfig, RTNConfig

    model, x, y, xe, ye = train(name)
    calib = x[:CALIB]
    rows: list[dict] = []
    fpath = tmp / f"{name}.float.onnx"
    fmodel = export_onnx(model, xe[:2], fpath)
    _acc_f, lat_f = ort_eval(fpath, xe, ye, exact_config=False)
    float_acc = evaluate(model, xe, ye)["accuracy"]
    rows.append(
        {
            "model": name,
            "method": "float",
            **{b: float_acc for b in BITS},
            "time": 0.0,
            "bytes": fpath.stat().st_size,
            "latency": lat_f,
        }
    )

    for method, make in (
        ("RTN", lambda b: RTNConfig(bits=b)),
        ("GPFQ (ours)", lambda b: GPFQConfig(bits=b)),
        ("codebook", lambda b: CodebookConfig(bits=b)),
    ):
        row = {"model": name, "method": method}
        for b in BITS:
            state, secs = run_ours(model, x, y, make(b))
            row[b] = evaluate(state.module, xe, ye)["accuracy"]
            if b == 4:
                row["time"] = secs
                path = export_ours(state, tmp, f"{name}-{method[:4]}-{b}")
                row["bytes"] = path.stat().st_size
                row["latency"] = ort_eval(path, xe, ye, exact_config=True)[1]
        rows.append(row)

    for algo in ("gpfq", "gptq"):
        row = {"model": name, "method": f"brevitas {algo.upper()}"}
        for b in BITS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    qm, secs = run_brevitas(model, calib, b, algo)
                    row[b] = evaluate(qm, xe, ye)["accuracy"]
                except Exception as err:  # report, don't hide: the table shows the failure
                    logging.getLogger(__name__).warning("brevitas %s %d bits failed: %s", algo, b, err)
                    row[b], secs = float("nan"), float("nan")
            if b == 4:
                row["time"] = secs
        rows.append(row)

    import onnx

    mm_model = gemm_to_matmul(fmodel)
    mm_path = tmp / f"{name}.matmul.onnx"
    onnx.save(mm_model, str(mm_path))
    q8 = tmp / f"{name}.ort-int8.onnx"
    t = time.perf_counter()
    quantize_dynamic(str(mm_path), str(q8), weight_type=QuantType.QInt8, per_channel=True)
    secs = time.perf_counter() - t
    acc8, lat8 = ort_eval(q8, xe, ye, exact_config=False)
    rows.append(
        {
            "model": name,
            "method": "ORT quantize_dynamic int8",
            8: acc8,
            "time": secs,
            "bytes": q8.stat().st_size,
            "latency": lat8,
        }
    )
    row = {"model": name, "method": "ORT MatMulNBits (block 32)"}
    for b in (2, 4, 8):
        qn = tmp / f"{name}.ort-nbits{b}.onnx"
        t = time.perf_counter()
        try:
            qz = MatMulNBitsQuantizer(onnx.load(str(mm_path)), bits=b, block_size=32, is_symmetric=True)
            qz.process()
            qz.model.save_model_to_file(str(qn))
            secs = time.perf_counter() - t
            acc, lat = ort_eval(qn, xe, ye, exact_config=False)
            row[b] = acc
            if b == 4:
                row.update(time=secs, bytes=qn.stat().st_size, latency=lat)
        except Exception as err:
            logging.getLogger(__name__).warning("MatMulNBitsQuantizer %d bits failed: %s", b, err)
            row[b] = float("nan")
    rows.append(row)
    return rows


def overparametrisation_curve(ns=(64, 128, 256, 512, 1024, 2048, 4096), m: int = 128, bits: int = 3) -> list[tuple]:
    """Relative output error of one synthetic layer vs its input count N (m samples fixed)."""
    from compress.quantize.gpfq import LayerStats, gpfq_quantize_matrix, output_error
    from compress.quantize.rtn import rtn_quantize

    out = []
    for n in ns:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(m, n, generator=g).relu()
        w = torch.randn(16, n, generator=g) / n**0.5
        stats = LayerStats.from_data(x, x)
        t = time.perf_counter()
        q = gpfq_quantize_matrix(w, x, bits=bits).dequantize()
        secs = time.perf_counter() - t
        out.append((n, output_error(w, q, stats), output_error(w, rtn_quantize(w, bits).dequantize(), stats), secs))
    return out


# --- integer kernels on CNNs (issue 11) ---------------------------------------------------------


class ResBlock1d(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm1d(ch)
        self.c2, self.b2 = nn.Conv1d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm1d(ch)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class BNResNet1d(nn.Module):
    """A small BN ResNet for MNIST-1D (40 samples → 10 classes)."""

    def __init__(self, ch: int = 32, blocks: int = 3):
        super().__init__()
        self.stem, self.bn = nn.Conv1d(1, ch, 5, padding=2, bias=False), nn.BatchNorm1d(ch)
        self.blocks = nn.Sequential(*[ResBlock1d(ch) for _ in range(blocks)])
        self.head = nn.Linear(ch * 10, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x.unsqueeze(1))))
        h = nn.functional.max_pool1d(self.blocks(h), 4)
        return self.head(h.flatten(1))


def fold_bn(model: nn.Module) -> nn.Module:
    """Conv → BatchNorm pairs of ``BNResNet1d`` folded by hand into Convs with a bias (eval mode)."""
    model = copy.deepcopy(model).eval()

    def fold(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> nn.Conv1d:
        std = (bn.running_var + bn.eps).sqrt()
        new = nn.Conv1d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, bias=True)
        with torch.no_grad():
            new.weight.copy_(conv.weight * (bn.weight / std).reshape(-1, 1, 1))
            new.bias.copy_(bn.bias - bn.running_mean * bn.weight / std)
        return new

    model.stem, model.bn = fold(model.stem, model.bn), nn.Identity()
    for blk in model.blocks:
        blk.c1, blk.b1 = fold(blk.c1, blk.b1), nn.Identity()
        blk.c2, blk.b2 = fold(blk.c2, blk.b2), nn.Identity()
    return model


def interleaved_latency(paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int = 7, runs: int = 20) -> dict:
    """Per-round p50 ms of each model on ``x``, timed in interleaved rounds so machine load
    hits all alike (compare models by the median of their per-round ratios)."""
    from compress.export.quantized import ort_session

    sessions = {k: ort_session(p, threads=threads, exact=False, disabled_optimizers=()) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for s in sessions.values():
        s.run(None, {"input": x})
    for _ in range(rounds):
        for k, s in sessions.items():
            one = []
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, {"input": x})
                one.append((time.perf_counter() - t0) * 1e3)
            times[k].append(float(np.median(one)))
    return {k: np.asarray(v) for k, v in times.items()}


def _ratio(a: np.ndarray, b: np.ndarray) -> float:
    """Median over rounds of ``a / b``: a load spike in one round moves one ratio, not the result."""
    return float(np.median(a / b))


def cnn_speed_rows(tmp: Path, threads_list=(1, 2)) -> list[dict]:
    """Float vs onnxruntime's quantize_static (QDQ) vs ours (static int8 activations over GPFQ
    int8/int4 codes; the weight-only forms: per-channel, per-group, codebook, and the opt-in
    MatMulNBits form) on the quickstart CNN and a BN ResNet."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import ort_session, quantize_onnx_model
    from compress.quantize.config import CodebookConfig, GPFQConfig, RTNConfig
    from compress.runtime import ort_predict

    model_cnn, x, y, xe, ye = train("mnist1d_cnn")
    torch.manual_seed(0)
    resnet = BNResNet1d()
    fit(resnet, x, y, TrainConfig(epochs=20, lr=3e-3, optimizer="adamw", batch_size=100, seed=0))
    models = {"quickstart CNN": model_cnn.eval(), "BN ResNet (folded)": fold_bn(resnet.eval())}
    calib = x[:CALIB]
    rows = []
    for mname, model in models.items():
        paths: dict[str, Path] = {}
        states: dict[tuple, ModelState] = {}
        fpath = tmp / f"{mname[:5]}.float.onnx"
        export_onnx(model, xe[:2], fpath)
        paths["float"] = fpath

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"input": calib[i : i + 64].numpy()} for i in range(0, len(calib), 64)])

            def get_next(self):
                return next(self.it, None)

        qs = tmp / f"{mname[:5]}.ort-static.onnx"
        quantize_static(
            str(fpath),
            str(qs),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        paths["ORT quantize_static QDQ int8"] = qs
        # Weight-only rows: every weight-only form must run at float speed or better.
        for label, cfg, weight_only in (
            ("ours GPFQ int8, static act", GPFQConfig(bits=8, activations="static"), "folded"),
            ("ours GPFQ int4, static act", GPFQConfig(bits=4, activations="static"), "folded"),
            ("ours GPFQ int4, weight-only", GPFQConfig(bits=4), "folded"),
            ("ours GPFQ int4, weight-only as MatMulNBits", GPFQConfig(bits=4), "matmul_nbits"),
            (
                "ours RTN int4 group 32, weight-only",
                RTNConfig(bits=4, granularity="per_group", group_size=32),
                "folded",
            ),
            ("ours codebook 4-bit, weight-only", CodebookConfig(bits=4), "folded"),
        ):
            print(f"# {mname}: {label}", flush=True)
            key = (type(cfg), cfg.bits, getattr(cfg, "granularity", None), getattr(cfg, "activations", "none"))
            if key not in states:
                states[key] = run_ours(model, x, y, cfg)[0]
            state = states[key]
            fm = export_onnx(state.module, xe[:2], tmp / "o.float.onnx")
            path = tmp / f"{mname[:5]}-{len(paths)}.onnx"
            spec = state.extras.get("activation_quantization")
            onnx.save(quantize_onnx_model(fm, state.quant, activations=spec, weight_only=weight_only), str(path))
            paths[label] = path
        accs = {
            k: float(
                (
                    ort_predict(ort_session(p, exact=False, disabled_optimizers=()), xe.numpy()).argmax(1) == ye.numpy()
                ).mean()
            )
            for k, p in paths.items()
        }
        lat = {
            (t, b): interleaved_latency(paths, np.ascontiguousarray(xe[:b].numpy()), t, runs=20 if b == 1 else 5)
            for t in threads_list
            for b in (1, 32)
        }
        for k, p in paths.items():
            row = {"model": mname, "variant": k, "acc": accs[k], "kib": p.stat().st_size / 1024}
            for (t, b), d in lat.items():
                peers = [v for n, v in d.items() if n.startswith("ORT")]
                row[f"t{t}b{b}"] = _ratio(d[k], d["float"])
                row[f"t{t}b{b}_peer"] = max(_ratio(d[k], p) for p in peers)  # vs the fastest peer
            rows.append(row)
            print_cnn_rows([row], threads_list, header=len(rows) == 1)
    return rows


def print_cnn_rows(rows: list[dict], threads_list=(1, 2), header: bool = True) -> None:
    """Markdown rows (printed as each model finishes, so a cut-short run still reports)."""
    keys = [f"t{t}b{b}" for t in threads_list for b in (1, 32)]
    if header:
        print(
            "| model | variant | accuracy | ONNX KiB | "
            + " | ".join(f"{k} / float" for k in keys)
            + " | "
            + " | ".join(f"{k} / ORT" for k in keys)
            + " |"
        )
        print("|" + "---|" * (4 + 2 * len(keys)))
    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {100 * r['acc']:.1f} | {r['kib']:.1f} | "
            + " | ".join(f"{r[k]:.2f}" for k in keys)
            + " | "
            + " | ".join(f"{r[k + '_peer']:.2f}" for k in keys)
            + " |"
        )


def fmt(v, kind="acc"):
    if v is None:
        return "-"
    if isinstance(v, float) and np.isnan(v):
        return "fail"
    if kind == "acc":
        return f"{100 * v:.1f}"
    if kind == "time":
        return f"{v:.2f}"
    if kind == "bytes":
        return f"{v / 1024:.1f}"
    return f"{v:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cnn-speed",
        action="store_true",
        help="only the integer-kernel CNN table: float vs ORT quantize_static vs ours (static "
        "int8 activations), latency as a ratio to float at 1/2 threads, batch 1/32",
    )
    args = parser.parse_args()
    if args.cnn_speed:
        torch.set_num_threads(2)
        logging.basicConfig(level=logging.WARNING)
        with tempfile.TemporaryDirectory() as tmp:
            cnn_speed_rows(Path(tmp))
        return
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("torch.onnx", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += benchmark_model(name, Path(tmp))
    header = (
        f"| {'model':12} | {'method':27} | "
        + " | ".join(f"{b}-bit" for b in BITS)
        + " | quantize s (4b) | ONNX KiB (4b) | ORT p50 ms |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        accs = " | ".join(f"{fmt(r.get(b)):>5}" for b in BITS)
        print(
            f"| {r['model']:12} | {r['method']:27} | {accs} | {fmt(r.get('time'), 'time'):>15} | "
            f"{fmt(r.get('bytes'), 'bytes'):>13} | {fmt(r.get('latency'), 'lat'):>10} |"
        )
    print()
    print("GPFQ over-parametrisation (one synthetic ReLU-input layer, m = 128 samples, 3 bits, 16 neurons):")
    print("| N | GPFQ ‖Xw−Xq‖²/‖Xw‖² | RTN | GPFQ s |")
    print("|---|---|---|---|")
    for n, e, r, s in overparametrisation_curve():
        print(f"| {n} | {e:.2e} | {r:.2e} | {s:.2f} |")


if __name__ == "__main__":
    main()
