"""Scale benchmark (issue 17): random-initialised models of 22 M to 1.1 B parameters through
`compress run` with GPFQ int4 → lossless compress → ONNX export, then `compress validate`.

    python benchmarks/scale.py                 # bert-22m and bert-110m (the default)
    python benchmarks/scale.py --configs bert-350m
    python benchmarks/scale.py --large         # adds llama-1.1b (needs ~16 GB RAM free)
    python benchmarks/scale.py --configs llama-tiny --keep /tmp/scale   # a smoke test

Each config is a transformers model random-initialised from a config (seed 0): BERT
encoders in the MiniLM wrapper (``compress.models.minilm:bert``: mean-pooled embeddings,
``input_ids`` + ``attention_mask``) and a Llama-style decoder with tied embeddings
(``compress.models.llama``: next-token logits at the last token). The model file is the
state_dict (``torch.save``; bf16 for the decoder, as a 1 B checkpoint ships).

Calibration: 64 windows of 128 real tokens (``compress.models.llama:token_windows``: the
offline text of ``recipes/data/sentences_calibration.txt``, BERT WordPiece ids, windows
with stride 48); eval (parity, latency, the bundle's reference): 16 windows of the held-out
sentences. ``--random-tokens`` uses uniformly random token ids instead (the fallback for
random-init models). GPFQ int4, per output channel, fixed scale_factor 1.16 (not auto),
every Linear layer; the export's parity is onnxruntime's fast int4 kernels (8-bit
activations) against PyTorch, judged by per-sample cosine (gate 0.99).

Columns: parameters; per-stage wall seconds and peak RSS (``peak_rss_bytes`` of report.json's
stage rows when the pipeline records it; otherwise only the whole `compress run` process's
peak RSS, from /usr/bin/time -v); ONNX size (graph + external data file); parity (min
cosine, next-token agreement for the decoder); whether `compress validate bundle.czip`
passes, and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data"

CONFIGS: dict[str, dict] = {
    "bert-22m": {
        "factory": "compress.models.minilm:bert",
        "kwargs": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    },
    "bert-110m": {"factory": "compress.models.minilm:bert", "kwargs": {}, "bert_defaults": True},
    "bert-350m": {
        "factory": "compress.models.minilm:bert",
        "kwargs": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    },
    "llama-1.1b": {"factory": "compress.models.llama:llama_1b", "kwargs": {}, "decoder": True, "bf16": True},
    # not benchmark rows: the 1.1 B widths with 2 of its 22 blocks (per-block time and memory
    # in minutes, to extrapolate), and the same path at a size that runs in a minute
    "llama-1.1b-2l": {
        "factory": "compress.models.llama:llama",
        "kwargs": {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 2,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "tie_word_embeddings": True,
        },
        "decoder": True,
        "bf16": True,
    },
    "llama-tiny": {"factory": "compress.models.llama:llama", "kwargs": {"vocab_size": 32000}, "decoder": True},
}
DEFAULT = ["bert-22m", "bert-110m"]
CALIBRATION = 64
LENGTH = 128
SCALE_FACTOR = 1.16


def recipe_text(name: str, spec: dict, random_tokens: bool, batch_size: int, float_only: bool = False) -> str:
    kwargs = dict(spec["kwargs"])
    if spec.get("bert_defaults"):  # BertConfig() defaults: hidden 768, 12 layers, 12 heads, FFN 3072
        kwargs = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    if random_tokens:
        vocab = 32000 if spec.get("decoder") else 30522
        calib = {"source": "callable", "fn": "compress.models.llama:random_tokens"}
        calib["kwargs"] = {"samples": CALIBRATION, "length": LENGTH, "vocab_size": vocab}
        evals = {"source": "callable", "fn": "compress.models.llama:random_tokens"}
        evals["kwargs"] = {"samples": 16, "length": LENGTH, "vocab_size": vocab}
    else:
        calib = {"source": "callable", "fn": "compress.models.llama:token_windows"}
        calib["kwargs"] = {
            "path": str(DATA / "sentences_calibration.txt"),
            "length": LENGTH,
            "stride": 48,  # 64 windows need overlap: the file holds ~3,900 tokens
            "samples": CALIBRATION,
        }
        evals = {"source": "callable", "fn": "compress.models.llama:token_windows"}
        evals["kwargs"] = {"path": str(DATA / "sentences_heldout.txt"), "length": LENGTH, "samples": 16}
    calib["batch_size"] = batch_size
    evals["batch_size"] = batch_size
    quantize = {
        "method": "gpfq",
        "bits": 4,
        "scale_factor": SCALE_FACTOR,
        "calibration_samples": CALIBRATION,
        "batch_size": batch_size,
    }
    export = {
        "opset": 21,
        "min_agreement": 0.0,  # argmax over embedding dimensions means nothing; reported for the decoder
        "fast_kernel_min_cosine": 0.99,
        "latency_runs": 10,
        "latency_warmup": 2,
        "compare_float": False,  # a second (float) ONNX of a 1 B model would double the disk and RAM
        # 4-bit weights stay 4-bit in onnxruntime's memory (the default folds them to float32 at
        # load: 4.4 GB for the 1.1 B decoder)
        "weight_only_kernel": "matmul_nbits",
    }
    doc = {
        "version": 1,
        "name": f"scale-{name}",
        "seed": 0,
        "model": {"factory": spec["factory"], "kwargs": kwargs, "input_shape": [1, 2, LENGTH], "input_dtype": "int64"},
        "data": {"calibration": calib, "eval": evals},
        "stages": [{"export": export}]
        if float_only
        else [{"quantize": quantize}, {"compress": {}}, {"export": export}],
        "gates": {},
    }
    return json.dumps(doc, indent=1)  # JSON is YAML


def make_model(spec: dict, kwargs: dict, path: Path) -> tuple[int, float, int]:
    """Create the model, save its state_dict; returns (parameters, seconds, peak RSS bytes)
    measured in a child process, so this process stays small."""
    code = (
        "import json, resource, sys, time, torch\n"
        "from compress.imports import import_callable\n"
        "t = time.perf_counter()\n"
        f"m = import_callable({spec['factory']!r}, what='factory', error=ValueError)(**json.loads({json.dumps(json.dumps(kwargs))}))\n"
        "n = sum(p.numel() for p in m.parameters())\n"
        f"sd = {{k: (v.to(torch.bfloat16) if {bool(spec.get('bf16'))} and v.is_floating_point() else v)"
        " for k, v in m.state_dict().items()}\n"
        f"torch.save(sd, {str(path)!r})\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps({'params': n, 'seconds': time.perf_counter() - t, 'rss': rss}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"creating the model failed:\n{out.stderr[-3000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return info["params"], info["seconds"], info["rss"]


def timed(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run ``cmd`` under /usr/bin/time -v: (exit code, wall seconds, peak RSS bytes)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    return rc, seconds, int(m.group(1)) * 1024 if m else -1


def gb(n: float | None) -> str:
    return "-" if n is None or n < 0 else f"{n / 1e9:.2f}"


def run_config(name: str, work: Path, random_tokens: bool, batch_size: int, float_only: bool = False) -> dict:
    spec = CONFIGS[name]
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(name, spec, random_tokens, batch_size, float_only))
    kwargs = json.loads(recipe.read_text())["model"]["kwargs"]
    model = folder / "model.pt"
    params, create_s, create_rss = make_model(spec, kwargs, model)
    print(f"[{name}] {params / 1e6:.1f} M parameters, created in {create_s:.0f} s", flush=True)
    out = folder / "out"
    rc, run_s, run_rss = timed(
        [sys.executable, "-m", "compress", "run", str(recipe), str(model), "--out", str(out), "--force", "--verbose"],
        folder / "run.log",
    )
    row: dict = {"config": name, "params": params, "create_s": create_s, "create_rss": create_rss}
    row.update(run_rc=rc, run_s=run_s, run_rss=run_rss)
    report_path = out / "report.json"
    if not report_path.is_file():
        print(f"[{name}] compress run exited {rc} without a report; see {folder / 'run.log'}", flush=True)
        return row
    report = json.loads(report_path.read_text())
    row["stages"] = {
        r["stage"]: {"seconds": r.get("seconds"), "peak_rss_bytes": r.get("peak_rss_bytes")} for r in report["stages"]
    }
    export = next((r for r in report["stages"] if r["stage"] == "export"), {})
    metrics = export.get("metrics") or {}
    row["onnx_bytes"] = metrics.get("onnx_bytes")
    row["onnx_external"] = bool(metrics.get("onnx_external_data_bytes"))
    row["cosine_min"] = metrics.get("ort_cosine_min")
    row["agreement"] = metrics.get("ort_agreement") if spec.get("decoder") else None
    quantized = next((r for r in report["stages"] if r["stage"] == "quantize"), {})
    row["fidelity_cosine"] = quantized.get("cosine")  # int4 model vs the float model, eval split
    row["fidelity_agreement"] = quantized.get("agreement") if spec.get("decoder") else None
    row["passed"] = report["passed"]
    row["failures"] = report["failures"]
    vrc, v_s, v_rss = timed(
        [sys.executable, "-m", "compress", "validate", str(out / "bundle.czip"), "--runs", "5"], folder / "validate.log"
    )
    row.update(validate_rc=vrc, validate_s=v_s, validate_rss=v_rss)
    return row


def print_table(rows: list[dict]) -> None:
    stages = ["quantize", "compress", "export"]
    head = (
        f"{'config':<11} {'params':>8} {'create s':>8} "
        + " ".join(f"{s + ' s':>11} {s[:5] + ' GB':>8}" for s in stages)
        + f" {'run s':>7} {'run GB':>7} {'onnx MB':>8} {'ext':>3} {'cos min':>7} {'next-tok':>8} {'fid cos':>7} {'fid tok':>7}"
        + f" {'passed':>6} {'bundle':>6} {'val GB':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        st = r.get("stages", {})
        cells = []
        for s in stages:
            row = st.get(s, {})
            secs = row.get("seconds")
            cells.append(f"{secs:>11.1f}" if secs is not None else f"{'-':>11}")
            cells.append(f"{gb(row.get('peak_rss_bytes')):>8}")
        onnx_mb = f"{r['onnx_bytes'] / 1e6:>8.1f}" if r.get("onnx_bytes") else f"{'-':>8}"
        cos = f"{r['cosine_min']:>7.4f}" if r.get("cosine_min") is not None else f"{'-':>7}"
        agree = f"{r['agreement']:>8.3f}" if r.get("agreement") is not None else f"{'-':>8}"
        fid = f"{r['fidelity_cosine']:>7.4f}" if r.get("fidelity_cosine") is not None else f"{'-':>7}"
        fid_tok = f"{r['fidelity_agreement']:>7.3f}" if r.get("fidelity_agreement") is not None else f"{'-':>7}"
        print(
            f"{r['config']:<11} {r['params'] / 1e6:>7.1f}M {r['create_s']:>8.1f} "
            + " ".join(cells)
            + f" {r['run_s']:>7.1f} {gb(r['run_rss']):>7} {onnx_mb} {'yes' if r.get('onnx_external') else 'no':>3}"
            + f" {cos} {agree} {fid} {fid_tok} {r.get('passed', False)!s:>6}"
            + f" {'ok' if r.get('validate_rc') == 0 else 'FAIL':>6} {gb(r.get('validate_rss')):>6}"
        )
    print(
        "stage GB: peak RSS per stage from report.json (peak_rss_bytes), '-' when the pipeline does not record it; "
        "run GB: peak RSS of the whole `compress run` process (/usr/bin/time -v); create: model construction + "
        "torch.save in a separate process; cos min / next-tok: onnxruntime vs PyTorch (parity, export stage); "
        "fid cos / fid tok: the int4 model vs the float model on the eval split (quantize stage); "
        "bundle: `compress validate bundle.czip` exit 0."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--large", action="store_true", help="also run llama-1.1b (needs ~16 GB of RAM)")
    parser.add_argument("--random-tokens", action="store_true", help="random token ids instead of offline text")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration / eval batch size")
    parser.add_argument(
        "--float-only",
        action="store_true",
        help="export only, no quantization: model creation + float ONNX export (external data over 1 GiB) + parity",
    )
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    names = args.configs or (DEFAULT + (["llama-1.1b"] if args.large else []))
    work = args.keep or Path(tempfile.mkdtemp(prefix="compress-scale-"))
    rows = []
    try:
        for name in names:
            rows.append(run_config(name, work, args.random_tokens, args.batch_size, args.float_only))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    what = "float export only (no quantization)" if args.float_only else f"GPFQ int4 (scale_factor {SCALE_FACTOR})"
    print(
        f"{what}, {CALIBRATION} calibration sequences of {LENGTH} tokens "
        f"({'random tokens' if args.random_tokens else 'offline text windows'}); "
        f"{os.cpu_count()} CPU cores"
    )
    print_table(rows)
    for r in rows:
        if r.get("failures"):
            print(f"{r['config']}: failed gates: {r['failures']}")
    return 0 if all(r.get("passed") and r.get("validate_rc") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
