"""Transformer benchmark: the real pretrained all-MiniLM-L6-v2 through every recipe variant.

    pip install -e '.[transformers]'
    python benchmarks/transformer.py [--threads 1] [--calibration 128]
    python benchmarks/transformer.py --speed [--threads 1 2] [--keep DIR]   # issue 11: vs onnxruntime's and NNCF's quantizers

Per variant (the stages of recipes/minilm.yaml, alone and combined): fidelity of the
sentence embeddings of the held-out sentences (recipes/data/sentences_heldout.txt) to the
uncompressed model's (mean and 5th-percentile cosine, nearest-neighbour retrieval
agreement), parameters, sizes (dense float32 weights, stored weights at their precision,
the losslessly packed state, the ONNX file), onnxruntime latency p50 at batch 1 (one
median-length sentence) and batch 32 (32 sentences padded to the longest) on
``--threads`` threads, and the ONNX model's parity with the PyTorch model it came from,
checked on sentences of their own lengths (batch 1, no padding, dynamic sequence axis).

The baseline a user would pick instead: onnxruntime's own int8 dynamic quantization
(``onnxruntime.quantization.quantize_dynamic``) of the same float ONNX model.

Calibration: recipes/data/sentences_calibration.txt (304 sentences, padded to 48 tokens).
Our quantized exports are timed twice: with ``session.qdq_matmulnbits_accuracy_level=1``
(fp32 compute in the fused N-bit kernels: exact parity with PyTorch, as the export stage
checks them) and with onnxruntime's default (activations quantized to 8 bits inside
``MatMulNBits``: faster, its fidelity is the "fast cos" column).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.data import DataBundle, Split, read_lines  # noqa: E402
from compress.metrics import compare_outputs, count_parameters, predict  # noqa: E402
from compress.state import ModelState, StageContext  # noqa: E402

LENGTH = 48
DATA = ROOT / "recipes" / "data"

# name -> the stages' configs, in order (as in a recipe)
VARIANTS: dict[str, list[tuple[str, dict]]] = {
    "float": [],
    "prune 25% (variance)": [("prune", {"method": "variance", "amount": 0.25})],
    "prune 25% (output variance)": [("prune", {"method": "variance", "amount": 0.25, "statistic": "output_variance"})],
    "RTN int8": [("quantize", {"method": "rtn", "bits": 8})],
    "GPFQ int8": [("quantize", {"method": "gpfq", "bits": 8})],
    # 4 bits: one scale per 32 input columns (ORT's MatMulNBits block size); per output
    # channel, GPFQ reaches cosine 0.962 and RTN 0.918.
    "RTN int4 (group 32)": [("quantize", {"method": "rtn", "bits": 4, "granularity": "per_group", "group_size": 32})],
    "GPFQ int4 (group 32)": [("quantize", {"method": "gpfq", "bits": 4, "granularity": "per_group", "group_size": 32})],
    "codebook 4-bit": [("quantize", {"method": "codebook", "bits": 4})],
    # Integer kernels (issue 11): int8 activations at run time (DynamicQuantizeMatMul over our
    # codes) and the word-embedding table as an integer Gather.
    "GPFQ int8, dynamic act, int8 emb": [
        ("quantize", {"method": "gpfq", "bits": 8, "activations": "dynamic", "embedding_bits": 8}),
    ],
    # 4-bit feed-forward blocks (2/3 of the encoder weights), 8-bit attention: about 13 MB.
    "GPFQ int4 FFN + int8 attention, dynamic act, int4 emb": [
        (
            "quantize",
            {
                "method": "gpfq",
                "bits": 4,
                "layer_bits": {"*attention*": 8},
                "activations": "dynamic",
                "embedding_bits": 4,
            },
        ),
    ],
    "GPFQ int4 per-channel, dynamic act, int4 emb": [
        ("quantize", {"method": "gpfq", "bits": 4, "activations": "dynamic", "embedding_bits": 4}),
    ],
    "prune 25% + GPFQ int8 (recipe)": [
        ("prune", {"method": "variance", "amount": 0.25}),
        ("quantize", {"method": "gpfq", "bits": 8}),
    ],
}


def stage_config(stage: str, cfg: dict):
    from pydantic import TypeAdapter

    from compress.registry import get_stage

    return TypeAdapter(get_stage(stage).config).validate_python(cfg)


def apply_stages(model, stages, data: DataBundle, calibration: int):
    from compress.registry import get_stage

    state = ModelState(copy.deepcopy(model), (1, 2, LENGTH), example=data["eval"].x[:2])
    seconds = 0.0
    for i, (stage, cfg) in enumerate(stages):
        if stage == "quantize" and cfg["method"] == "gpfq":
            cfg = {"calibration_samples": calibration, "batch_size": 32, **cfg}
        ctx = StageContext(data=data, out_dir=None, device=torch.device("cpu"), reference=model, seed=i)
        t0 = time.perf_counter()
        state = get_stage(stage).resolve()(state, stage_config(stage, cfg), ctx)
        seconds += time.perf_counter() - t0
    state.module.eval()
    return state, seconds


def export(state: ModelState, path: Path, fuse_attention: bool = True):
    """(onnx path, session factory kwargs) for the state, as the export stage writes it
    (``fuse_attention=False``: torch's export as it is, what a user quantizes with onnxruntime's tools)."""
    import onnx

    from compress.export.attention import fuse_attention as fuse
    from compress.export.onnx_export import export_onnx
    from compress.export.quantized import quantize_onnx_model
    from compress.export.stage import _wrapped_names
    from compress.onnx_signature import onnx_signature_of

    sig = onnx_signature_of(state.module)
    model = export_onnx(state.module, state.example_input(2), path, 21, signature=sig)
    if fuse_attention:
        model, _ = fuse(model)
        if not state.quant:
            onnx.save(model, str(path))
    if state.quant:
        onnx.save(
            quantize_onnx_model(
                model,
                state.quant,
                _wrapped_names(state.module, sig),
                activations=state.extras.get("activation_quantization"),
            ),
            str(path),
        )
    return path, sig


def session(path: Path, quantized: bool, threads: int, exact: bool = True):
    from compress.export.quantized import ort_session
    from compress.runtime import ort_session as float_session

    return ort_session(path, threads=threads, exact=exact) if quantized else float_session(path, threads)


def ort_embed(sess, x: np.ndarray, batch: int = 64) -> np.ndarray:
    from compress.runtime import ort_predict

    return ort_predict(
        sess,
        x,
        batch_size=batch,
        feeds=lambda b: {"input_ids": np.ascontiguousarray(b[:, 0]), "attention_mask": np.ascontiguousarray(b[:, 1])},
    )


def trim(x: np.ndarray) -> np.ndarray:
    return x[..., : int(x[:, 1].sum(1).max())]


def latency(sess, x: np.ndarray, runs: int) -> float:
    from compress.runtime import measure_latency

    feeds = lambda b: {"input_ids": np.ascontiguousarray(b[:, 0]), "attention_mask": np.ascontiguousarray(b[:, 1])}  # noqa: E731
    return measure_latency(sess, trim(x), runs=runs, warmup=3, feeds=feeds)["latency_p50_ms"]


def varying_length_parity(sess, module, x: np.ndarray, n: int = 24) -> float:
    """Min cosine of ORT vs PyTorch embeddings, each sentence fed at its own length (batch 1)."""
    worst = 1.0
    for row in x[:n]:
        one = trim(row[None])
        ort = ort_embed(sess, one)
        with torch.no_grad():
            ref = module(torch.as_tensor(one)).numpy()
        cos = float((ort * ref).sum() / (np.linalg.norm(ort) * np.linalg.norm(ref)))
        worst = min(worst, cos)
    return worst


SPEED_VARIANTS = {
    "ours RTN int8, dynamic act, int8 emb": {"method": "rtn", "bits": 8, "activations": "dynamic", "embedding_bits": 8},
    "ours GPFQ int8, dynamic act, int8 emb": {
        "method": "gpfq",
        "bits": 8,
        "activations": "dynamic",
        "embedding_bits": 8,
    },
    # SmoothQuant: outlier input channels migrate into the weights before both are quantized.
    "ours GPFQ int8, dynamic act, smoothing 0.7, int8 emb": {
        "method": "gpfq",
        "bits": 8,
        "activations": "dynamic",
        "smoothing": 0.7,
        "embedding_bits": 8,
    },
    # 4 bits (issue 11): per-channel codes, so every Linear stays on DynamicQuantizeMatMul
    # (INT4 + Cast, folded at load); per-group 4-bit would go to MatMulNBits, slower than float.
    "ours GPFQ int4 FFN + int8 attention, dynamic act, int4 emb": {
        "method": "gpfq",
        "bits": 4,
        "layer_bits": {"*attention*": 8},
        "activations": "dynamic",
        "embedding_bits": 4,
    },
    "ours GPFQ int4 per-channel, dynamic act, int4 emb": {
        "method": "gpfq",
        "bits": 4,
        "activations": "dynamic",
        "embedding_bits": 4,
    },
    # recipes/minilm-int4.yaml: 4 bits where the calibration data says it is cheap (q, k, most
    # attention outputs, two values, three FFN inputs), 8 bits elsewhere, asymmetric grids,
    # smoothing on the 8-bit layers only, word table 4-bit (MSE-chosen row steps), position
    # and token-type tables 8-bit.
    "ours GPFQ int4/int8 mix (recipes/minilm-int4.yaml)": {
        "method": "gpfq",
        "bits": 8,
        "layer_bits": {
            "*position_embeddings": 8,
            "*token_type_embeddings": 8,
            "*.query": 4,
            "*.key": 4,
            "*layer.[0-4].attention.output.dense": 4,
            "*layer.[01].attention.self.value": 4,
            "*layer.[0-2].intermediate.dense": 4,
        },
        "symmetric": False,
        "activations": "dynamic",
        "smoothing": 0.7,
        "smoothing_min_bits": 8,
        "embedding_bits": 4,
        "embedding_range": "mse",
    },
    # recipes/minilm.yaml: the attention output's input (the attention context) has no outlier
    # channels (8-bit activations there cost nothing measurable), so it is not smoothed: no
    # runtime Mul, no wider weight columns.
    "ours GPFQ int8, dynamic act, smoothing 0.7 (not attention output), int8 emb": {
        "method": "gpfq",
        "bits": 8,
        "activations": "dynamic",
        "smoothing": {"*attention.output.dense": None, "*": 0.7},
        "embedding_bits": 8,
    },
    # recipes/minilm.yaml: as above, with each group's smoothing skew (how far the asymmetric
    # grid's narrow side may stretch) judged on a held-out quarter of the calibration sentences.
    "ours GPFQ int8, dynamic act, smoothing 0.7 skew auto (not attention output), int8 emb": {
        "method": "gpfq",
        "bits": 8,
        "activations": "dynamic",
        "smoothing": {"*attention.output.dense": None, "*": 0.7},
        "smoothing_skew": "auto",
        "embedding_bits": 8,
    },
    # smoothing: auto (each group's alpha, or none, judged on a held-out quarter of the
    # calibration sentences).
    "ours GPFQ int8, dynamic act, smoothing auto (not attention output), int8 emb": {
        "method": "gpfq",
        "bits": 8,
        "activations": "dynamic",
        "smoothing": {"*attention.output.dense": None, "*": "auto"},
        "embedding_bits": 8,
    },
}
FOUR_BIT_PEER = "ORT MatMulNBits 4-bit block 32, Gather too"


def our_session() -> tuple[str, ...]:
    """The graph transformers the export stage switches off for a model (its default config)."""
    from compress.export.config import ExportConfig
    from compress.export.quantized import DISABLED_OPTIMIZERS

    return tuple(dict.fromkeys((*ExportConfig().ort_disabled_fusions, *DISABLED_OPTIMIZERS)))


def ort_4bit(float_path: Path, out: Path) -> Path:
    """onnxruntime's own 4-bit quantizer as issue 11 measured it: MatMulNBits (asymmetric,
    block 32, accuracy level 4) and the word/position tables as GatherBlockQuantized."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    cfg = DefaultWeightOnlyQuantConfig(
        block_size=32,
        is_symmetric=False,
        accuracy_level=4,
        op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(str(float_path)), algo_config=cfg)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))
    return out


PEAK_RSS_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
if sys.argv[1] == "-":
    print(hwm()); raise SystemExit
o = ort.SessionOptions(); o.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
s.run(None, {"input_ids": np.ascontiguousarray(x[:, 0]), "attention_mask": np.ascontiguousarray(x[:, 1])})
print(hwm())
"""


def peak_session_rss(path: Path | None, batch: Path) -> float:
    """Peak RSS (MB) of a fresh process that only loads ``path`` in onnxruntime (default
    optimizations) and runs ``batch`` once; ``path`` None: the process with onnxruntime imported."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, "-" if path is None else str(path), str(batch)],
        capture_output=True,
        text=True,
    )
    return float(out.stdout.split()[-1]) if out.returncode == 0 else float("nan")


def nncf_quantize(float_path: Path, out: Path, calib: np.ndarray) -> str | None:
    """NNCF's post-training quantization (ONNX backend, transformer preset) of the float ONNX
    model, calibrated on ``calib``; returns why it could not run, or None."""
    try:
        import nncf
        import onnx
    except ImportError as err:
        return f"nncf not installed ({err}): pip install -e '.[bench]'"
    try:
        data = nncf.Dataset(
            list(calib), lambda x: {"input_ids": np.ascontiguousarray(x[None, 0]), "attention_mask": x[None, 1].copy()}
        )
        q = nncf.quantize(
            onnx.load(str(float_path)), data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib)
        )
        onnx.save(q, str(out))
    except Exception as err:  # a peer that fails is reported in the table, not fatal
        return f"nncf.quantize failed: {type(err).__name__}: {err}"[:300]
    try:
        import onnxruntime as ort

        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    except Exception as err:
        # Measured with NNCF 3.4.0 and onnxruntime 1.32 on the opset-21 export: "QuantizeLinear
        # output_dtype INT8 does not match y_zero_point type UINT8"; an older opset is no way
        # out (Gelu exists only from opset 20, so the exporter cannot go below it).
        return f"NNCF {nncf.__version__}'s model does not load in onnxruntime {ort.__version__}: {err}"[:300]
    return None


def speed_table(args) -> int:
    """Issue 11's side-by-side: float ONNX, onnxruntime quantize_dynamic (per tensor / per
    channel), NNCF's post-training quantization and ours; latency as ratios to float and to the
    best peer, measured in interleaved rounds at each of ``--threads``; fidelity (ORT outputs,
    one sentence at a time) on the held-out and the informal held-out sets; the peak RSS of a
    process that loads the model and runs batch 32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from compress.export.quantized import ort_session
    from compress.models.minilm import minilm, tokenize

    model = minilm(pretrained=True)
    calib = torch.as_tensor(tokenize(read_lines(DATA / "sentences_calibration.txt"), LENGTH))
    sets = {
        k: torch.as_tensor(tokenize(read_lines(DATA / f), LENGTH))
        for k, f in (("held-out", "sentences_heldout.txt"), ("informal", "sentences_heldout_informal.txt"))
    }
    refs = {k: predict(model, v) for k, v in sets.items()}
    data = DataBundle(
        {"calibration": Split("calibration", calib, None, 32, 0), "eval": Split("eval", sets["held-out"], None, 64, 0)}
    )
    xh = sets["held-out"].numpy()
    lengths = xh[:, 1].sum(1)
    one, batch32 = xh[np.argsort(lengths)[len(lengths) // 2]][None], xh[:32]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {}
        state, _ = apply_stages(model, [], data, args.calibration)
        # The peers quantize torch's export as it is; ours fuse attention as the export stage does.
        paths["float"], _ = export(state, tmp / "float.onnx", fuse_attention=False)
        paths["float, attention fused (ours)"], _ = export(state, tmp / "float_fused.onnx")
        for pc in (False, True):
            q = tmp / f"ort{pc}.onnx"
            quantize_dynamic(str(paths["float"]), str(q), weight_type=QuantType.QInt8, per_channel=pc)
            paths[f"ORT quantize_dynamic int8 {'per-channel' if pc else 'per-tensor'}"] = q
        if any(" int4" in k for k in args.variants):
            paths[FOUR_BIT_PEER] = ort_4bit(paths["float"], tmp / "ort4.onnx")
        if not args.no_nncf:
            why = nncf_quantize(paths["float"], tmp / "nncf.onnx", calib[: args.calibration].numpy())
            if why is None:
                paths["NNCF quantize (ONNX, transformer preset)"] = tmp / "nncf.onnx"
            else:
                notes.append(f"NNCF row missing: {why}")
        for name in args.variants:
            kept = None
            if args.keep is not None:  # reuse an export of the same variant and calibration
                key = json.dumps([SPEED_VARIANTS[name], args.calibration, "fused attention"], sort_keys=True)
                kept = args.keep / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
                if kept.is_file():
                    paths[name] = kept
                    print(f"# {name}: reusing {kept}", flush=True)
                    continue
            state, secs = apply_stages(model, [("quantize", SPEED_VARIANTS[name])], data, args.calibration)
            paths[name], _ = export(state, tmp / f"v{len(paths)}.onnx")
            if kept is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(paths[name], kept)
            print(f"# {name}: quantized in {secs:.0f}s", flush=True)
        # What the peers' speed owes to session settings: the best-known peer under ours.
        pc = "ORT quantize_dynamic int8 per-channel"
        paths[f"{pc}, our session settings"] = paths[pc]
        mine = {"float, attention fused (ours)", f"{pc}, our session settings", *args.variants}
        np.save(tmp / "batch32.npy", trim(batch32))
        rss = {k: peak_session_rss(p, tmp / "batch32.npy") for k, p in paths.items()}
        rss_base = peak_session_rss(None, tmp / "batch32.npy")
        peers = [k for k in paths if k.startswith(("ORT", "NNCF")) and k not in mine]
        fid, ratios = {}, {}
        for threads in args.threads:
            # Each file runs under the session settings its tool ships: onnxruntime's defaults for the
            # float export and the peers; the export stage's (and the device bundle's) for ours.
            sessions = {
                k: ort_session(p, threads=threads, exact=False, disabled_optimizers=our_session() if k in mine else ())
                for k, p in paths.items()
            }
            if not fid:
                for k, sess in sessions.items():
                    fid[k] = {
                        s: compare_outputs(torch.as_tensor(ort_embed(sess, v.numpy(), batch=1)), refs[s])
                        for s, v in sets.items()
                    }
            times = {(k, b): [] for k in sessions for b in (1, 32)}
            for _ in range(args.rounds):  # interleaved rounds
                for k, sess in sessions.items():
                    times[(k, 1)].append(latency(sess, one, 30))
                    times[(k, 32)].append(latency(sess, batch32, 3))
            med = {kb: float(np.median(v)) for kb, v in times.items()}
            for k in sessions:
                for b in (1, 32):
                    best = min(med[(q, b)] for q in peers)
                    ratios[(k, threads, b)] = (med[(k, b)] / med[("float", b)], med[(k, b)] / best)
            del sessions
        print(
            f"\nall-MiniLM-L6-v2, calibration {args.calibration}, median of {args.rounds} interleaved rounds; "
            "latency as ratios (x float, x the best peer: onnxruntime's and NNCF's quantizers); fidelity: ORT "
            f"outputs vs the float PyTorch model; peak RSS: a process that loads the model and runs batch 32 "
            f"(onnxruntime imported alone: {rss_base:.0f} MB)"
        )
        lat_cols = [f"{t}t b{b} / {ref}" for t in args.threads for ref in ("float", "best peer") for b in (1, 32)]
        head = ["variant", "ONNX MB", "peak RSS MB", *lat_cols, "mean cos held-out", "p05 held-out"]
        head += ["mean cos informal", "p05 informal"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for k, p in paths.items():
            f = fid[k]
            cells = [k, f"{onnx.load(str(p), load_external_data=False).ByteSize() / 1e6:.1f}", f"{rss[k]:.0f}"]
            cells += [f"{ratios[(k, t, b)][i]:.2f}" for t in args.threads for i in (0, 1) for b in (1, 32)]
            cells += [f"{f[s][m]:.4f}" for s in ("held-out", "informal") for m in ("cosine", "cosine_p05")]
            print("| " + " | ".join(cells) + " |", flush=True)
        for note in notes:
            print(note)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--speed",
        action="store_true",
        help="only issue 11's table: float vs onnxruntime quantize_dynamic vs ours (integer kernels); "
        "--variants then names SPEED_VARIANTS",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="onnxruntime intra-op threads (--speed: 1 2)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--speed: interleaved latency rounds")
    parser.add_argument("--no-nncf", action="store_true", help="--speed: leave out NNCF's quantizer")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="--speed: a folder to keep our variants' ONNX exports in and reuse them from (by variant config and "
        "calibration; empty it after changing the quantizer or the export)",
    )
    parser.add_argument("--calibration", type=int, default=128, help="GPFQ calibration sentences")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="subset of variants to run")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    if args.speed:
        args.threads = args.threads or [1, 2]
        if args.variants == list(VARIANTS):
            args.variants = list(SPEED_VARIANTS)
        return speed_table(args)
    args.threads = (args.threads or [1])[0]

    from compress.lossless.config import CompressStageConfig
    from compress.lossless.stage import pack_state
    from compress.metrics import model_size
    from compress.models.minilm import minilm, tokenize

    started = time.perf_counter()
    model = minilm(pretrained=True)
    calib = torch.as_tensor(tokenize(read_lines(DATA / "sentences_calibration.txt"), LENGTH))
    held = torch.as_tensor(tokenize(read_lines(DATA / "sentences_heldout.txt"), LENGTH))
    # A second held-out set of another style (chat, commands, URLs, code): not calibrated on.
    held2 = torch.as_tensor(tokenize(read_lines(DATA / "sentences_heldout_informal.txt"), LENGTH))
    reference2 = predict(model, held2)
    data = DataBundle(
        {
            "train": Split("train", calib, None, 32, 0),
            "calibration": Split("calibration", calib, None, 32, 0),
            "eval": Split("eval", held, None, 64, 0),
        }
    )
    reference = predict(model, held)
    xh = held.numpy()
    lengths = xh[:, 1].sum(1)
    median_one = xh[np.argsort(lengths)[len(lengths) // 2]][None]
    batch32 = xh[:32]
    print(
        f"all-MiniLM-L6-v2: {len(calib)} calibration / {len(held)} held-out sentences, "
        f"{int(lengths.min())}-{int(lengths.max())} tokens (median {int(np.median(lengths))}), "
        f"ORT threads {args.threads}, GPFQ calibration {args.calibration}"
    )

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        float_onnx = None
        for name in args.variants:
            state, seconds = apply_stages(model, VARIANTS[name], data, args.calibration)
            out = predict(state.module, held)
            fid = compare_outputs(out, reference, retrieval=True)
            params, _ = count_parameters(state.module)
            packed = pack_state(state, tmp / "w.czip", CompressStageConfig())
            path, _sig = export(state, tmp / f"v{len(rows)}.onnx")
            if name == "float":  # the peers quantize torch's export as it is (no fused attention)
                float_onnx, _ = export(state, tmp / "float_plain.onnx", fuse_attention=False)
            sess = session(path, bool(state.quant), args.threads)
            ort_out = ort_embed(sess, xh)
            ort_vs_torch = compare_outputs(torch.as_tensor(ort_out), out)["cosine_p05"]
            fast = session(path, bool(state.quant), args.threads, exact=False)
            fast_cos = compare_outputs(torch.as_tensor(ort_embed(fast, xh)), reference)["cosine"]
            fid2 = compare_outputs(torch.as_tensor(ort_embed(fast, held2.numpy())), reference2)
            rows.append(
                {
                    "variant": name,
                    "cos": fid["cosine"],
                    "p05": fid["cosine_p05"],
                    "nn": fid["retrieval_agreement"],
                    "params": params,
                    "dense": params * 4,
                    "stored": model_size(state.module, state.quant)["stored_bytes"],
                    "packed": (tmp / "w.czip").stat().st_size if packed is not None else None,
                    "onnx": path.stat().st_size,
                    "lat1": latency(sess, median_one, 50),
                    "lat32": latency(sess, batch32, 5),
                    "fast1": latency(fast, median_one, 50),
                    "fast32": latency(fast, batch32, 5),
                    "fast_cos": fast_cos,
                    "ort_parity": min(ort_vs_torch, varying_length_parity(sess, state.module, xh)),
                    "seconds": seconds,
                    "cos2": fid2["cosine"],
                    "p05_2": fid2["cosine_p05"],
                }
            )
            print(f"  {name}: cosine {fid['cosine']:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)

        if float_onnx is not None:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            from compress.runtime import ort_session

            for per_channel in (False, True):
                q = tmp / f"ort_int8_{per_channel}.onnx"
                t0 = time.perf_counter()
                quantize_dynamic(str(float_onnx), str(q), weight_type=QuantType.QInt8, per_channel=per_channel)
                seconds = time.perf_counter() - t0
                sess = ort_session(q, args.threads)
                ort_out = torch.as_tensor(ort_embed(sess, xh))
                fid = compare_outputs(ort_out, reference, retrieval=True)
                fid2 = compare_outputs(torch.as_tensor(ort_embed(sess, held2.numpy())), reference2)
                rows.append(
                    {
                        "variant": f"ORT quantize_dynamic int8 {'per-channel' if per_channel else 'per-tensor'} (baseline)",
                        "cos": fid["cosine"],
                        "p05": fid["cosine_p05"],
                        "nn": fid["retrieval_agreement"],
                        "params": rows[0]["params"],
                        "dense": rows[0]["dense"],
                        "stored": None,
                        "packed": None,
                        "onnx": q.stat().st_size,
                        "lat1": latency(sess, median_one, 50),
                        "lat32": latency(sess, batch32, 5),
                        "fast1": float("nan"),
                        "fast32": float("nan"),
                        "fast_cos": float("nan"),
                        "ort_parity": float("nan"),
                        "seconds": seconds,
                        "cos2": fid2["cosine"],
                        "p05_2": fid2["cosine_p05"],
                    }
                )

    mb = lambda b: "-" if b is None else f"{b / 1e6:.1f}"  # noqa: E731
    print()
    print(
        "| variant | mean cos | p05 cos | NN agree | params | dense MB | stored MB | packed MB | ONNX MB "
        "| ORT b1 ms | ORT b32 ms | fast b1 ms | fast b32 ms | fast b1 / float | fast b32 / float | fast cos "
        "| informal cos (fast) | informal p05 | ORT vs torch (min cos) | stage s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    f1 = next((r["lat1"] for r in rows if r["variant"] == "float"), float("nan"))
    f32 = next((r["lat32"] for r in rows if r["variant"] == "float"), float("nan"))
    for r in rows:
        best1 = r["lat1"] if np.isnan(r["fast1"]) else r["fast1"]
        best32 = r["lat32"] if np.isnan(r["fast32"]) else r["fast32"]
        print(
            f"| {r['variant']} | {r['cos']:.4f} | {r['p05']:.4f} | {r['nn']:.3f} | {r['params'] / 1e6:.2f} M "
            f"| {mb(r['dense'])} | {mb(r['stored'])} | {mb(r['packed'])} | {mb(r['onnx'])} "
            f"| {r['lat1']:.2f} | {r['lat32']:.1f} | {r['fast1']:.2f} | {r['fast32']:.1f} "
            f"| {best1 / f1:.2f} | {best32 / f32:.2f} | {r['fast_cos']:.4f} "
            f"| {r['cos2']:.4f} | {r['p05_2']:.4f} | {r['ort_parity']:.6f} | {r['seconds']:.1f} |"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
