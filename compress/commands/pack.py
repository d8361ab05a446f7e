"""``compress pack`` / ``compress unpack``: lossless packing of a model file."""

from __future__ import annotations

import time
from pathlib import Path

from compress.errors import InputError


def pack(src: Path, dst: Path | None, level: int, threads: int | None) -> int:
    """Pack ``src`` (.safetensors, .onnx, .pt, .pth) into ``dst`` (default ``src.czip``).

    Prints one summary line; returns the exit code (0). Raises InputError for bad input.
    """
    from compress.lossless.files import pack_file

    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such file")
    report = pack_file(src, dst, level=level, threads=threads)
    print(
        f"packed {report.src} -> {report.dst}: {report.src_bytes / 1e6:.2f} MB -> "
        f"{report.packed_bytes / 1e6:.2f} MB (ratio {report.ratio:.4f}, {report.n_regions} tensors, "
        f"{report.mb_per_s:.0f} MB/s)"
    )
    return 0


def unpack(src: Path, dst: Path | None) -> int:
    """Restore the original file from a ``.czip`` container; prints one summary line."""
    from compress.lossless.files import unpack_file

    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such file")
    t0 = time.perf_counter()
    out = unpack_file(src, dst)
    seconds = time.perf_counter() - t0
    size = out.stat().st_size
    print(
        f"unpacked {src} -> {out}: {src.stat().st_size / 1e6:.2f} MB -> {size / 1e6:.2f} MB "
        f"(byte-identical, SHA-256 checked, {size / 1e6 / max(seconds, 1e-9):.0f} MB/s)"
    )
    return 0
