"""Container fuzz run: mutated ``.czip`` files through open, verify and unpack.

Run: ``python benchmarks/container_fuzz.py [--n 100000] [--seed 0]``

Every input must end as the CLI would with exit 0 (accepted, byte-identical) or exit 2
(an ``InputError``: refused with a message); anything else - another exception, a hang
over 10 s (``SIGALRM``) - is a failure. Half of the inputs are *resealed*: their
manifest is edited as JSON and every checksum recomputed, as a hostile writer would, so
the validation behind the checksums is exercised too. Prints counts, the slowest input
and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import signal
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.errors import InputError
from compress.lossless.container import (
    HEADER_SIZE,
    TRAILER,
    TRAILER_SIZE,
    ContainerReader,
    write_container,
)
from compress.lossless.files import pack_file, unpack_file

HANG_SECONDS = 10


class Hang(Exception):
    pass


def seeds(folder: Path) -> list[bytes]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    src = folder / "m.safetensors"
    save_file(
        {
            "w": (rng.standard_normal(3000) * 0.02).astype(np.float32),
            "p": np.where(rng.random(2000) < 0.7, 0, rng.standard_normal(2000)).astype(np.float32),
            "h": rng.standard_normal(500).astype(np.float16),
            "i": np.arange(33, dtype=np.int64),
            # int8 codes in -8..7 with a few escapes: paired chunks (codec.py)
            "q": np.where(
                np.arange(3000) % 500 == 7, 100, np.clip(np.round(rng.standard_normal(3000) * 2), -8, 7)
            ).astype(np.int8),
        },
        str(src),
    )
    a = pack_file(src, folder / "a.czip", chunk_size=4096, threads=1).dst.read_bytes()
    mask = rng.random(700) < 0.4
    codes = np.where(mask, rng.integers(-8, 8, 700), 0).astype(np.int8)
    from compress.lossless.container import ContainerWriter

    with ContainerWriter(folder / "b.czip", chunk_size=4096, threads=1, meta={"kind": "state"}) as w:
        w.add_mask("mask", mask)
        w.add_tensor("codes", codes, layout="i4", mask="mask")
        w.add_tensor("bf", rng.integers(0, 65535, 900).astype(np.uint16), dtype="bfloat16")
        w.add_alias("tied", "bf")
        w.add_blob("blob", b"skeleton " * 300)
    b = (folder / "b.czip").read_bytes()
    c = write_container(folder / "c.czip", {"x": np.ones(10, np.float32)}, threads=1).read_bytes()
    return [a, b, c]


def reseal(good: bytes, body: bytes) -> bytes:
    off = TRAILER.unpack(good[-TRAILER_SIZE:])[0]
    stored = zstandard.ZstdCompressor(level=1).compress(body)
    digest = hashlib.sha256(good[:HEADER_SIZE] + stored).digest()
    return good[:off] + stored + TRAILER.pack(off, len(stored), zlib.crc32(stored), len(body), digest, b"CZIPEND\x00")


def mutate_json(rng: random.Random, obj):
    """Replace one random node of a JSON tree by a hostile value."""
    path = []
    node = obj
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    if not path:
        return obj
    parent, key = path[-1]
    choice = rng.randrange(9)
    value = [
        lambda: rng.choice([0, -1, 1, 2**31, 2**40, 2**63, 10**30]),
        lambda: rng.choice(["", "x", "\x00", "n" * 5000, "../../etc/passwd"]),
        lambda: None,
        lambda: True,
        list,
        dict,
        lambda: rng.getrandbits(rng.choice([4, 16, 32])),
        lambda: [node, node] if not isinstance(node, dict) else node,
        lambda: 1.5,
    ][choice]()
    if isinstance(parent, dict) and rng.random() < 0.1:
        del parent[key]
    elif isinstance(parent, list) and rng.random() < 0.1:
        parent.pop(key)
    else:
        parent[key] = value
    return obj


def mutate(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(8)
    if kind < 4:  # resealed manifest edit
        off, length = TRAILER.unpack(good[-TRAILER_SIZE:])[:2]
        manifest = json.loads(zstandard.ZstdDecompressor().decompress(good[off : off + length]))
        for _ in range(rng.randint(1, 3)):
            manifest = mutate_json(rng, manifest)
        return reseal(good, json.dumps(manifest).encode())
    data = bytearray(good)
    if kind == 4:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        return bytes(data)
    if kind == 5:
        return bytes(data[: rng.randrange(len(data))])
    if kind == 6:
        a, b = sorted(rng.randrange(len(good)) for _ in range(2))
        return good[:a] + rng.randbytes(rng.randint(0, 64)) + good[b:]
    return good[:HEADER_SIZE] + rng.randbytes(rng.randint(0, 3000)) + good[-8:]


def run_one(path: Path, out: Path) -> int:
    """0 or 2 as the CLI would exit; raises on anything the CLI would call internal."""
    try:
        with ContainerReader(path) as r:
            r.verify()
            is_file = r.meta.get("kind") == "file"
            for name in r.names():
                r.read_bytes(name, threads=1)
        if is_file:
            unpack_file(path, out, threads=1, force=True)
        return 0
    except InputError:
        return 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    def on_alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = seeds(folder)
        path, out = folder / "fuzz.czip", folder / "out.bin"
        counts = {0: 0, 2: 0}
        failures: list[str] = []
        slowest = (0.0, -1)
        t_start = time.perf_counter()
        for i in range(args.n):
            data = mutate(rng, rng.choice(base))
            path.write_bytes(data)
            t0 = time.perf_counter()
            signal.alarm(HANG_SECONDS)
            try:
                counts[run_one(path, out)] += 1
            except Hang:
                failures.append(f"#{i}: hang over {HANG_SECONDS} s")
            except Exception as err:
                failures.append(f"#{i}: {type(err).__name__}: {err}"[:300])
                (folder.parent / f"czip-fuzz-{args.seed}-{i}.czip").write_bytes(data)
            finally:
                signal.alarm(0)
            dt = time.perf_counter() - t0
            if dt > slowest[0]:
                slowest = (dt, i)
            if (i + 1) % 10000 == 0:
                print(f"  {i + 1} inputs, {time.perf_counter() - t_start:.0f} s", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"inputs {args.n}  exit0 {counts[0]}  exit2 {counts[2]}  other {len(failures)}")
    print(
        f"slowest input {slowest[0] * 1000:.1f} ms (#{slowest[1]}), total {time.perf_counter() - t_start:.0f} s, peak RSS {rss:.0f} MB"
    )
    for f in failures[:20]:
        print("  FAIL", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
