"""GPFQ at scale: time, throughput and peak memory from MiniLM-sized to BERT-large-sized models.

    python benchmarks/gpfq_scale.py [--quick] [--large] [--bits 8] [--threads 2] [--nproc N]

Random-initialised BERT encoders (``transformers.BertConfig``, wrapped like the MiniLM
model: ids stacked on attention masks, mean pooling) quantized with GPFQ (the quantize
stage's defaults: per-channel, ``scale_factor: auto`` with a 25% hold-out) on the same
calibration data: 64 sequences of 128 tokens (``--quick``: 16 of 64), a quarter of them
padded to half length. Each config runs in its own process; peak RSS is that process's
high-water mark (``VmHWM``) over the GPFQ call, reset just before it (``/proc/self/clear_refs``),
so it includes the model itself. Columns: parameters (all / the GPFQ-quantized weights),
GPFQ seconds, quantized weights per second, peak RSS. ``--nproc N`` runs each config on N
gloo processes (``--threads`` each) doing exact data-parallel calibration (rank 0's time and RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    "minilm-22M": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base-110M": dict(),  # BertConfig() defaults
    "bert-large-335M": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(name: str, samples: int, tokens: int, bits: int) -> dict:
    """Build the config, quantize it, return its row (runs inside the worker process)."""
    import torch
    import transformers

    from compress.models.minilm import MiniLMEmbedder
    from compress.quantize.config import GPFQConfig
    from compress.quantize.gpfq import AUTO_SCALE_FACTORS, RTN_GRID, LayerPlan, gpfq_quantize_model
    from compress.quantize.stage import weight_targets

    torch.manual_seed(0)
    model = MiniLMEmbedder(transformers.BertModel(transformers.BertConfig(**CONFIGS[name]))).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (samples, tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[: samples // 4, tokens // 2 :] = 0
    ids[mask == 0] = 0
    calib = torch.stack([ids, mask], 1)
    cfg = GPFQConfig(bits=bits)
    plans = {
        t.layer if t.attr == "weight" else f"{t.layer}.{t.attr}": LayerPlan(bits, cfg.granularity, cfg.group_size)
        for t in weight_targets(model).values()
    }
    params = sum(p.numel() for p in model.parameters())
    quantized = sum(model.get_submodule(k).weight.numel() for k in plans)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current RSS
    start = time.perf_counter()
    gpfq_quantize_model(
        model,
        calib,
        plans,
        scale_factor=(*AUTO_SCALE_FACTORS, RTN_GRID),
        auto_holdout=cfg.auto_holdout,
        batch_size=cfg.batch_size,
        max_patches=cfg.max_patches,
        block_size=cfg.block_size,
    )
    seconds = time.perf_counter() - start
    return {
        "config": name,
        "params": params,
        "quantized": quantized,
        "seconds": seconds,
        "params_per_second": quantized / seconds,
        "peak_rss_mb": _rss_peak_mb(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 sequences of 64 tokens (a couple of minutes)")
    ap.add_argument("--large", action="store_true", help="also the 335 M BERT-large-sized config")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--configs", nargs="*", help="run only these configs")
    ap.add_argument("--nproc", type=int, default=1, help="processes per config (gloo process group)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    samples, tokens = (16, 64) if args.quick else (64, 128)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        if args.nproc > 1:
            import torch.distributed as dist

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
            dist.init_process_group("gloo", rank=args.rank, world_size=args.nproc)
        row = run_one(args.worker, samples, tokens, args.bits)
        if args.rank == 0:
            print(json.dumps(row | {"nproc": args.nproc}))
        return
    names = args.configs or [n for n in CONFIGS if args.large or n != "bert-large-335M"]
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--bits", str(args.bits), "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        port = _free_port()
        procs = [
            subprocess.Popen(
                [*cmd, "--nproc", str(args.nproc), "--rank", str(r), "--port", str(port)],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
            for r in range(args.nproc)
        ]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"{name}: a worker failed")
        rows.append(json.loads(outs[0].strip().splitlines()[-1]))
        r = rows[-1]
        print(f"# {name}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(
        f"GPFQ int{args.bits}, {samples} sequences x {tokens} tokens, {args.nproc} process(es) x {args.threads} threads"
    )
    print(f"{'config':<18}{'params':>10}{'quantized':>11}{'GPFQ s':>9}{'params/s':>11}{'peak RSS':>11}")
    for r in rows:
        print(
            f"{r['config']:<18}{r['params'] / 1e6:>9.1f}M{r['quantized'] / 1e6:>10.1f}M{r['seconds']:>9.1f}"
            f"{r['params_per_second'] / 1e6:>10.2f}M{r['peak_rss_mb'] / 1024:>8.2f}GiB"
        )
    if len(rows) >= 2:
        print(
            f"throughput {rows[1]['config']} / {rows[0]['config']}: "
            f"{rows[1]['params_per_second'] / rows[0]['params_per_second']:.2f}"
        )


if __name__ == "__main__":
    main()
