"""Byte grouping plus entropy coding of one chunk of a typed array (ZipNN-style).

A *layout* says how one element's bits are regrouped into byte streams before each stream
is entropy-coded on its own (METHODS.md §4). Streams that hold the exponent bits are very
skewed (about 2.7 bits of entropy per byte for trained weights) and shrink well under the
Huffman literal coder inside zstd: they, and integer codes, are written as zstd frames of
Huffman literals only (:func:`literal_frame`). Mantissa streams are close to random and
are stored raw when coding does not pay. Frames are decoded through libzstd straight
into their destination where it can be loaded (:func:`decode_stream`).

Layouts (``LAYOUTS``):

* ``f32``  - float32, 4 streams: the 8 exponent bits gathered into one byte, then the
  mantissa's low, middle byte and ``sign | top 7 mantissa bits``.
* ``bf16`` - bfloat16, 2 streams: the 8 exponent bits, then ``sign | 7 mantissa bits``.
* ``f16``  - float16, 2 streams: ``sign | 5 exponent bits | top 2 mantissa bits`` (the high
  byte already holds all five exponent bits, so no bit moves), then the low 8 mantissa
  bits. Measured on MiniLM: pulling the exponent into a stream of its own, with sign and
  top mantissa bits in a third, came out larger (0.856 vs 0.848) and 4x slower.
* ``i4``/``u4`` - int8/uint8 codes that fit in 4 bits, packed two per byte (low nibble
  first); values outside the range are rejected, never silently truncated.
* ``bits`` - bool masks, bit-packed (little bit order) then coded.
* ``bytes`` - anything else (int8/uint8 codes, int64, float64, blobs...): the raw bytes, coded.
  An int8 chunk whose codes almost all lie in -8..7 is coded *paired* instead (two
  streams): the codes packed two per byte (first half of the chunk in the low nibbles,
  second half in the high ones, biased by 8), then the *escaped* codes outside that range
  with their positions. A byte Huffman coder pays whole bits per symbol: on MiniLM's int8
  codes (46% zeros) it ends 4.3% above their order-0 entropy, on pairs of codes 0.7%
  above, and there are half as many symbols to decode.

Every function here reads its input through views and writes only to new arrays: the
caller's buffer is never modified.
"""

from __future__ import annotations

import logging
import math
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

log = logging.getLogger(__name__)

# Stream coding methods, as stored in the container.
METHOD_RAW = 0
METHOD_ZSTD = 1
METHOD_ANS = 2  # ANS of w-bit symbols, static order-0 model, varint counts (format 2-3; read only)
METHOD_ANS_EXACT = 3  # ANS of w-bit symbols, counts-remaining model, enumerated counts (format 4)

# ANS decodes at tens of MB/s (zstd's Huffman at GB/s): it is tried only on streams up to
# this size, where table overheads make zstd lose most (small tensors, int4 codes, masks),
# and kept only when it saves at least ANS_MIN_GAIN over the best other method, so large
# models (1 MiB chunks) keep zstd's decode speed. Streams up to ANS_ANY_GAIN_BYTES take
# ANS whenever it is smaller: there a stream's decode is a few hundred microseconds whatever
# the method, and the few percent ANS saves are what brings small int4 code streams within
# 3% of their order-0 entropy.
ANS_MAX_BYTES = 16 << 10
ANS_MIN_GAIN = 0.03
ANS_ANY_GAIN_BYTES = 4 << 10
SMALL_STREAM_BYTES = 64 << 10

# A coded stream is kept only if it saves at least this fraction; otherwise the raw bytes
# are stored (decoding raw bytes is a memcpy, decoding zstd is not).
MIN_SAVING = 0.01

DEFAULT_LEVEL = 3
DEFAULT_CHUNK_SIZE = 1 << 20  # bytes of raw input per chunk

#: dtype name -> (itemsize in bytes of the unpacked array, default layout)
DTYPES: dict[str, tuple[int, str]] = {
    "float32": (4, "f32"),
    "bfloat16": (2, "bf16"),
    "float16": (2, "f16"),
    "float64": (8, "bytes"),
    "int8": (1, "bytes"),
    "uint8": (1, "bytes"),
    "int16": (2, "bytes"),
    "uint16": (2, "bytes"),
    "int32": (4, "bytes"),
    "uint32": (4, "bytes"),
    "int64": (8, "bytes"),
    "uint64": (8, "bytes"),
    "bool": (1, "bits"),
    "complex64": (8, "bytes"),
    "complex128": (16, "bytes"),
    "float8_e4m3fn": (1, "bytes"),
    "float8_e5m2": (1, "bytes"),
}

#: layout -> number of streams
LAYOUTS: dict[str, int] = {"f32": 4, "bf16": 2, "f16": 2, "i4": 1, "u4": 1, "bits": 1, "bytes": 1}

#: layouts allowed for each dtype (the default one first)
ALLOWED_LAYOUTS: dict[str, tuple[str, ...]] = {
    name: (layout, "bytes") if layout != "bytes" else ("bytes",) for name, (_, layout) in DTYPES.items()
}
ALLOWED_LAYOUTS["int8"] = ("bytes", "i4")
ALLOWED_LAYOUTS["uint8"] = ("bytes", "u4")


class CodecError(ValueError):
    """Input the codec cannot represent (e.g. an int4 code outside -8..7)."""


def numpy_view_dtype(dtype: str) -> np.dtype:
    """The numpy dtype an array of ``dtype`` is held in (bfloat16 as uint16, fp8 as uint8)."""
    if dtype == "bfloat16":
        return np.dtype(np.uint16)
    if dtype.startswith("float8"):
        return np.dtype(np.uint8)
    return np.dtype(dtype)


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0]


def chunk_elements(dtype: str, layout: str, chunk_size: int) -> int:
    """Elements per chunk: ``chunk_size`` bytes, rounded so packed layouts stay byte-aligned."""
    n = max(chunk_size // itemsize(dtype), 1)
    align = {"i4": 2, "u4": 2, "bits": 8}.get(layout, 1)
    return max(n - n % align, align)


def stream_sizes(layout: str, n: int, item: int) -> list[int]:
    """Raw byte length of each stream of a chunk of ``n`` elements (used to validate files)."""
    if layout in ("f32",):
        return [n] * 4
    if layout in ("bf16", "f16"):
        return [n, n]
    if layout in ("i4", "u4"):
        return [(n + 1) // 2]
    if layout == "bits":
        return [(n + 7) // 8]
    return [n * item]


# ---------------------------------------------------------------------------- split/merge


def split(layout: str, data: np.ndarray, scratch: bool = False) -> list[np.ndarray]:
    """Regroup one chunk (a 1-D array of the layout's element type) into byte streams.

    Returns new uint8 arrays; ``data`` is only read. With ``scratch`` the float layouts'
    streams are per-thread buffers, valid until this thread's next ``split`` (what the
    encoder wants: fresh temporaries made glibc grow and trim its heap every chunk,
    and splitting ran 6x slower).
    """

    def buf(slot: int, n: int, dtype: type) -> np.ndarray:
        return _scratch(slot, n, dtype) if scratch else np.empty(n, dtype)

    if layout == "f32":
        # The high half is a bfloat16; working on 16-bit lanes keeps numpy on its fast
        # same-dtype SIMD loops (mixed-width ops were 5x slower).
        x = data.view(np.uint32)
        n = x.size
        t32 = _scratch(20, n, np.uint32)
        np.right_shift(x, 16, out=t32)
        hi = _scratch(21, n, np.uint16)
        np.copyto(hi, t32, casting="unsafe")
        exp, top = split("bf16", hi, scratch)
        lo = _scratch(22, n, np.uint16)
        np.copyto(lo, x, casting="unsafe")
        b0, b1 = buf(23, n, np.uint8), buf(24, n, np.uint8)
        np.copyto(b0, lo, casting="unsafe")
        lo >>= 8
        np.copyto(b1, lo, casting="unsafe")
        return [exp, b0, b1, top]
    if layout == "bf16":
        x = data.view(np.uint16)
        n = x.size
        t16, t8 = _scratch(25, n, np.uint16), _scratch(26, n, np.uint8)
        exp, rest = buf(27, n, np.uint8), buf(28, n, np.uint8)
        np.right_shift(x, 7, out=t16)
        np.copyto(exp, t16, casting="unsafe")
        np.right_shift(x, 8, out=t16)
        np.copyto(rest, t16, casting="unsafe")
        rest &= 0x80
        np.copyto(t8, x, casting="unsafe")
        t8 &= 0x7F
        rest |= t8
        return [exp, rest]
    if layout == "f16":
        b = data.view(np.uint8).reshape(-1, 2)
        hi, lo = buf(27, b.shape[0], np.uint8), buf(28, b.shape[0], np.uint8)
        np.copyto(hi, b[:, 1])
        np.copyto(lo, b[:, 0])
        return [hi, lo]
    if layout in ("i4", "u4"):
        x = data.view(np.uint8) if layout == "u4" else data.view(np.int8)
        lo_ok, hi_ok = (-8, 7) if layout == "i4" else (0, 15)
        if x.size and (int(x.min()) < lo_ok or int(x.max()) > hi_ok):
            raise CodecError(f"{layout} layout needs values in [{lo_ok}, {hi_ok}]")
        u = x.view(np.uint8)
        if u.size % 2:
            u = np.concatenate([u, np.zeros(1, np.uint8)])
        pairs = u.reshape(-1, 2)
        packed = pairs[:, 1] << 4
        packed |= pairs[:, 0] & 0x0F
        return [packed]
    if layout == "bits":
        x = data.view(np.uint8)
        if x.size and int(x.max()) > 1:
            raise CodecError("bits layout needs bool values (bytes 0 or 1)")
        return [np.packbits(x, bitorder="little")]
    if layout == "bytes":
        return [data.reshape(-1).view(np.uint8)]  # read-only use below; no copy needed
    raise CodecError(f"unknown layout {layout!r}")


_scratch_local = threading.local()
SCRATCH_MAX_BYTES = 4 << 20  # per buffer: default chunks (1 MiB) need at most 1 MiB


def _scratch(slot: int, n: int, dtype: type) -> np.ndarray:
    """A per-thread temporary of ``n`` elements, reused from call to call.

    A fresh 1 MiB temporary per chunk made glibc grow and trim the heap every chunk:
    page faults doubled the decode time (measured: 0.53 vs 0.26 CPU-s on 268 MB bf16).
    Callers must not keep the array past their own call.
    """
    nbytes = n * np.dtype(dtype).itemsize
    if nbytes > SCRATCH_MAX_BYTES:  # rare large chunks: not kept for the thread's lifetime
        return np.empty(n, dtype)
    cache = getattr(_scratch_local, "bufs", None)
    if cache is None:
        cache = _scratch_local.bufs = {}
    buf = cache.get(slot)
    if buf is None or buf.size < nbytes:
        buf = cache[slot] = np.empty(max(nbytes, 1 << 16), np.uint8)
    return buf[:nbytes].view(dtype)


def merge(layout: str, streams: Sequence[np.ndarray], n: int, item: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`split`: the chunk's raw bytes as a uint8 array of ``n*item``.

    With ``out`` (a writable uint8 array of that size) the bytes are written there, which
    saves a copy when decoding into a preallocated tensor.
    """
    # Every float layout is rebuilt in whole 16/32-bit lanes: widening copies of the byte
    # streams, shifts and ors, each a contiguous SIMD loop over one chunk (in cache).
    # Strided byte writes (``out.reshape(n, 4)[:, i] = stream``) were 2-4x slower.
    if layout == "f32":
        exp, b0, b1, top = streams
        # high and low halves in 16-bit lanes (twice the elements per instruction), then
        # one widening merge into the 32-bit output
        hi = merge("bf16", (exp, top), n, 2, _scratch(2, n, np.uint16).view(np.uint8)).view(np.uint16)
        lo = _scratch(3, n, np.uint16)
        t16 = _scratch(4, n, np.uint16)
        np.left_shift(b1, 8, out=lo, dtype=np.uint16)  # widened and shifted in one loop
        np.copyto(t16, b0, casting="safe")
        lo |= t16
        x = out.view(np.uint32) if out is not None else np.empty(n, np.uint32)
        t = _scratch(1, n, np.uint32)
        np.left_shift(hi, 16, out=x, dtype=np.uint32)
        np.copyto(t, lo, casting="safe")
        x |= t
        return x.view(np.uint8)
    if layout == "bf16":
        exp, rest = streams
        x = out.view(np.uint16) if out is not None else np.empty(n, np.uint16)
        t = _scratch(0, n, np.uint16)
        # rest * 0x0101 holds ``sign | mantissa`` in both bytes: the mask keeps the sign in
        # bit 15 and the mantissa in bits 0-6, and the exponent goes between them. Four
        # loops instead of eight (measured: 185 against 308 us per 1 MiB chunk).
        np.multiply(rest, 0x0101, out=x, dtype=np.uint16)
        x &= 0x807F
        np.left_shift(exp, 7, out=t, dtype=np.uint16)
        x |= t
        return x.view(np.uint8)
    if layout == "f16":
        hi, lo = streams
        x = out.view(np.uint16) if out is not None else np.empty(n, np.uint16)
        np.left_shift(hi, 8, out=x, dtype=np.uint16)
        np.bitwise_or(x, lo, out=x)  # lo widened inside the loop: no temporary
        return x.view(np.uint8)
    if layout in ("i4", "u4"):
        (packed,) = streams
        # Both codes of a packed byte land in one 16-bit lane (low nibble in the low byte):
        # x86 has 16-bit but no 8-bit shifts, and a table lookup converts its indices
        # first; this was 10x faster than either.
        into = out if out is not None and out.size == 2 * packed.size == n else None  # an odd n has no room
        x = np.empty(packed.size, np.uint16) if into is None else into.view(np.uint16)
        t = _scratch(0, packed.size, np.uint16)
        np.copyto(x, packed, casting="safe")
        np.bitwise_and(x, 0x0F, out=t)
        x <<= 4
        x &= 0x0F00
        x |= t
        if layout == "i4":
            # sign-extend each byte: nibble bit 3 set -> top four bits set (8 * 30 = 0xF0,
            # no carry between the bytes)
            np.bitwise_and(x, 0x0808, out=t)
            t *= 30
            x |= t
        return x.view(np.uint8)[:n]
    if layout == "bits":
        (packed,) = streams
        return np.unpackbits(packed, count=n, bitorder="little")
    if layout == "bytes":
        (raw,) = streams
        return raw
    raise CodecError(f"unknown layout {layout!r}")


# ------------------------------------------------------------------------- entropy coding

_local = threading.local()


def _compressor(level: int, sparse: bool = False) -> zstandard.ZstdCompressor:
    """A per-thread compressor (zstd contexts are not thread-safe).

    ``sparse`` streams (one byte value dominates: pruned weights, masks) are coded with
    zstd's own parameters for ``level``: there, runs and repeats are what pays.
    """
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get((level, sparse))
    if cctx is None and sparse:
        params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=1, write_checksum=0)
        cctx = cache[(level, sparse)] = zstandard.ZstdCompressor(compression_params=params)
    if cctx is None:
        # Weight streams are order-0 sources: long matches are rare and a sequence costs
        # more than the Huffman-coded literals it replaces. A fast strategy with the
        # longest minimum match keeps zstd close to "literals only" (measured: smaller
        # and 1.5-2x faster than plain level 1/3 on exponent streams). Higher levels
        # keep their own search but still with long minimum matches.
        if level <= 3:
            params = zstandard.ZstdCompressionParameters(
                strategy=zstandard.STRATEGY_FAST,
                min_match=7,
                hash_log=6,
                chain_log=6,
                search_log=1,
                window_log=17,
                target_length=0,
                write_content_size=1,
                write_checksum=0,
            )
        else:
            params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=1, write_checksum=0)
        cctx = cache[(level, sparse)] = zstandard.ZstdCompressor(compression_params=params)
    return cctx


# ------------------------------------------------------------ literal-only zstd frames
#
# Order-0 sources (exponent bytes, int8 codes) are best served by zstd's Huffman literal
# coder alone: every match zstd's fast parser takes there costs a sequence that is dearer
# than the literals it replaces (MiniLM int8: 0.2711 with matches, 0.2553 literals only;
# zipnn's byte-level Huffman 0.2553), and a frame of literals decodes in zstd's
# 4-stream Huffman loop (1.6x faster). python-zstandard does not expose the parameter that
# forces Huffman literals when the match finder is throttled (ZSTD_c_literalCompressionMode),
# so these frames are made through libzstd's C API with ctypes: from the copy of libzstd
# that python-zstandard ships (its cffi backend), else the system's. The output is an
# ordinary zstd frame (METHOD_ZSTD): any zstd decoder reads it. Without either library
# the match-finding compressor is used (valid files, a little larger).

_ZSTD_C_PARAMS = (
    (100, 1),  # ZSTD_c_compressionLevel (then overridden below)
    (101, 17),  # windowLog
    (102, 6),  # hashLog (minimum)
    (103, 6),  # chainLog (minimum)
    (104, 1),  # searchLog
    (105, 7),  # minMatch (longest)
    (106, 131072),  # targetLength: with strategy fast, the largest acceleration; no matches
    (107, 1),  # strategy ZSTD_fast
    (200, 1),  # contentSizeFlag: decode_stream checks the declared size
    (201, 0),  # checksumFlag: chunks carry a CRC-32
    (1002, 1),  # ZSTD_c_literalCompressionMode = ZSTD_ps_enable (experimentalParam5)
)


class _LiteralZstd:
    """libzstd's C API, loaded once; one compression context per thread."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = self._load()
        lib = self.lib
        lib.ZSTD_createCCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_compress2.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        lib.ZSTD_compress2.restype = ctypes.c_size_t
        lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
        lib.ZSTD_compressBound.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_decompressDCtx.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        lib.ZSTD_decompressDCtx.restype = ctypes.c_size_t
        self.local = threading.local()
        self.context()  # raises OSError when a parameter is refused (older libzstd)

    def _load(self):  # -> ctypes.CDLL
        import ctypes
        from pathlib import Path

        def candidates() -> Iterator[str]:
            yield from (str(p) for p in sorted(Path(zstandard.__file__).parent.glob("_cffi*.so")))
            # the system's only when needed: find_library runs ldconfig in a subprocess,
            # which cost a small `compress unpack` more wall time than its decoding
            import ctypes.util

            found = ctypes.util.find_library("zstd")
            if found:
                yield found

        for path in candidates():
            try:
                lib = ctypes.CDLL(path)
                if lib.ZSTD_versionNumber() >= 10500:  # the parameter numbers used here
                    return lib
            except (OSError, AttributeError):
                continue
        raise OSError("no libzstd >= 1.5 found")

    def context(self) -> int:
        ctx = getattr(self.local, "ctx", None)
        if ctx is None:
            ptr = self.lib.ZSTD_createCCtx()
            if not ptr:
                raise MemoryError("ZSTD_createCCtx failed")
            ctx = self.local.ctx = _CCtx(self.lib, ptr, self.lib.ZSTD_freeCCtx)  # freed with the thread
            for key, value in _ZSTD_C_PARAMS:
                if self.lib.ZSTD_isError(self.lib.ZSTD_CCtx_setParameter(ptr, key, value)):
                    raise OSError(f"libzstd refused parameter {key}={value}")
        return ctx.ptr

    def decompress(self, payload: bytes | memoryview, dst: np.ndarray) -> None:
        """Decode one zstd frame into ``dst`` (a writable uint8 array of exactly the
        frame's declared size, checked by the caller): no intermediate ``bytes`` and no
        copy. Raises ``ValueError`` on a damaged frame or a size mismatch."""
        dctx = getattr(self.local, "dctx", None)
        if dctx is None:
            ptr = self.lib.ZSTD_createDCtx()
            if not ptr:
                raise MemoryError("ZSTD_createDCtx failed")
            dctx = self.local.dctx = _CCtx(self.lib, ptr, self.lib.ZSTD_freeDCtx)
        src = np.frombuffer(payload, np.uint8)
        got = self.lib.ZSTD_decompressDCtx(dctx.ptr, dst.ctypes.data, dst.size, src.ctypes.data, src.size)
        if self.lib.ZSTD_isError(got):
            raise ValueError(f"zstd: {self.lib.ZSTD_getErrorName(got).decode(errors='replace')}")
        if got != dst.size:
            raise ValueError(f"zstd stream decoded to {got} bytes, {dst.size} expected")

    def compress(self, raw: memoryview) -> bytes:
        n = len(raw)
        cap = int(self.lib.ZSTD_compressBound(n))
        out = _scratch(40, cap, np.uint8)  # only the frame is copied out, not zero-filled
        src = np.frombuffer(raw, np.uint8)
        got = self.lib.ZSTD_compress2(self.context(), out.ctypes.data, cap, src.ctypes.data, n)
        if self.lib.ZSTD_isError(got):
            raise RuntimeError(f"ZSTD_compress2: {self.lib.ZSTD_getErrorName(got).decode(errors='replace')}")
        return out[:got].tobytes()


class _CCtx:
    """A libzstd context, freed with its owner (a thread's local storage)."""

    def __init__(self, lib, ptr: int, free) -> None:  # lib: a ctypes.CDLL, free: its function
        self.lib, self.ptr, self.free = lib, ptr, free

    def __del__(self) -> None:
        self.free(self.ptr)


_literal_lock = threading.Lock()
_literal_state: list[_LiteralZstd | None] = []


def _libzstd() -> _LiteralZstd | None:
    """libzstd through ctypes (loaded once), or ``None`` where it cannot be loaded."""
    if not _literal_state:
        with _literal_lock:
            if not _literal_state:
                try:
                    _literal_state.append(_LiteralZstd())
                except (OSError, AttributeError, MemoryError) as err:
                    log.info("literal-only zstd frames unavailable (%s)", err)
                    _literal_state.append(None)
    return _literal_state[0]


def literal_frame(raw: memoryview) -> bytes | None:
    """A zstd frame of ``raw`` coded as Huffman literals only; ``None`` without libzstd."""
    coder = _libzstd()
    return coder.compress(raw) if coder is not None else None


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _profile(stream: np.ndarray) -> tuple[bool, bool, float]:
    """Cheap guess from a sample: (worth coding at all, dominated by one byte value,
    order-0 entropy of the sample in bits per byte).

    Trying zstd on a near-random mantissa stream costs as much time as the whole rest
    of the chunk. A strided sample of 4096 bytes decides; the order-0 entropy of a
    uniform sample of that size is about 7.95 bits, so above 7.9 bits coding cannot
    pay more than ``MIN_SAVING``.
    """
    step = max(stream.size // 4096, 1)
    sample = stream[: step * 4096 : step]
    counts = np.bincount(sample, minlength=256)
    sparse = bool(counts.max() > 0.5 * sample.size)
    p = counts[counts > 0] / sample.size
    entropy = float(-(p * np.log2(p)).sum())
    if stream.size < 65536:
        return True, sparse, entropy
    return entropy < 7.9, sparse, entropy


# Order-0 streams (see :func:`order0_streams`) whose sampled entropy is below this (bits
# per byte) are coded as Huffman literals only; a near-random one keeps the match finder.
LITERAL_MAX_ENTROPY = 7.0
# Below this (bits per byte) an order-0 stream also tries the match finder: Huffman codes
# cost at least one bit per byte, runs of the dominant value less. Above it the match
# finder never won on MiniLM int8/int4 codes (e.g. 1.2 bits: literals 186,697 B, matches
# 213,217 B) and cost a third of the encode time.
RUNS_MAX_ENTROPY = 1.0


def order0_streams(layout: str, data: np.ndarray, count: int) -> list[bool]:
    """Which of a chunk's ``count`` streams are order-0 sources, coded as literals only.

    Exponent streams (the first of each float layout) and integer codes (int8 bytes,
    packed int4/uint4) are: matches there cost more than they save. Mantissa bytes,
    masks and plain bytes (blobs: headers, graphs) are not: there repeats pay, e.g.
    tensors stored at a lower precision (MiniLM fp32's low mantissa byte: 0.964 with
    matches, 0.973 literals only) or structured pruning masks.
    """
    if layout in FLOAT_LAYOUTS:
        flags = [True] + [False] * (LAYOUTS[layout] - 1)
        return [False, *flags] if count == LAYOUTS[layout] + 1 else flags
    if layout in ("i4", "u4"):
        return [True] * count
    if layout == "bytes":
        return [data.dtype == np.int8] * count
    return [False] * count


@dataclass(frozen=True)
class EncodedStream:
    method: int
    raw_len: int
    payload: bytes


@dataclass(frozen=True)
class EncodedChunk:
    n: int  # elements (bytes for blobs)
    streams: tuple[EncodedStream, ...]
    crc: int = 0  # CRC-32 of the streams' payloads, concatenated in order

    @property
    def stored_bytes(self) -> int:
        return sum(len(s.payload) for s in self.streams)


try:  # ISA-L's CRC-32 gives zlib's values 3-4x faster; optional
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - depends on the environment
    _crc32 = zlib.crc32


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """zlib's CRC-32 (accelerated by ISA-L when installed)."""
    return _crc32(data, value)


def chunk_crc(payloads: Sequence[bytes | memoryview]) -> int:
    crc = 0
    for p in payloads:
        crc = _crc32(p, crc)
    return crc


# ------------------------------------------------------------------------------ ANS coding
#
# Payload of a METHOD_ANS stream (formats 2 and 3; read, no longer written, see
# METHOD_ANS_EXACT below): u8 symbol width w (1, 2, 4 or 8 bits; a byte holds 8/w
# symbols, lowest bits first), u16 alphabet size K (symbols 0..K-1), K varint counts (the
# exact order-0 histogram, so the model is rebuilt bit-identically), then the ANS coder's
# 32-bit words. The model is constriction's ``Categorical(counts / total, perfect=False)``.

_WIDTHS = (1, 2, 4, 8)


def _symbols(raw: np.ndarray, w: int) -> np.ndarray:
    if w == 8:
        return raw
    per = 8 // w
    out = np.empty((raw.size, per), np.uint8)
    mask = (1 << w) - 1
    for i in range(per):
        np.bitwise_and(raw >> (w * i), mask, out=out[:, i])
    return out.reshape(-1)


def _unsymbols(sym: np.ndarray, w: int, raw_len: int) -> np.ndarray:
    if w == 8:
        return sym.astype(np.uint8)
    per = 8 // w
    s = sym.astype(np.uint8).reshape(raw_len, per)
    out = s[:, 0].copy()
    for i in range(1, per):
        out |= s[:, i] << (w * i)
    return out


def _varints(values: Sequence[int]) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 35:
            raise ValueError("ANS stream: bad count table")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _ans_model(counts: np.ndarray):  # -> constriction Categorical
    import constriction

    if counts.size < 2:  # constriction needs two symbols; a zero count costs nothing
        counts = np.concatenate([counts, np.zeros(2 - counts.size, counts.dtype)])
    probs = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


def _ans_table_bytes(counts: Sequence[int], w: int) -> int:
    """Stored size of a METHOD_ANS_EXACT count table (see :func:`_ans_table`)."""
    if w <= ENUM_MAX_WIDTH:
        return (math.comb(int(sum(counts)) + len(counts) - 1, len(counts) - 1).bit_length() + 7) // 8
    return len(_varints([int(c) for c in counts[:-1]]))


def _ans_best_width(raw: np.ndarray) -> tuple[int, np.ndarray, float]:
    """The symbol width with the smallest size estimate (order-0 entropy + count table)."""
    best = None
    for w in _WIDTHS:
        sym = _symbols(raw, w)
        counts = np.bincount(sym, minlength=2)
        p = counts[counts > 0] / sym.size
        est = float(-(p * np.log2(p)).sum()) * sym.size / 8 + _ans_table_bytes(counts.tolist(), w)
        if best is None or est < best[2]:
            best = (w, counts, est)
    assert best is not None
    return best


# METHOD_ANS_EXACT (container format 4). Payload: u8 symbol width w (1, 2, 4 or 8 bits, a
# byte holds 8/w symbols, lowest bits first), u8 K-1 (alphabet 0..K-1, 2 <= K <= 2**w),
# the count table, then the 32-bit words of constriction's ANS stack coder, little-endian,
# with the last word's zero high bytes (up to 3) left off.
#
# * Count table: for w <= 4, the counts' rank among all K-part compositions of n (the
#   number of symbols, known from raw_len), a little-endian integer of exactly the bytes
#   C(n+K-1, K-1) needs; for w = 8, the first K-1 counts as LEB128 varints (the last is n
#   minus their sum). Varint counts cost 1-2 bytes each: 22-35 B for a 16-symbol table,
#   4% of a 1,500-code int4 stream; the rank needs log2 C(n+15, 15) bits (15 B there).
#   Ranking 256 counts took 0.1 s, so w = 8 keeps varints.
# * Model: symbols are coded in blocks (ANS_BLOCK_DIV, ANS_BLOCK_MIN), each under the
#   counts of the symbols not yet coded (``remaining / sum``, constriction's
#   ``Categorical(perfect=False)``). Coding with the exact counts remaining approaches the
#   multinomial bound, which is below n times the order-0 entropy by about
#   (K-1)/2 log2 n bits: this pays the count table back. On the quickstart's int4 streams
#   (1,300-1,600 codes) 1.0-1.9% above their order-0 entropy, table included, where a
#   static model with varint counts was 3.5-4.5% above.

ENUM_MAX_WIDTH = 4
ANS_BLOCK_DIV = 16  # a block is 1/16 of the symbols still to code (1/8: 0.2-1.5% larger) ...
ANS_BLOCK_MIN = 16  # ... but at least this many: a block's model costs ~20 us to build


def _ans_blocks(n: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < n:
        b = min(max(ANS_BLOCK_MIN, (n - pos) // ANS_BLOCK_DIV), n - pos)
        out.append((pos, b))
        pos += b
    return out


def _composition_rank(counts: Sequence[int]) -> int:
    """Rank of ``counts`` among the compositions of their sum into ``len(counts)`` parts
    (stars and bars: the bars' positions, as a combinatorial-number-system index)."""
    rank = total = 0
    for j, c in enumerate(counts[:-1]):
        total += c
        rank += math.comb(total + j, j + 1)
    return rank


def _composition_unrank(rank: int, n: int, k: int) -> list[int]:
    """Inverse of :func:`_composition_rank` for compositions of ``n`` into ``k`` parts."""
    if not 0 <= rank < math.comb(n + k - 1, k - 1):
        raise ValueError("ANS stream: count table out of range")
    bars, hi = [], n + k - 2
    for j in range(k - 2, -1, -1):
        lo, top = j, hi  # the largest position p <= hi with C(p, j+1) <= rank
        while lo < top:
            mid = (lo + top + 1) // 2
            if math.comb(mid, j + 1) <= rank:
                lo = mid
            else:
                top = mid - 1
        bars.append(lo)
        rank -= math.comb(lo, j + 1)
        hi = lo - 1
    counts, prev = [], -1
    for p in reversed(bars):
        counts.append(p - prev - 1)
        prev = p
    counts.append(n + k - 2 - prev)
    return counts


def _ans_table(counts: Sequence[int], w: int) -> bytes:
    if w <= ENUM_MAX_WIDTH:
        return _composition_rank(counts).to_bytes(_ans_table_bytes(counts, w), "little")
    return _varints([int(c) for c in counts[:-1]])


def encode_ans(raw: np.ndarray) -> bytes | None:
    """ANS-code a byte stream (METHOD_ANS_EXACT); ``None`` when constriction is unavailable
    or the stream empty."""
    if raw.size == 0:
        return None
    try:
        import constriction
    except ImportError:  # optional: zstd alone still gives a valid (slightly larger) file
        return None
    w, counts, _ = _ans_best_width(raw)
    k = max(int(np.flatnonzero(counts)[-1]) + 1, 2)
    counts = counts[:k].astype(np.int64)
    sym = _symbols(raw, w).astype(np.int32)
    blocks = _ans_blocks(sym.size)
    # counts remaining at each block's start: a forward pass; the stack coder then takes
    # the blocks last to first, so that decoding pops them first to last
    remaining, models = counts.copy(), []
    for pos, b in blocks:
        models.append(remaining / remaining.sum())
        remaining = remaining - np.bincount(sym[pos : pos + b], minlength=k)
    coder = constriction.stream.stack.AnsCoder()
    for (pos, b), probs in zip(reversed(blocks), reversed(models), strict=True):
        coder.encode_reverse(sym[pos : pos + b], constriction.stream.model.Categorical(probs, perfect=False))
    words = coder.get_compressed().astype("<u4").tobytes()
    cut = len(words)
    while cut > len(words) - 3 and cut > 0 and words[cut - 1] == 0:
        cut -= 1
    return bytes([w, k - 1]) + _ans_table(counts.tolist(), w) + words[:cut]


def decode_ans_exact(payload: bytes | memoryview, raw_len: int) -> np.ndarray:
    """Inverse of :func:`encode_ans`; raises ``ValueError`` on any inconsistency."""
    if len(payload) < 2 or payload[0] not in _WIDTHS or payload[1] + 1 > 1 << payload[0]:
        raise ValueError("ANS stream: bad header")
    w, k = payload[0], payload[1] + 1
    n_sym = raw_len * (8 // w)
    if n_sym == 0:
        raise ValueError("ANS stream: empty")
    pos = 2
    if w <= ENUM_MAX_WIDTH:
        size = (math.comb(n_sym + k - 1, k - 1).bit_length() + 7) // 8
        if len(payload) < pos + size:
            raise ValueError("ANS stream: truncated count table")
        counts = _composition_unrank(int.from_bytes(payload[pos : pos + size], "little"), n_sym, k)
        pos += size
    else:
        counts = []
        for _ in range(k - 1):
            c, pos = _read_varint(payload, pos)
            counts.append(c)
        counts.append(n_sym - sum(counts))
        if counts[-1] < 0:
            raise ValueError("ANS stream: count table does not match the declared size")
    import constriction

    body = bytes(payload[pos:]) + bytes(-(len(payload) - pos) % 4)
    remaining = np.asarray(counts, np.int64)
    sym = np.empty(n_sym, np.int32)
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(body, "<u4").astype(np.uint32))
        for start, b in _ans_blocks(n_sym):
            probs = remaining / remaining.sum()
            got = coder.decode(constriction.stream.model.Categorical(probs, perfect=False), b)
            sym[start : start + b] = got
            remaining = remaining - np.bincount(got, minlength=k)
            if remaining.min() < 0:  # a damaged stream: a symbol beyond its count
                break
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        raise ValueError(f"ANS stream: {type(err).__name__}") from None
    if remaining.min() < 0:
        raise ValueError("ANS stream: decoded symbols disagree with the count table")
    return _unsymbols(sym, w, raw_len)


def decode_ans(payload: bytes | memoryview, raw_len: int) -> np.ndarray:
    if len(payload) < 3 or payload[0] not in _WIDTHS:
        raise ValueError("ANS stream: bad header")
    w = payload[0]
    k = int.from_bytes(payload[1:3], "little")
    if not 1 <= k <= (1 << w):
        raise ValueError("ANS stream: bad alphabet size")
    pos = 3
    counts = []
    for _ in range(k):
        c, pos = _read_varint(payload, pos)
        counts.append(c)
    n_sym = raw_len * (8 // w)
    if n_sym == 0 or sum(counts) != n_sym or (len(payload) - pos) % 4:
        raise ValueError("ANS stream: count table does not match the declared size")
    import constriction

    words = np.frombuffer(payload, "<u4", offset=pos).astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        sym = coder.decode(_ans_model(np.asarray(counts, np.int64)), n_sym)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        raise ValueError(f"ANS stream: {type(err).__name__}") from None
    return _unsymbols(np.asarray(sym), w, raw_len)


def encode_stream(stream: np.ndarray, level: int, order0: bool = False, ans: bool = True) -> EncodedStream:
    """Code one byte stream by the smallest of the methods tried (``order0``: the stream
    is an order-0 source, see :func:`order0_streams`; ``ans``: ANS may be tried)."""
    raw = np.ascontiguousarray(stream).data.cast("B")
    worth, sparse, entropy = _profile(stream) if stream.size else (False, False, 8.0)
    best: tuple[int, bytes] | None = None
    if worth:
        payload = None
        if order0 and entropy < LITERAL_MAX_ENTROPY:
            payload = literal_frame(raw)
        if payload is None or entropy < RUNS_MAX_ENTROPY or level > 3:
            # Other streams, and order-0 ones where runs may pay (under 1 bit per byte,
            # Huffman's floor of one bit per symbol) or a higher level was asked for,
            # (also) take the match finder: the literal-oriented parameters win on large
            # streams; small streams with one dominant value (masks, tiny tensors) also
            # try zstd's own level parameters. The smallest is kept.
            alt = _compressor(level, False).compress(raw)
            payload = alt if payload is None or len(alt) < len(payload) else payload
            if sparse and len(raw) <= SMALL_STREAM_BYTES:
                alt = _compressor(level, True).compress(raw)
                payload = alt if len(alt) < len(payload) else payload
        if len(payload) <= len(raw) * (1.0 - MIN_SAVING):
            best = (METHOD_ZSTD, payload)
    if ans and 0 < len(raw) <= ANS_MAX_BYTES:
        # chosen by measured size: ANS wins on small alphabets and short streams, where
        # zstd's Huffman tables and whole-bit code lengths cost most
        coded = encode_ans(np.frombuffer(raw, np.uint8))
        gain = 0.0 if len(raw) <= ANS_ANY_GAIN_BYTES else ANS_MIN_GAIN
        if coded is not None and len(coded) < (len(best[1]) if best else len(raw)) * (1.0 - gain):
            best = (METHOD_ANS_EXACT, coded)
    if best is not None:
        return EncodedStream(best[0], len(raw), best[1])
    return EncodedStream(METHOD_RAW, len(raw), bytes(raw))


FLOAT_LAYOUTS = ("f32", "bf16", "f16")
_UINT = {"f32": np.uint32, "bf16": np.uint16, "f16": np.uint16}
SPARSE_MIN_ZEROS = 0.25  # fraction of +0.0 elements from which a chunk is coded sparse
# int8 chunks are coded paired (see the module docstring) when at most this fraction of
# their codes fall outside -8..7: each escape costs its byte and position, and wide codes
# (entropy near 8 bits) lose little to whole-bit Huffman codes anyway
PAIRED_MAX_ESCAPES = 1 / 64
PAIRED_MIN_ELEMENTS = 64


def encode_chunk(layout: str, data: np.ndarray, level: int = DEFAULT_LEVEL) -> EncodedChunk:
    """Split one chunk (1-D array of the layout's element type) and code each stream.

    Float chunks with many exact +0.0 elements (pruned weights) are coded *sparse*: a
    bit-packed "non-zero" mask stream first, then the layout's streams of the non-zero
    elements only. Otherwise every byte stream would carry the zero pattern again
    (measured on 80%-pruned MiniLM: 0.29 dense vs 0.19 sparse). A decoder tells the two
    apart by the stream count (one more than the layout's).
    """
    streams = chunk_streams(layout, data, scratch=True)  # coded before this returns
    # A paired chunk's escapes (a few hundred bytes per MiB) skip ANS: trying it cost a
    # tenth of the chunk's encode time to save 0.04% of its size.
    ans = [True, False] if layout == "bytes" and len(streams) == 2 else None
    return _chunk(int(data.size), streams, level, order0_streams(layout, data, len(streams)), ans)


def chunk_streams(layout: str, data: np.ndarray, scratch: bool = False) -> list[np.ndarray]:
    """The byte streams :func:`encode_chunk` codes for one chunk (also what benchmarks
    measure entropy bounds on): the layout's split, or mask + non-zero values when sparse.
    ``scratch``: see :func:`split`."""
    if layout in FLOAT_LAYOUTS and data.size >= 64:
        bits = data.view(_UINT[layout])
        nonzero = bits != 0
        k = int(np.count_nonzero(nonzero))
        if data.size - k >= SPARSE_MIN_ZEROS * data.size:
            mask = np.packbits(nonzero, bitorder="little")
            return [mask, *split(layout, bits[nonzero], scratch)]
    if layout == "bytes" and data.dtype == np.int8 and data.size >= PAIRED_MIN_ELEMENTS:
        paired = _paired_streams(data)
        if paired is not None:
            return paired
    return split(layout, data, scratch)


def _paired_streams(data: np.ndarray) -> list[np.ndarray] | None:
    """An int8 chunk's paired streams, or ``None`` when too many codes fall outside -8..7.

    Stream 0 holds the codes plus 8 (0..15), the chunk's first half in the low nibbles and
    its second half in the high ones: "planar" halves unpack with two whole-array byte
    operations (interleaved nibbles took eight passes in 16-bit lanes, and decoding was
    slower than zipnn's). Stream 1 holds the escaped codes' bytes, then their positions
    in the chunk (uint32, ascending); an escaped code's nibble holds code 0.
    """
    u = data.view(np.uint8)
    n = u.size
    h = (n + 1) // 2
    t = _scratch(50, n, np.uint8)
    np.add(u, 8, out=t)  # -8..7 -> 0..15, anything else above 15 (uint8 wraps)
    escaped = np.flatnonzero(np.greater(t, 15, out=_scratch(51, n, np.bool_)))
    k = escaped.size
    if k > PAIRED_MAX_ESCAPES * n:
        return None
    t[escaped] = 8
    packed = np.empty(h, np.uint8)
    np.multiply(t[h:], 16, out=packed[: n - h])  # a shift by 4, but SIMD for bytes (8x faster)
    packed[: n - h] |= t[: n - h]
    packed[n - h :] = t[n - h : h]  # the middle code of an odd chunk, alone in its byte
    esc = np.empty(5 * k, np.uint8)
    esc[:k] = u[escaped]
    esc[k:] = escaped.astype("<u4").view(np.uint8)
    return [packed, esc]


def _chunk(
    n: int, streams: list[np.ndarray], level: int, order0: list[bool], ans: list[bool] | None = None
) -> EncodedChunk:
    coded = tuple(
        encode_stream(s, level, o, a) for s, o, a in zip(streams, order0, ans or [True] * len(streams), strict=True)
    )
    return EncodedChunk(n, coded, chunk_crc([s.payload for s in coded]))


def decode_stream(method: int, payload: bytes | memoryview, raw_len: int, into: np.ndarray | None = None) -> np.ndarray:
    """Decode one stream; raises ``ValueError`` on any inconsistency (the container names it).

    ``into``: a writable uint8 array of ``raw_len`` bytes that a zstd frame is decoded
    into (then returned) instead of a new buffer.
    """
    if method == METHOD_RAW:
        if len(payload) != raw_len:
            raise ValueError(f"raw stream holds {len(payload)} bytes, {raw_len} declared")
        return np.frombuffer(payload, np.uint8)
    if method == METHOD_ZSTD:
        try:
            declared = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as err:
            raise ValueError(f"zstd frame header: {err}") from None
        if declared != raw_len:
            raise ValueError(f"zstd frame declares {declared} bytes, {raw_len} expected")
        native = _libzstd()
        if native is not None:  # straight into the destination: no bytes object, no copy
            dst = into if into is not None else np.empty(raw_len, np.uint8)
            native.decompress(payload, dst)
            return dst
        try:
            out = _decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as err:
            raise ValueError(f"zstd: {err}") from None
        if len(out) != raw_len:
            raise ValueError(f"zstd stream decoded to {len(out)} bytes, {raw_len} expected")
        return np.frombuffer(out, np.uint8)
    if method == METHOD_ANS_EXACT:
        return decode_ans_exact(payload, raw_len)
    if method == METHOD_ANS:
        return decode_ans(payload, raw_len)
    raise ValueError(f"unknown stream method {method}")


def decode_chunk(
    layout: str,
    n: int,
    item: int,
    streams: Sequence[tuple[int, bytes | memoryview, int]],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode ``(method, payload, raw_len)`` streams back into the chunk's raw bytes.

    Returns the bytes; when ``out`` is given they may have been written into it (check
    ``result is out`` or copy when they differ).
    """
    if layout == "bytes" and len(streams) == 1:
        m, p, r = streams[0]
        return decode_stream(m, p, r, out if out is not None and out.size == r else None)
    if layout == "bytes" and len(streams) == 2 and item == 1:
        return _decode_paired(n, streams, out)
    # Streams are merged into the output below, so they are decoded into per-thread
    # buffers (fresh ones per chunk made glibc grow and trim its heap every chunk).
    arrays = [
        decode_stream(m, p, r, _scratch(30 + i, r, np.uint8) if m == METHOD_ZSTD else None)
        for i, (m, p, r) in enumerate(streams)
    ]
    if layout in FLOAT_LAYOUTS and len(arrays) == LAYOUTS[layout] + 1:
        # an index scatter is 2.5x faster than a boolean-mask assignment
        where = np.flatnonzero(np.unpackbits(arrays[0], count=n, bitorder="little").view(bool))
        k = where.size
        if any(a.size != k for a in arrays[1:]):
            raise ValueError(f"sparse chunk: mask has {k} non-zeros, value streams disagree")
        values = merge(layout, arrays[1:], k, item, _scratch(5, k * item, np.uint8)).view(_UINT[layout])
        full = out if out is not None else np.empty(n * item, np.uint8)
        el = full.view(_UINT[layout])
        el[...] = 0
        el[where] = values
        return full
    if len(arrays) != LAYOUTS.get(layout, -1):
        raise ValueError(f"{len(arrays)} streams for layout {layout}")
    return merge(layout, arrays, n, item, out)


def _decode_paired(
    n: int, streams: Sequence[tuple[int, bytes | memoryview, int]], out: np.ndarray | None
) -> np.ndarray:
    """An int8 chunk coded paired (see :func:`_paired_streams`): unpack both halves from
    the nibbles, remove the bias, then put the escaped codes back."""
    (m, p, r), (em, ep, er) = streams
    h = (n + 1) // 2
    if r != h or er % 5 or er > 5 * n:
        raise ValueError(f"paired chunk: streams of {r} and {er} bytes for {n} codes")
    packed = decode_stream(m, p, r, _scratch(30, r, np.uint8) if m == METHOD_ZSTD else None)
    full = out if out is not None and out.size == n else np.empty(n, np.uint8)
    np.bitwise_and(packed, 0x0F, out=full[:h])
    np.right_shift(packed[: n - h], 4, out=full[h:])
    full -= 8
    if er:
        k = er // 5
        raw = decode_stream(em, ep, er)
        where = raw[k:].view("<u4")
        if int(where[-1]) >= n or (k > 1 and bool(np.any(where[1:] <= where[:-1]))):
            raise ValueError("paired chunk: escape positions out of order or out of range")
        full[where] = raw[:k]
    return full


# ----------------------------------------------------------------------- in-memory API


def encode_array(
    data: np.ndarray,
    dtype: str,
    layout: str | None = None,
    *,
    level: int = DEFAULT_LEVEL,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int = 1,
) -> list[EncodedChunk]:
    """Code a whole array in memory (independent chunks, ``threads`` workers)."""
    from concurrent.futures import ThreadPoolExecutor

    layout = layout or ALLOWED_LAYOUTS[dtype][0]
    flat = np.ascontiguousarray(data).reshape(-1).view(numpy_view_dtype(dtype))
    step = chunk_elements(dtype, layout, chunk_size)
    pieces = [flat[i : i + step] for i in range(0, flat.size, step)]
    if threads <= 1:
        return [encode_chunk(layout, p, level) for p in pieces]
    # One task per worker (every threads-th chunk), not one per chunk: each hand-off
    # wakes a thread, and on a busy machine a wake-up can cost more than a chunk.
    out: list[EncodedChunk | None] = [None] * len(pieces)

    def part(k: int) -> None:
        for i in range(k, len(pieces), threads):
            out[i] = encode_chunk(layout, pieces[i], level)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(threads)))
    done = [c for c in out if c is not None]
    assert len(done) == len(pieces)  # a failed chunk raised out of pool.map
    return done


def decode_array(
    chunks: Sequence[EncodedChunk], dtype: str, layout: str | None = None, *, threads: int = 1
) -> np.ndarray:
    """Inverse of :func:`encode_array` (CRCs checked); returns the raw bytes as uint8."""
    from concurrent.futures import ThreadPoolExecutor

    layout = layout or ALLOWED_LAYOUTS[dtype][0]
    item = itemsize(dtype)
    total = sum(c.n for c in chunks) * item
    out = np.empty(total, np.uint8)
    starts = np.cumsum([0] + [c.n * item for c in chunks]).tolist()

    def one(i: int) -> None:
        c = chunks[i]
        if chunk_crc([s.payload for s in c.streams]) != c.crc:
            raise ValueError(f"chunk {i}: checksum mismatch")
        view = out[starts[i] : starts[i + 1]]
        got = decode_chunk(layout, c.n, item, [(s.method, s.payload, s.raw_len) for s in c.streams], view)
        if got.__array_interface__["data"][0] != view.__array_interface__["data"][0]:
            view[:] = got

    if threads <= 1:
        for i in range(len(chunks)):
            one(i)
    else:
        # one task per worker, as in encode_array

        def part(k: int) -> None:
            for i in range(k, len(chunks), threads):
                one(i)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, range(threads)))
    return out


def entropy_bits(stream: np.ndarray) -> float:
    """Order-0 entropy of a byte stream in bits per byte (for reports and benchmarks)."""
    if stream.size == 0:
        return 0.0
    counts = np.bincount(stream.reshape(-1), minlength=256)
    p = counts[counts > 0] / stream.size
    return float(-(p * np.log2(p)).sum())


def max_ratio_ok(raw_len: int, stored_len: int) -> bool:
    """Whether a declared decoded size is possible for a stored size (bounds hostile files).

    A zstd block decodes to at most 128 KiB and costs at least a few bytes, so no real
    frame expands more than ~2**15 times; 2**16 leaves margin.
    """
    return raw_len <= 1024 + stored_len * 65536


__all__ = [
    "ALLOWED_LAYOUTS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "DTYPES",
    "LAYOUTS",
    "CodecError",
    "EncodedChunk",
    "EncodedStream",
    "chunk_elements",
    "decode_chunk",
    "encode_chunk",
    "entropy_bits",
    "itemsize",
    "merge",
    "numpy_view_dtype",
    "split",
    "stream_sizes",
]
