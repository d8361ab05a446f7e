"""Peak memory of the pipeline's load step and of a quantize stage on a BERT-base-sized model.

    python benchmarks/load_memory.py                        # .pt and .safetensors, float32
    python benchmarks/load_memory.py --formats pt --dtypes float32 bfloat16

The model is a random-initialised BERT-base (``transformers.BertConfig()`` defaults,
109 M parameters) behind the MiniLM wrapper (``compress.models.minilm.MiniLMEmbedder``:
token ids stacked on the attention mask, mean-pooled embeddings), so the held-out
sentences of ``recipes/data`` (tokenised with MiniLM's tokenizer, which has BERT-base's
vocabulary) are its eval data. Each configuration runs in a fresh process: the model file
is written first, then ``compress.pipeline.run`` runs a one-stage recipe (quantize, RTN
int8) on it and the process's peak RSS is read per step:

* **load**: model load, data, the model's reference outputs on the eval split and the
  input row's measurement (everything before the first stage starts);
* **quantize**: the stage, saving its state and measuring it.

Peak RSS comes from ``VmHWM`` in ``/proc/self/status``, reset before each step by writing
``5`` to ``/proc/self/clear_refs`` (Linux). The table shows it in MB and as bytes per
parameter above the process's RSS before the run (imports, tokenizer), so it is what the
model costs, not the interpreter. When the run's report.json carries ``peak_rss_bytes``
per stage row, those are printed too (they must agree with the outside measurement).

Needs the ``transformers`` extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data"


def bert_base(max_position_embeddings: int = 512):
    """A random-initialised BERT-base (BertConfig() defaults) as a pipeline model."""
    import transformers

    from compress.models.minilm import MiniLMEmbedder

    config = transformers.BertConfig(max_position_embeddings=max_position_embeddings)
    config._attn_implementation = "eager"
    return MiniLMEmbedder(transformers.BertModel(config, add_pooling_layer=False)).eval()


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _write_model(path: Path, dtype: str) -> int:
    import torch

    torch.manual_seed(0)
    model = bert_base()
    sd = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return sum(p.numel() for p in model.parameters())


def _one(fmt: str, dtype: str, work: Path) -> dict:
    """Write the model, run the pipeline on it in this process, return the measurements."""
    model_path = work / f"bert_base_{dtype}.{fmt}"
    # A child process writes the file, so building it does not raise this process's peak.
    params = int(
        subprocess.check_output(
            [sys.executable, __file__, "--write", str(model_path), "--dtype", dtype], cwd=ROOT, text=True
        ).split()[-1]
    )
    import torch

    from compress import pipeline
    from compress.models.minilm import tokenize
    from compress.recipe import parse_recipe

    tokenize(["warm up the tokenizer"], max_length=48)
    recipe_text = f"""
version: 1
name: load-memory
seed: 0
model:
  factory: load_memory:bert_base
  input_shape: [1, 2, 48]
  input_dtype: int64
data:
  calibration: {{source: text, path: {DATA / "sentences_calibration.txt"}, fn: "compress.models.minilm:tokenize",
         kwargs: {{max_length: 48}}, batch_size: 32}}
  eval: {{source: text, path: {DATA / "sentences_heldout.txt"}, fn: "compress.models.minilm:tokenize",
         kwargs: {{max_length: 48}}, batch_size: 64}}
stages:
  - quantize: {{method: rtn, bits: 8}}
"""
    recipe = parse_recipe(recipe_text)
    marks: dict[str, int] = {}

    class Probe:
        def stage_started(self, index, total, name):
            marks["load"] = _status_bytes("VmHWM")
            _reset_peak()

        def stage_finished(self, index, total, row):
            marks[row["stage"]] = _status_bytes("VmHWM")

    torch.set_num_threads(2)
    base = _status_bytes("VmRSS")
    _reset_peak()
    result = pipeline.run(recipe, model_path, work / "run", reporter=Probe(), force=True)
    rows = {r["stage"]: r.get("peak_rss_bytes") for r in result.report["stages"]}
    return {
        "format": fmt,
        "dtype": dtype,
        "parameters": params,
        "file_bytes": model_path.stat().st_size,
        "base_rss": base,
        "load_peak": marks["load"],
        "quantize_peak": marks.get("quantize"),
        "report_load_peak": rows.get("input"),
        "report_quantize_peak": rows.get("quantize"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["pt", "safetensors"], choices=["pt", "safetensors"])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("FORMAT", "DTYPE", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))  # the recipe's factory: load_memory:bert_base
    if args.write:
        print(_write_model(args.write, args.dtype))
        return
    if args.one:
        import logging

        logging.basicConfig(level=logging.WARNING)
        fmt, dtype, work = args.one
        try:
            print(json.dumps(_one(fmt, dtype, Path(work))))
        except Exception as err:  # an older loader refuses .safetensors: say so in the table
            print(json.dumps({"format": fmt, "dtype": dtype, "error": f"{type(err).__name__}: {err}"[:120]}))
        return
    mb = 1e6
    print(
        f"{'file':>12} {'dtype':>9} {'params':>12} {'base MB':>8} {'load MB':>8} {'load B/p':>8} "
        f"{'quant MB':>8} {'quant B/p':>9} {'report load/quant MB':>21}"
    )
    for fmt in args.formats:
        for dtype in args.dtypes:
            with tempfile.TemporaryDirectory(prefix="load-memory-") as work:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", fmt, dtype, work], cwd=ROOT, text=True, capture_output=True
                )
            if out.returncode != 0 or not out.stdout.strip():
                print(f"{fmt:>12} {dtype:>9} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if "error" in r:
                print(f"{fmt:>12} {dtype:>9} {r['error']}")
                continue
            n, base = r["parameters"], r["base_rss"]
            rep = "-"
            if r["report_load_peak"] is not None:
                rep = f"{r['report_load_peak'] / mb:.0f} / {r['report_quantize_peak'] / mb:.0f}"
            print(
                f"{fmt:>12} {dtype:>9} {n:>12,} {base / mb:>8.0f} {r['load_peak'] / mb:>8.0f} "
                f"{(r['load_peak'] - base) / n:>8.2f} {r['quantize_peak'] / mb:>8.0f} "
                f"{(r['quantize_peak'] - base) / n:>9.2f} {rep:>21}"
            )


if __name__ == "__main__":
    main()
