"""GPFQ at scale: time, throughput and peak memory from MiniLM-sized to BERT-large-sized models.

    python benchmarks/gpfq_scale.py [--quick] [--large] [--bits 8] [--threads 2] [--nproc N] [--memory low|fast]

Random-initialised BERT encoders (``transformers.BertConfig``, wrapped like the MiniLM
model: ids stacked on attention masks, mean pooling) quantized with GPFQ (the quantize
stage's defaults: per-channel, ``scale_factor: auto`` with a 25% hold-out) on the same
calibration data: 64 sequences of 128 tokens (``--quick``: 16 of 64), a quarter of them
padded to half length. Each config runs in its own process; peak RSS is that process's
high-water mark (``VmHWM``) over the GPFQ call, reset just before it (``/proc/self/clear_refs``),
so it includes the model itself. Columns: parameters (all / the GPFQ-quantized weights),
GPFQ seconds, quantized weights per second, peak RSS. ``--nproc N`` runs each config on N
gloo processes (``--threads`` each) doing exact data-parallel calibration (rank 0's time and RSS).
``--memory`` is ``compress run --memory`` (``auto``: ``low`` for BERT-base and up); the table's
last column says which ran.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
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


# Phases of a GPFQ run, as cumulative times of these functions in quantize/gpfq.py (nested:
# "statistics" holds the capture forwards, the Gram sums and the all-reduce).
PHASES = {
    "statistics": ("quantize/gpfq.py", "collect_stats"),
    "  capture forwards": ("quantize/gpfq.py", "_capture_rows"),
    "  Gram sums": ("quantize/gpfq.py", "add"),
    "  all-reduce (and waiting)": ("quantize/gpfq.py", "_gather_shards"),
    "greedy loop": ("quantize/gpfq.py", "gpfq_codes"),
    "all_gather rows": ("compress/distributed.py", "all_gather_rows"),
    "output errors (choice, report)": ("quantize/gpfq.py", "_output_errors"),
}


def _phases(profiler) -> dict[str, float]:
    """Seconds per phase (``PHASES``) from a cProfile of ``gpfq_quantize_model``, plus the rest."""
    import pstats

    cum: dict[tuple[str, str], float] = {}
    for (path, _line, fn), (_cc, _nc, _tt, ct, _callers) in pstats.Stats(profiler).stats.items():
        where = "/".join(path.split(os.sep)[-2:])
        cum[(where, fn)] = cum.get((where, fn), 0.0) + ct
    total = cum.get(("quantize/gpfq.py", "gpfq_quantize_model"), 0.0)
    out = {phase: cum.get(key, 0.0) for phase, key in PHASES.items()}
    top = [p for p in PHASES if not p.startswith(" ")]
    out["other (block forwards, candidates, copies)"] = total - sum(out[p] for p in top)
    out["total"] = total
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(
    name: str,
    samples: int,
    tokens: int,
    bits: int,
    layers: int | None = None,
    profile: str | None = None,
    memory: str = "auto",
) -> dict:
    """Build the config, quantize it, return its row (runs inside the worker process).

    ``layers`` overrides the config's depth (a short run of the same widths); ``profile``: a
    folder for this rank's cProfile of the GPFQ call (``rank<N>.prof``); ``memory``: as
    ``compress run --memory`` (``auto``: ``low`` from 256 MB of float32 weights, the size of
    the model file ``compress run`` would read).
    """
    import torch
    import transformers

    from compress.models.minilm import MiniLMEmbedder
    from compress.quantize.config import GPFQConfig
    from compress.quantize.gpfq import AUTO_SCALE_FACTORS, RTN_GRID, LayerPlan, gpfq_quantize_model
    from compress.quantize.stage import weight_targets

    torch.manual_seed(0)
    config = CONFIGS[name] | ({} if layers is None else {"num_hidden_layers": layers})
    model = MiniLMEmbedder(transformers.BertModel(transformers.BertConfig(**config))).eval()
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
    from compress.metrics import compact_heap
    from compress.pipeline import LOW_MEMORY_MODEL_BYTES

    low = memory == "low" or (memory == "auto" and params * 4 >= LOW_MEMORY_MODEL_BYTES)
    if low:
        compact_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current RSS
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
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
    if profiler is not None:
        import torch.distributed as dist

        profiler.disable()
        rank = dist.get_rank() if dist.is_initialized() else 0
        os.makedirs(profile, exist_ok=True)
        profiler.dump_stats(os.path.join(profile, f"rank{rank}.prof"))
    digest = hashlib.sha256()
    for key in sorted(plans):
        digest.update(model.get_submodule(key).weight.detach().float().numpy().tobytes())
    return {
        "phases": {} if profiler is None else _phases(profiler),
        "weights_sha256": digest.hexdigest()[:16],
        "config": name,
        "params": params,
        "quantized": quantized,
        "seconds": seconds,
        "params_per_second": quantized / seconds,
        "peak_rss_mb": _rss_peak_mb(),
        "memory": "low" if low else "fast",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 sequences of 64 tokens (a couple of minutes)")
    ap.add_argument("--large", action="store_true", help="also the 335 M BERT-large-sized config")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--configs", nargs="*", help="run only these configs")
    ap.add_argument("--nproc", type=int, default=1, help="processes per config (gloo process group)")
    ap.add_argument("--layers", type=int, help="override each config's number of blocks (a shorter run, same widths)")
    ap.add_argument("--profile", metavar="DIR", help="write each rank's cProfile of the GPFQ call to DIR/rank<N>.prof")
    ap.add_argument(
        "--compare",
        type=int,
        metavar="N",
        help="interleave 1 process x --threads with N processes x 1 thread, per config (speedup, same codes)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="pairs of runs per config with --compare")
    ap.add_argument(
        "--serial", action="store_true", help="with --compare, also 1 process x 1 thread (the bound on the speedup)"
    )
    ap.add_argument(
        "--memory", choices=("auto", "low", "fast"), default="auto", help="as compress run --memory (default auto)"
    )
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
        row = run_one(args.worker, samples, tokens, args.bits, args.layers, args.profile, args.memory)
        if args.rank == 0:
            print(json.dumps(row | {"nproc": args.nproc}))
        return
    names = args.configs or [n for n in CONFIGS if args.large or n != "bert-large-335M"]
    if args.compare:
        _compare(args, names, samples, tokens)
        return
    rows = []
    for name in names:
        rows.append(_launch(args, name, args.nproc, args.threads))
        r = rows[-1]
        print(f"# {name}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(
        f"GPFQ int{args.bits}, {samples} sequences x {tokens} tokens, {args.nproc} process(es) x {args.threads} threads"
    )
    print(f"{'config':<18}{'params':>10}{'quantized':>11}{'GPFQ s':>9}{'params/s':>11}{'peak RSS':>11}  memory")
    for r in rows:
        print(
            f"{r['config']:<18}{r['params'] / 1e6:>9.1f}M{r['quantized'] / 1e6:>10.1f}M{r['seconds']:>9.1f}"
            f"{r['params_per_second'] / 1e6:>10.2f}M{r['peak_rss_mb'] / 1024:>8.2f}GiB  {r['memory']}"
        )
    if len(rows) >= 2:
        print(
            f"throughput {rows[1]['config']} / {rows[0]['config']}: "
            f"{rows[1]['params_per_second'] / rows[0]['params_per_second']:.2f}"
        )
    _print_phases([(f"{r['config']} {args.nproc}x{args.threads}", r) for r in rows])


def _launch(args, name: str, nproc: int, threads: int) -> dict:
    """One config on ``nproc`` worker processes of ``threads`` threads each: rank 0's row."""
    cmd = [sys.executable, __file__, "--worker", name, "--bits", str(args.bits), "--threads", str(threads)]
    cmd += ["--memory", args.memory]
    if args.quick:
        cmd.append("--quick")
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if args.profile:
        cmd += ["--profile", os.path.join(args.profile, f"{name}-nproc{nproc}x{threads}")]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [*cmd, "--nproc", str(nproc), "--rank", str(r), "--port", str(port)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        for r in range(nproc)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{name}: a worker failed")
    return json.loads(outs[0].strip().splitlines()[-1])


def _compare(args, names: list[str], samples: int, tokens: int) -> None:
    """``--compare N``: 1 process x ``--threads`` against N processes x 1 thread, interleaved
    (``--rounds`` pairs, the order alternating), with the quantized weights' digests."""
    n = args.compare
    setups = [(1, args.threads), (n, 1)] + ([(1, 1)] if args.serial else [])
    for name in names:
        runs: dict[tuple[int, int], list[dict]] = {s: [] for s in setups}
        for i in range(args.rounds):
            for nproc, threads in setups if i % 2 == 0 else setups[::-1]:
                row = _launch(args, name, nproc, threads)
                runs[(nproc, threads)].append(row)
                print(f"# {name} {nproc}x{threads}: {row['seconds']:.1f} s", file=sys.stderr, flush=True)
        one, many, serial = runs[setups[0]], runs[setups[1]], runs.get((1, 1), [])
        print(f"GPFQ int{args.bits}, {name}, {samples} sequences x {tokens} tokens, interleaved")
        print(
            f"{'round':<7}{f'1x{args.threads} s':>10}{f'{n}x1 s':>10}{'speedup':>9}"
            f"{f'1x{args.threads} peak':>13}{f'{n}x1 peak/rank':>16}"
        )
        ratios = []
        for i, (a, b) in enumerate(zip(one, many)):
            ratios.append(a["seconds"] / b["seconds"])
            print(
                f"{i + 1:<7}{a['seconds']:>10.1f}{b['seconds']:>10.1f}{ratios[-1]:>8.2f}x"
                f"{a['peak_rss_mb'] / 1024:>10.2f}GiB{b['peak_rss_mb'] / 1024:>13.2f}GiB"
            )
        print(
            f"median speedup {n} processes x 1 thread / 1 process x {args.threads} threads: "
            f"{statistics.median(ratios):.2f}x"
        )
        if serial:
            # N processes share the serial run's work at best: T(1x1) / N is their bound
            best = [a["seconds"] / (b["seconds"] / n) for a, b in zip(one, serial)]
            scaling = [b["seconds"] / a["seconds"] for a, b in zip(one, serial)]
            times = ", ".join(f"{b['seconds']:.1f}" for b in serial)
            print(
                f"1x1 s per round: {times}; thread scaling T(1x1)/T(1x{args.threads}): "
                f"{statistics.median(scaling):.2f}; bound on the speedup, "
                f"T(1x{args.threads}) / (T(1x1)/{n}): {statistics.median(best):.2f}x"
            )
        digests = {r["weights_sha256"] for r in one + many + serial}
        print(f"quantized weights identical in every run: {'yes' if len(digests) == 1 else 'NO ' + str(digests)}")
        _print_phases(
            [(f"1x{args.threads} (round 1)", one[0]), (f"{n}x1 (round 1)", many[0])]
            + ([("1x1 (round 1)", serial[0])] if serial else [])
        )


def _print_phases(columns: list[tuple[str, dict]]) -> None:
    """Rank 0's seconds per phase (runs with ``--profile``)."""
    columns = [(label, r["phases"]) for label, r in columns if r.get("phases")]
    if not columns:
        return
    print(f"rank 0 seconds per phase (cProfile) {''.join(f'{label:>24}' for label, _ in columns)}")
    for phase in columns[0][1]:
        print(f"{phase:<44}{''.join(f'{p[phase]:>24.1f}' for _, p in columns)}")


if __name__ == "__main__":
    main()
