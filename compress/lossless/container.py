"""The ``.czip`` container: coded tensors and opaque blobs, checksummed, randomly accessible.

Byte layout (all integers little-endian; docs/container-format.md is the full spec)::

    offset 0   8 bytes  magic  b"\\x89CZIP\\r\\n\\x1a"
           8   u16      major version (readers refuse another major)
          10   u16      minor version (additions a reader may ignore)
          12   u32      flags (must be 0 in version 1)
          16   ...      chunk payloads, back to back
           M   ...      manifest: UTF-8 JSON
    size-64    u64      manifest offset M
               u64      manifest length
               u32      CRC-32 of the manifest
               u32      reserved (0)
               32 bytes SHA-256 of bytes [0, size-64)
               8 bytes  end magic b"CZIPEND\\x00"

The writer streams: chunk payloads are written as they are coded (bounded memory), the
manifest and trailer last, into ``path.tmp`` which is renamed over ``path`` only once
complete. The reader trusts nothing: every number in the manifest is validated against
the file size and the codec's own size rules before anything is allocated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from compress.errors import InputError
from compress.lossless import codec as C

log = logging.getLogger(__name__)

MAGIC = b"\x89CZIP\r\n\x1a"
END_MAGIC = b"CZIPEND\x00"
VERSION_MAJOR = 1
VERSION_MINOR = 0
HEADER = struct.Struct("<8sHHI")
TRAILER = struct.Struct("<QQII32s8s")
HEADER_SIZE = HEADER.size  # 16
TRAILER_SIZE = TRAILER.size  # 64

MAX_MANIFEST_BYTES = 64 << 20
MAX_ENTRIES = 1_000_000
MAX_NAME_BYTES = 4096
MAX_NDIM = 64
MAX_CHUNK_RAW_BYTES = 256 << 20  # per chunk, before coding
MAX_JSON_DEPTH = 64

METHOD_NAMES = {C.METHOD_RAW: "raw", C.METHOD_ZSTD: "zstd"}


class CorruptArchiveError(InputError):
    """The container is damaged, truncated, hostile or not a container at all."""


def _default_threads(threads: int | None) -> int:
    if threads is not None and threads >= 1:
        return threads
    return max(os.cpu_count() or 1, 1)


# =============================================================================== writer


@dataclass
class EntryStats:
    name: str
    kind: str
    dtype: str
    raw_bytes: int
    stored_bytes: int

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


class ContainerWriter:
    """Streaming writer. Use as a context manager; the file appears only on success.

    Args:
        path: destination; written to ``path.tmp`` and renamed when :meth:`close` succeeds.
        level: zstd level for every stream (``<= 3`` selects the tuned literal-oriented
            parameters, see :mod:`compress.lossless.codec`).
        chunk_size: raw bytes per chunk; chunks are coded independently and in parallel.
        threads: worker threads (``None``: all cores). zstd and numpy release the GIL.
        meta: JSON-able metadata stored in the manifest.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        level: int = C.DEFAULT_LEVEL,
        chunk_size: int = C.DEFAULT_CHUNK_SIZE,
        threads: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not 1 <= level <= 22:
            raise InputError(f"zstd level must be in 1..22, got {level}")
        if not 4096 <= chunk_size <= MAX_CHUNK_RAW_BYTES:
            raise InputError(f"chunk_size must be in 4096..{MAX_CHUNK_RAW_BYTES} bytes, got {chunk_size}")
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.level = level
        self.chunk_size = chunk_size
        self.threads = _default_threads(threads)
        self.meta: dict[str, Any] = dict(meta or {})
        self.entries: list[dict[str, Any]] = []
        self.stats: list[EntryStats] = []
        self._names: set[str] = set()
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._hash = hashlib.sha256()
        self._f: BinaryIO | None = open(self.tmp, "wb")
        self._pos = 0
        self._closed = False
        self._write(HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, 0))

    # -- plumbing
    def _write(self, data: bytes | memoryview) -> None:
        assert self._f is not None
        self._f.write(data)
        self._hash.update(data)
        self._pos += len(data)

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the partial file."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._f is not None:
            self._f.close()
            self._f = None
        self.tmp.unlink(missing_ok=True)
        self._closed = True

    def _check_name(self, name: str) -> None:
        if self._closed:
            raise RuntimeError("container writer is closed")
        if not isinstance(name, str) or not name or len(name.encode()) > MAX_NAME_BYTES:
            raise InputError(f"entry name must be a non-empty string of at most {MAX_NAME_BYTES} bytes")
        if name in self._names:
            raise InputError(f"duplicate entry name {name!r}")
        self._names.add(name)

    # -- chunk pipeline
    def _code_chunks(self, layout: str, pieces: Iterable[np.ndarray]) -> Iterator[C.EncodedChunk]:
        """Code pieces in parallel, yielding results in order with a bounded window."""
        if self._pool is None:
            for piece in pieces:
                yield C.encode_chunk(layout, piece, self.level)
            return
        window: list[Future] = []
        limit = 2 * self.threads
        for piece in pieces:
            window.append(self._pool.submit(C.encode_chunk, layout, piece, self.level))
            if len(window) >= limit:
                yield window.pop(0).result()
        for fut in window:
            yield fut.result()

    def _add(
        self,
        name: str,
        kind: str,
        dtype: str,
        shape: list[int],
        layout: str,
        pieces: Iterable[np.ndarray],
        meta: dict[str, Any] | None,
    ) -> EntryStats:
        item = C.itemsize(dtype)
        numel = 1
        for d in shape:
            numel *= d
        chunks: list[list[Any]] = []
        seen = 0
        stored = 0
        for enc in self._code_chunks(layout, pieces):
            streams = []
            for s in enc.streams:
                streams.append([self._pos, len(s.payload), s.raw_len, s.method, s.crc])
                self._write(s.payload)
                stored += len(s.payload)
            chunks.append([enc.n, streams])
            seen += enc.n
        if seen != numel:
            raise InputError(f"entry {name!r}: got {seen} elements, shape {shape} needs {numel}")
        entry = {
            "name": name,
            "kind": kind,
            "dtype": dtype,
            "shape": shape,
            "layout": layout,
            "nbytes": numel * item,
            "chunks": chunks,
        }
        if meta:
            entry["meta"] = meta
        self.entries.append(entry)
        st = EntryStats(name, kind, dtype, numel * item, stored)
        self.stats.append(st)
        return st

    # -- public API
    def add_tensor(
        self,
        name: str,
        array: np.ndarray,
        *,
        dtype: str | None = None,
        layout: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> EntryStats:
        """Add an in-memory array (read only, never modified).

        Args:
            name: unique entry name.
            array: the tensor; bfloat16 as a uint16 (or int16) array with ``dtype="bfloat16"``.
            dtype: codec dtype name (default: from ``array.dtype``).
            layout: override the dtype's default layout (``"i4"`` for int8 codes in -8..7,
                ``"u4"`` for uint8 codes below 16).
            meta: JSON-able per-entry metadata.
        """
        dtype = dtype or np.dtype(array.dtype).name
        layout = self._resolve(name, dtype, layout)
        flat = np.ascontiguousarray(array).reshape(-1).view(C.numpy_view_dtype(dtype))
        shape = [int(d) for d in array.shape]
        step = C.chunk_elements(dtype, layout, self.chunk_size)
        pieces = (flat[i : i + step] for i in range(0, flat.size, step))
        return self._add(name, "tensor", dtype, shape, layout, pieces, meta)

    def add_tensor_chunks(
        self,
        name: str,
        dtype: str,
        shape: list[int] | tuple[int, ...],
        chunks: Iterable[bytes | bytearray | memoryview | np.ndarray],
        *,
        layout: str | None = None,
        meta: dict[str, Any] | None = None,
        kind: str = "tensor",
    ) -> EntryStats:
        """Add a tensor from a stream of raw byte pieces (bounded memory for huge tensors).

        Pieces may have any size; they are re-cut into the writer's chunk size.
        """
        layout = self._resolve(name, dtype, layout)
        vdt = C.numpy_view_dtype(dtype)
        step_bytes = C.chunk_elements(dtype, layout, self.chunk_size) * vdt.itemsize

        def recut() -> Iterator[np.ndarray]:
            # One copy per byte: pieces are gathered into fresh chunk buffers, which the
            # worker threads then own.
            buf = np.empty(step_bytes, np.uint8)
            fill = 0
            for piece in chunks:
                src = np.frombuffer(piece, np.uint8) if not isinstance(piece, np.ndarray) else piece.reshape(-1).view(np.uint8)
                pos = 0
                while pos < src.size:
                    take = min(step_bytes - fill, src.size - pos)
                    buf[fill : fill + take] = src[pos : pos + take]
                    fill += take
                    pos += take
                    if fill == step_bytes:
                        yield buf.view(vdt)
                        buf = np.empty(step_bytes, np.uint8)
                        fill = 0
            if fill % vdt.itemsize:
                raise InputError(f"entry {name!r}: {fill} trailing bytes are not whole {dtype} elements")
            if fill:
                yield buf[:fill].view(vdt)

        return self._add(name, kind, dtype, [int(d) for d in shape], layout, recut(), meta)

    def add_blob(
        self,
        name: str,
        data: bytes | bytearray | memoryview | Iterable[bytes],
        *,
        size: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> EntryStats:
        """Add opaque bytes (a graph, a header...). ``data`` may be an iterable of pieces,
        in which case ``size`` (total bytes) must be given."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._check_name(name)
            arr = np.frombuffer(bytes(data) if isinstance(data, memoryview) else data, np.uint8)
            step = self.chunk_size
            pieces: Iterable[np.ndarray] = (arr[i : i + step] for i in range(0, arr.size, step))
            return self._add(name, "blob", "uint8", [arr.size], "bytes", pieces, meta)
        if size is None:
            raise InputError(f"blob {name!r}: a streamed blob needs its size")
        return self.add_tensor_chunks(name, "uint8", [size], data, layout="bytes", meta=meta, kind="blob")

    def _resolve(self, name: str, dtype: str, layout: str | None) -> str:
        self._check_name(name)
        if dtype not in C.DTYPES:
            raise InputError(f"entry {name!r}: unsupported dtype {dtype!r}; known: {', '.join(C.DTYPES)}")
        allowed = C.ALLOWED_LAYOUTS[dtype]
        layout = layout or allowed[0]
        if layout not in allowed:
            raise InputError(f"entry {name!r}: layout {layout!r} not allowed for {dtype}; allowed: {allowed}")
        return layout

    def close(self) -> Path:
        """Write manifest and trailer, then atomically move the file into place."""
        if self._closed:
            return self.path
        try:
            manifest = {
                "format": "czip",
                "version": [VERSION_MAJOR, VERSION_MINOR],
                "meta": self.meta,
                "entries": self.entries,
            }
            body = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
            if len(body) > MAX_MANIFEST_BYTES:
                raise InputError(
                    f"manifest of {len(body)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit; use a larger chunk_size"
                )
            offset = self._pos
            self._write(body)
            digest = self._hash.digest()
            assert self._f is not None
            self._f.write(TRAILER.pack(offset, len(body), zlib.crc32(body), 0, digest, END_MAGIC))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self._closed = True
        return self.path


def write_container(
    path: str | os.PathLike,
    entries: Iterable[tuple[str, Any]] | dict[str, Any],
    meta: dict[str, Any] | None = None,
    **opts: Any,
) -> Path:
    """Write arrays and blobs in one call.

    Args:
        path: destination file.
        entries: ``{name: value}`` or ``(name, value)`` pairs; a value is a numpy array
            (tensor), ``bytes`` (blob), or a ``(array, dtype)`` / ``(array, dtype, layout)``
            tuple (e.g. bfloat16 held as uint16, int4 codes with layout ``"i4"``).
        meta: JSON-able file metadata.
        **opts: ``level``, ``chunk_size``, ``threads`` for :class:`ContainerWriter`.
    """
    items = entries.items() if isinstance(entries, dict) else entries
    with ContainerWriter(path, meta=meta, **opts) as w:
        for name, value in items:
            if isinstance(value, (bytes, bytearray, memoryview)):
                w.add_blob(name, value)
            elif isinstance(value, tuple):
                w.add_tensor(name, value[0], dtype=value[1], layout=value[2] if len(value) > 2 else None)
            else:
                w.add_tensor(name, np.asarray(value))
    return Path(path)


# =============================================================================== reader


def _depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of parsed JSON, iteratively (hostile input must not recurse deep)."""
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Entry:
    """A validated manifest entry."""

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    nbytes: int
    chunks: list[tuple[int, list[tuple[int, int, int, int, int]]]]  # (n, [(off, len, raw, method, crc)])
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stored_bytes(self) -> int:
        return sum(s[1] for _, streams in self.chunks for s in streams)


class ContainerReader:
    """Random-access reader of a ``.czip`` file.

    Opening reads and validates only the trailer and the manifest; each tensor is read
    and checked on demand. Every failure is a :class:`CorruptArchiveError` naming the
    file and, when the damage is inside a chunk, the entry and chunk.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._f: BinaryIO = open(self.path, "rb")
        except OSError as err:
            raise InputError(f"cannot open container {self.path}: {err.strerror}") from None
        try:
            self._open()
        except BaseException:
            self._f.close()
            raise

    def _err(self, msg: str) -> CorruptArchiveError:
        return CorruptArchiveError(f"{self.path}: {msg}")

    def _open(self) -> None:
        f = self._f
        size = os.fstat(f.fileno()).st_size
        self.size = size
        if size < HEADER_SIZE + TRAILER_SIZE:
            raise self._err(f"not a czip container (only {size} bytes)")
        magic, major, minor, flags = HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise self._err("not a czip container (bad magic)")
        if major != VERSION_MAJOR:
            raise self._err(f"container format version {major}.{minor} is not supported (this reader: {VERSION_MAJOR}.x)")
        if flags != 0:
            raise self._err(f"unknown header flags {flags:#x}")
        f.seek(size - TRAILER_SIZE)
        m_off, m_len, m_crc, reserved, digest, end = TRAILER.unpack(f.read(TRAILER_SIZE))
        if end != END_MAGIC:
            raise self._err("truncated or damaged (bad end marker)")
        self.data_end = size - TRAILER_SIZE
        if reserved != 0 or m_len > MAX_MANIFEST_BYTES or m_off < HEADER_SIZE or m_off + m_len != self.data_end:
            raise self._err("truncated or damaged (manifest location out of bounds)")
        self.digest = digest
        self.manifest_offset = m_off
        f.seek(m_off)
        body = f.read(m_len)
        if len(body) != m_len or zlib.crc32(body) != m_crc:
            raise self._err("manifest checksum mismatch")
        try:
            manifest = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError, UnicodeDecodeError) as err:
            raise self._err(f"manifest is not valid JSON ({type(err).__name__})") from None
        self._validate(manifest)

    def _validate(self, manifest: Any) -> None:
        if not isinstance(manifest, dict) or manifest.get("format") != "czip":
            raise self._err("manifest is not a czip manifest")
        if _depth(manifest) > MAX_JSON_DEPTH:
            raise self._err(f"manifest nests deeper than {MAX_JSON_DEPTH}")
        meta = manifest.get("meta", {})
        entries = manifest.get("entries")
        if not isinstance(meta, dict) or not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
            raise self._err("manifest 'meta' must be an object and 'entries' a list")
        self.meta: dict[str, Any] = meta
        self.version = manifest.get("version")
        self.entries: dict[str, Entry] = {}
        ranges: list[tuple[int, int]] = []
        for i, e in enumerate(entries):
            entry = self._validate_entry(i, e, ranges)
            if entry.name in self.entries:
                raise self._err(f"duplicate entry name {entry.name!r}")
            self.entries[entry.name] = entry
        ranges.sort()
        prev_end = HEADER_SIZE
        for start, length in ranges:
            if start < prev_end:
                raise self._err("chunk payloads overlap")
            prev_end = start + length

    def _validate_entry(self, i: int, e: Any, ranges: list[tuple[int, int]]) -> Entry:
        if not isinstance(e, dict):
            raise self._err(f"entry #{i} is not an object")
        name = e.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_BYTES:
            raise self._err(f"entry #{i} has no valid name")
        where = f"entry {name!r}"
        kind, dtype, layout = e.get("kind"), e.get("dtype"), e.get("layout")
        if kind not in ("tensor", "blob"):
            raise self._err(f"{where}: unknown kind {kind!r}")
        if dtype not in C.DTYPES or layout not in C.ALLOWED_LAYOUTS[dtype]:
            raise self._err(f"{where}: unsupported dtype/layout {dtype!r}/{layout!r}")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d < 2**62 for d in shape):
            raise self._err(f"{where}: invalid shape")
        numel = 1
        for d in shape:
            numel *= d
        item = C.itemsize(dtype)
        nbytes = e.get("nbytes")
        if not _is_int(nbytes) or nbytes != numel * item:
            raise self._err(f"{where}: nbytes does not match shape and dtype")
        meta = e.get("meta", {})
        if not isinstance(meta, dict):
            raise self._err(f"{where}: meta must be an object")
        raw_chunks = e.get("chunks")
        if not isinstance(raw_chunks, list):
            raise self._err(f"{where}: chunks must be a list")
        n_streams = C.LAYOUTS[layout]
        chunks = []
        total = 0
        for ci, ch in enumerate(raw_chunks):
            cw = f"{where} chunk {ci}"
            if not (isinstance(ch, list) and len(ch) == 2 and _is_int(ch[0]) and isinstance(ch[1], list)):
                raise self._err(f"{cw}: malformed")
            n, streams = ch
            sparse = layout in C.FLOAT_LAYOUTS and len(streams) == n_streams + 1
            if n <= 0 or n * item > MAX_CHUNK_RAW_BYTES or not (len(streams) == n_streams or sparse):
                raise self._err(f"{cw}: invalid element count or stream count")
            expect = C.stream_sizes(layout, n, item)
            if sparse:
                # mask, then the non-zero elements' streams (k each, k <= n; checked on decode)
                k = streams[1][2] if isinstance(streams[1], list) and len(streams[1]) == 5 else -1
                if not (_is_int(k) and 0 <= k <= n):
                    raise self._err(f"{cw}: invalid sparse chunk")
                expect = [(n + 7) // 8] + C.stream_sizes(layout, k, item)
            checked = []
            for si, s in enumerate(streams):
                if not (isinstance(s, list) and len(s) == 5 and all(_is_int(v) for v in s)):
                    raise self._err(f"{cw} stream {si}: malformed")
                off, length, raw_len, method, crc = s
                if method not in METHOD_NAMES or not 0 <= crc < 2**32 or raw_len != expect[si]:
                    raise self._err(f"{cw} stream {si}: invalid method, checksum or size")
                if off < HEADER_SIZE or length < 0 or off + length > self.manifest_offset:
                    raise self._err(f"{cw} stream {si}: payload lies outside the data region")
                if (method == C.METHOD_RAW and length != raw_len) or not C.max_ratio_ok(raw_len, length):
                    raise self._err(f"{cw} stream {si}: declared size impossible for its payload")
                ranges.append((off, length))
                checked.append((off, length, raw_len, method, crc))
            total += n
            chunks.append((n, checked))
        if total != numel:
            raise self._err(f"{where}: chunks hold {total} elements, shape needs {numel}")
        return Entry(name, kind, dtype, tuple(shape), layout, nbytes, chunks, meta)

    # -- access
    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ContainerReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise InputError(f"{self.path}: no entry {name!r}") from None

    def _read_payload(self, off: int, length: int) -> bytes:
        self._f.seek(off)
        data = self._f.read(length)
        if len(data) != length:
            raise self._err(f"short read at offset {off}")
        return data

    def iter_chunks(self, name: str, threads: int | None = 1, out: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Yield the decoded raw bytes of each chunk of ``name`` in order (bounded memory).

        With ``out`` (uint8, the entry's ``nbytes``) each chunk is decoded into its slice.
        """
        e = self.entry(name)
        item = C.itemsize(e.dtype)
        nthreads = _default_threads(threads)
        starts = [0]
        for n, _ in e.chunks:
            starts.append(starts[-1] + n * item)

        def load(ci: int) -> tuple[int, int, list[tuple[int, bytes, int]]]:
            n, streams = e.chunks[ci]
            out = []
            for si, (off, length, raw_len, method, crc) in enumerate(streams):
                payload = self._read_payload(off, length)
                if zlib.crc32(payload) != crc:
                    raise self._err(f"entry {name!r} chunk {ci} stream {si}: checksum mismatch")
                out.append((method, payload, raw_len))
            return ci, n, out

        def decode(ci: int, n: int, streams: list[tuple[int, bytes, int]]) -> np.ndarray:
            view = out[starts[ci] : starts[ci + 1]] if out is not None else None
            try:
                got = C.decode_chunk(e.layout, n, item, streams, view)
            except ValueError as err:
                raise self._err(f"entry {name!r} chunk {ci}: {err}") from None
            if view is not None and got.__array_interface__["data"][0] != view.__array_interface__["data"][0]:
                view[:] = got
                return view
            return got

        if nthreads <= 1 or len(e.chunks) <= 1:
            for ci in range(len(e.chunks)):
                yield decode(*load(ci))
            return
        # File reads stay on this thread; decoding (GIL released in zstd and numpy) runs in
        # a pool with a bounded window so memory stays at a few chunks.
        with ThreadPoolExecutor(nthreads) as pool:
            window: list[Future] = []
            for ci in range(len(e.chunks)):
                window.append(pool.submit(decode, *load(ci)))
                if len(window) >= 2 * nthreads:
                    yield window.pop(0).result()
            for fut in window:
                yield fut.result()

    def read_bytes(self, name: str, threads: int | None = None) -> np.ndarray:
        """The entry's raw bytes as one uint8 array."""
        e = self.entry(name)
        out = np.empty(e.nbytes, np.uint8)
        for _ in self.iter_chunks(name, threads, out=out):
            pass
        return out

    def read_tensor(self, name: str, threads: int | None = None) -> np.ndarray:
        """Decode one tensor (other entries are not touched). bfloat16 comes back as uint16."""
        e = self.entry(name)
        return self.read_bytes(name, threads).view(C.numpy_view_dtype(e.dtype)).reshape(e.shape)

    def read_blob(self, name: str) -> bytes:
        return self.read_bytes(name).tobytes()

    def verify(self) -> None:
        """Decode every entry (each chunk's CRC and sizes), then check the whole-file SHA-256.

        Chunks first, so that damage inside a chunk is reported with its entry and chunk.
        """
        for name in self.entries:
            for _ in self.iter_chunks(name):
                pass
        h = hashlib.sha256()
        self._f.seek(0)
        left = self.data_end
        while left:
            block = self._f.read(min(left, 1 << 22))
            if not block:
                raise self._err("short read while hashing")
            h.update(block)
            left -= len(block)
        if h.digest() != self.digest:
            raise self._err("whole-file SHA-256 mismatch")
