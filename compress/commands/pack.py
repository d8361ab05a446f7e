"""``compress pack`` / ``compress unpack``: lossless packing of a model file."""

from __future__ import annotations

import time
from pathlib import Path

from compress.errors import InputError


def _keep_heap() -> None:
    """Stop glibc from returning freed heap memory to the system after every chunk.

    The codec frees a few MiB per chunk; with glibc's adaptive thresholds the heap top is
    trimmed and grown again each time, and the page faults cost the whole-process unpack
    about as much CPU as the decoding itself (measured: 0.15 s of system time per 268 MB).
    Only the short-lived ``compress pack``/``unpack`` processes set this; elsewhere (and
    on other C libraries) nothing changes. Peak memory is unchanged: freed memory is
    reused, not added to.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: chunk buffers come from the heap
    mallopt(m_trim_threshold, 256 << 20)


def _one_output(positional: Path | None, option: Path | None) -> Path | None:
    if positional is not None and option is not None and Path(positional) != Path(option):
        raise InputError(f"two outputs given ({positional} and -o {option}); give one")
    return option if option is not None else positional


def pack(
    src: Path, dst: Path | None, level: int, threads: int | None, *, output: Path | None = None, force: bool = False
) -> int:
    """Pack ``src`` (.safetensors, .onnx, .pt, .pth) into ``dst`` (default ``src.czip``).

    Prints one summary line; returns the exit code (0). Raises InputError for bad input,
    including an existing output without ``force``.
    """
    from compress.lossless.files import pack_file

    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such file")
    dst = _one_output(dst, output)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    _keep_heap()
    report = pack_file(src, dst, level=level, threads=threads, force=force)
    print(
        f"packed {report.src} -> {report.dst}: {report.src_bytes / 1e6:.2f} MB -> "
        f"{report.packed_bytes / 1e6:.2f} MB (ratio {report.ratio:.4f}, {report.n_regions} tensors, "
        f"{report.mb_per_s:.0f} MB/s)"
    )
    return 0


def unpack(
    src: Path, dst: Path | None, *, output: Path | None = None, force: bool = False, threads: int | None = None
) -> int:
    """Restore the original file from a ``.czip`` container; prints one summary line.

    The default output is the container's own name without ``.czip``, beside it; an
    existing file is replaced only with ``force``.
    """
    from compress.lossless.files import unpack_file

    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such file")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    _keep_heap()
    t0 = time.perf_counter()
    out = unpack_file(src, _one_output(dst, output), threads=threads, force=force)
    seconds = time.perf_counter() - t0
    size = out.stat().st_size
    print(
        f"unpacked {src} -> {out}: {src.stat().st_size / 1e6:.2f} MB -> {size / 1e6:.2f} MB "
        f"(byte-identical, checksum verified, {size / 1e6 / max(seconds, 1e-9):.0f} MB/s)"
    )
    return 0
