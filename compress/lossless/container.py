"""The ``.czip`` container: coded tensors and opaque blobs, checksummed, randomly accessible.

Byte layout, format version 4 (all integers little-endian; docs/container-format.md is
the full spec)::

    offset 0   8 bytes  magic  b"\\x89CZIP\\r\\n\\x1a"
           8   u16      major version (4; readers also read 2 and 3, refuse others)
          10   u16      minor version (additions a reader may ignore)
          12   u32      flags (must be 0)
          16   ...      chunk payloads, back to back, in manifest order
           M   ...      manifest: one zstd frame of UTF-8 JSON
    size-64    u64      manifest offset M
               u64      manifest stored length
               u32      CRC-32 of the stored manifest
               u32      manifest length once decompressed
               32 bytes SHA-256 of the header and the stored manifest
               8 bytes  end magic b"CZIPEND\\x00"

Payload offsets are implicit (the running sum of the stored lengths), so the manifest
stays small. Each chunk carries a CRC-32 of its payloads; the trailer's SHA-256 covers
the header and the manifest, which holds every CRC: one cheap check on every open
authenticates the structure, and each chunk is checked when it is read.

The writer streams: payloads are written as they are coded (bounded memory), the manifest
and trailer last, into a unique temp file renamed over ``path`` only once complete. The
reader trusts nothing: every number in the manifest is validated against the file size
and the codec's own size rules before anything is allocated, and decoding holds at most
``DECODE_WINDOW_BYTES`` of chunks in flight.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

import numpy as np
import zstandard

from compress.artifacts import (
    OutputError,
    describe_os_error,
    discard_temp,
    open_temp,
    publish_temp,
)
from compress.errors import InputError
from compress.lossless import codec as C

log = logging.getLogger(__name__)

MAGIC = b"\x89CZIP\r\n\x1a"
END_MAGIC = b"CZIPEND\x00"
VERSION_MAJOR = 4
VERSION_MINOR = 0
# Version 3 adds paired int8 chunks (codec.py): a version-2 reader would refuse them by
# their stream count, so the version says it first. Version 4 adds stream method 3
# (ANS_EXACT: a counts-remaining model with an enumerated count table, codec.py), which a
# version-3 reader would refuse by its method number. Version-2 and -3 files hold a subset
# of what version 4 may, and are read as they are.
READ_MAJORS = (2, 3, 4)
HEADER = struct.Struct("<8sHHI")
TRAILER = struct.Struct("<QQII32s8s")
HEADER_SIZE = HEADER.size  # 16
TRAILER_SIZE = TRAILER.size  # 64

# A manifest needs about 40 bytes per chunk: 16 MiB decoded covers ~400,000 chunks (400 GB
# of tensors at the default chunk size) and parses in well under a second.
MAX_MANIFEST_BYTES = 16 << 20
MAX_MANIFEST_STORED = 8 << 20
MAX_ENTRIES = 200_000
MAX_NAME_BYTES = 1024
MAX_NDIM = 64
# per chunk, before coding: bounds what one hostile chunk makes a reader allocate (a
# decoded chunk plus its merge temporaries); larger chunks bring no speed
MAX_CHUNK_RAW_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
DECODE_WINDOW_BYTES = 64 << 20  # decoded bytes in flight at once, whatever the thread count

METHOD_NAMES = {C.METHOD_RAW: "raw", C.METHOD_ZSTD: "zstd", C.METHOD_ANS: "ans", C.METHOD_ANS_EXACT: "ans-exact"}
# Stream methods each format version may hold: a method an older version never wrote is
# damage there, not something to try decoding.
METHODS_BY_MAJOR = {2: (0, 1, 2), 3: (0, 1, 2), 4: (0, 1, 2, 3)}
KINDS = ("tensor", "blob", "alias")


class CorruptArchiveError(InputError):
    """The container is damaged, truncated, hostile or not a container at all."""


def _default_threads(threads: int | None) -> int:
    if threads is not None and threads >= 1:
        return threads
    return max(os.cpu_count() or 1, 1)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# =============================================================================== writer


class AlignedWriter:
    """Writes a stream of buffers to a fresh file in large page-aligned blocks, bypassing
    the page cache (``O_DIRECT``) where the file system allows it.

    Buffered writes cost the kernel a copy into the page cache and the page-cache
    allocations (under memory pressure more CPU than decoding), and the final ``fsync``
    of a freshly written large file then waits for all of it (measured: 119 MB/s for
    512 MiB buffered + fsync, 1.1 GB/s direct, on this project's build machine). A block
    is written by a background thread once it holds ``BLOCK`` bytes (its page-aligned
    prefix; the few bytes past the last page move to the next block) while the next one
    fills (two blocks), so the device's time overlaps the caller's coding; a write error
    surfaces on a later call or on :meth:`close`. Where ``O_DIRECT`` is refused (tmpfs,
    other systems) the plain file object is written instead. The caller closes (or
    aborts) this writer before the file.

    Data reaches a block either copied (:meth:`write`) or decoded straight into it:
    :meth:`reserve` hands out the next bytes of the block, :meth:`commit` takes them once
    filled, in order (``compress unpack``: no copy of the decoded bytes, no fresh buffer
    per chunk). With ``checksum`` the writer keeps the CRC-32 of every byte written, in
    file order, computed on its background thread just before each block is written
    (:attr:`crc`, final after :meth:`close`).
    """

    BLOCK = 8 << 20
    ALIGN = 4096
    SLACK = 4 << 20  # reservable past BLOCK: the chunks a few decoding threads hold in flight
    BUSY = object()  # :meth:`reserve`: commit the outstanding reservations first

    def __init__(self, f: BinaryIO, *, checksum: bool = False) -> None:
        self.f = f
        self.pos = 0  # bytes written (or being written) through the direct descriptor
        self.fill = 0  # bytes in the current block, committed
        self.crc = 0
        self._checksum = checksum
        self._reserved: list[tuple[int, int]] = []  # outstanding (offset in block, length)
        self._blocked = False  # a chunk was refused a reservation: it comes through write()
        self.fd: int | None = None
        self._pending: Future | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._spare: mmap.mmap | None = None
        flag = getattr(os, "O_DIRECT", 0)
        path = f"/proc/self/fd/{f.fileno()}"
        if flag and os.path.exists(path):
            try:
                self.fd = os.open(path, os.O_WRONLY | flag)
            except OSError:
                self.fd = None
        if self.fd is not None:
            # page-aligned, as O_DIRECT needs; room for the slack and the last block's padding
            self.capacity = self.BLOCK + self.SLACK
            self.block = mmap.mmap(-1, self.capacity + self.ALIGN)
            self.view = np.frombuffer(self.block, np.uint8)

    def _end(self) -> int:
        return self._reserved[-1][0] + self._reserved[-1][1] if self._reserved else self.fill

    def reserve(self, n: int) -> Any:
        """The next ``n`` bytes of the block to fill (a writable uint8 array), ``None`` when
        they cannot be had (plain writes, or more than a block's slack: pass the bytes to
        :meth:`write` instead, next in order), or :attr:`BUSY` while earlier reservations
        are outstanding and the block must be written first: commit those, then ask again.
        """
        if self.fd is None or self._blocked:
            return self.BUSY if self._blocked else None
        end = self._end()
        if end + n > self.capacity:
            if self._reserved:
                return self.BUSY
            if self.fill >= self.ALIGN:
                self._flush()
            if self.fd is None or self.fill + n > self.capacity:
                self._blocked = True
                return None
            end = self.fill
        self._reserved.append((end, n))
        return self.view[end : end + n]

    def commit(self, data: Any) -> None:
        """Take ``data``: the oldest outstanding reservation, filled (no copy), or any other
        buffer, copied as by :meth:`write`."""
        arr = data if isinstance(data, np.ndarray) else None
        if self._reserved and arr is not None and self.fd is not None:
            off, n = self._reserved[0]
            if arr.size == n and arr.__array_interface__["data"][0] == self.view[off:].__array_interface__["data"][0]:
                self._reserved.pop(0)
                self.fill = off + n
                if self.fill >= self.BLOCK and not self._reserved:
                    self._flush()
                return
        self.write(data if arr is None or arr.flags.c_contiguous else arr.tobytes())

    def write(self, data: Any) -> None:
        if self._reserved:
            raise RuntimeError("AlignedWriter.write with reservations outstanding")
        self._blocked = False
        if self.fd is None:
            self.f.write(data)
            if self._checksum:
                self.crc = C.crc32(data, self.crc)
            return
        src = np.frombuffer(data, np.uint8)
        p = 0
        while p < src.size:
            take = min(self.BLOCK - self.fill, src.size - p) if self.fill < self.BLOCK else 0
            self.view[self.fill : self.fill + take] = src[p : p + take]
            self.fill += take
            p += take
            if self.fill >= self.BLOCK:
                self._flush()
                if self.fd is None:  # fell back to plain writes
                    self.f.write(src[p:].data)
                    if self._checksum:
                        self.crc = C.crc32(src[p:].data, self.crc)
                    return

    def _pwrite(self, block: mmap.mmap, length: int, at: int, crc_len: int) -> None:
        assert self.fd is not None
        if self._checksum:
            self.crc = C.crc32(memoryview(block)[:crc_len], self.crc)
        done = 0
        with memoryview(block) as mv:
            while done < length:
                done += os.pwrite(self.fd, mv[done:length], at + done)

    def _flush(self) -> None:
        """Write the block's page-aligned prefix; the bytes past it start the next block."""
        if self.pos == 0:
            # the first block synchronously: a file system that takes O_DIRECT at open
            # but refuses the writes says so here, and the block is written plainly
            self._write_sync(self.fill - self.fill % self.ALIGN)
            return
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="czip-write")
            self._spare = mmap.mmap(-1, self.capacity + self.ALIGN)
        length = self.fill - self.fill % self.ALIGN
        self._pending = self._pool.submit(self._pwrite, self.block, length, self.pos, length)
        self._next_block(length)

    def _next_block(self, length: int) -> None:
        """Continue in the spare block, after moving the bytes past ``length`` into it."""
        assert self._spare is not None
        tail = self.fill - length
        spare = np.frombuffer(self._spare, np.uint8)
        spare[:tail] = self.view[length : self.fill]
        self.block, self._spare = self._spare, self.block
        self.view = spare
        self.pos += length
        self.fill = tail

    def _write_sync(self, length: int) -> None:
        """Write the block's first ``length`` bytes (a multiple of the alignment; the last
        block: ``fill`` rounded up, the padding cut off by :meth:`close`)."""
        crc_len = min(length, self.fill)
        try:
            self._pwrite(self.block, length, self.pos, crc_len)
        except OSError as err:
            if err.errno != errno.EINVAL or self.pos:
                raise
            self._close_direct()
            self.f.write(self.view[: self.fill].data)
            if self._checksum:  # _pwrite checksummed before failing: start over, plainly
                self.crc = C.crc32(self.view[: self.fill].data)
            self.pos += self.fill
            self.fill = 0
            return
        if crc_len < self.fill:  # the first block: its tail moves on to the next one
            if self._spare is None:
                self._spare = mmap.mmap(-1, self.capacity + self.ALIGN)
            self._next_block(length)
        else:
            self.pos += self.fill
            self.fill = 0

    def _wait(self) -> None:
        fut, self._pending = self._pending, None
        if fut is not None:
            fut.result()

    def _close_direct(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def close(self) -> None:
        """Write what is left (the last block padded to the alignment, then the file cut
        to its true length) and release the direct descriptor; idempotent."""
        if self.fd is None:
            return
        if self._reserved:
            raise RuntimeError("AlignedWriter.close with reservations outstanding")
        try:
            self._wait()
            if self.fill:
                end = self.pos + self.fill
                self._write_sync(-(-self.fill // self.ALIGN) * self.ALIGN)
                if self.fd is not None:
                    os.ftruncate(self.fd, end)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop without writing what is buffered (the file is being discarded)."""
        with contextlib.suppress(OSError):
            self._wait()
        self._close_direct()


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
        path: destination; written to a unique temp file beside it, renamed over it when
            :meth:`close` succeeds, removed on any failure.
        level: zstd level for every stream (``<= 3`` selects the tuned literal-oriented
            parameters, see :mod:`compress.lossless.codec`).
        chunk_size: raw bytes per chunk; chunks are coded independently and in parallel.
        threads: worker threads (``None``: all cores). zstd and numpy release the GIL.
        meta: JSON-able metadata stored in the manifest.

    Raises:
        OutputError: the destination cannot be written (names it; free space when full).
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
        self.level = level
        self.chunk_size = chunk_size
        self.threads = _default_threads(threads)
        self.meta: dict[str, Any] = dict(meta or {})
        self.entries: list[dict[str, Any]] = []
        self.stats: list[EntryStats] = []
        self._names: dict[str, dict[str, Any]] = {}
        self._f: BinaryIO | None = None
        self._f, self.tmp = open_temp(self.path)
        self._out = AlignedWriter(self._f)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._pos = 0
        self._closed = False
        self._write(HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, 0))

    # -- plumbing
    def _write(self, data: bytes | memoryview) -> None:
        assert self._f is not None
        try:
            self._out.write(data)
        except OSError as err:
            raise OutputError(describe_os_error(self.path, err, self._pos + len(data))) from None
        self._pos += len(data)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the partial file (also when closing it fails, e.g. a full disk)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._out.abort()
        f, self._f = self._f, None
        discard_temp(f, self.tmp)
        self._closed = True

    def _check_name(self, name: str) -> None:
        if self._closed:
            raise RuntimeError("container writer is closed")
        if not isinstance(name, str) or not name or len(name.encode()) > MAX_NAME_BYTES or "\x00" in name:
            raise InputError(f"entry name must be a non-empty string of at most {MAX_NAME_BYTES} bytes without NUL")
        if name in self._names:
            raise InputError(f"duplicate entry name {name!r}")

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
        *,
        coded: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> EntryStats:
        item = C.itemsize(dtype)
        numel = _numel(shape)
        expect = numel if coded is None else coded
        chunks: list[list[Any]] = []
        seen = 0
        stored = 0
        for enc in self._code_chunks(layout, pieces):
            seen += enc.n
            if seen > expect:  # checked as data arrives: a lying source cannot fill the disk
                raise InputError(f"entry {name!r}: more than the {expect} elements its shape {shape} holds")
            streams = []
            for s in enc.streams:
                streams.append([len(s.payload), s.raw_len, s.method])
                self._write(s.payload)
                stored += len(s.payload)
            chunks.append([enc.n, enc.crc, streams])
        if seen != expect:
            raise InputError(f"entry {name!r}: got {seen} elements, shape {shape} needs {expect}")
        entry: dict[str, Any] = {"name": name, "kind": kind, "dtype": dtype, "shape": shape, "layout": layout}
        entry.update(extra or {})
        entry["chunks"] = chunks
        if meta:
            entry["meta"] = meta
        self.entries.append(entry)
        self._names[name] = entry
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
        mask: str | None = None,
    ) -> EntryStats:
        """Add an in-memory array (read only, never modified).

        Args:
            name: unique entry name.
            array: the tensor; bfloat16 as a uint16 (or int16) array with ``dtype="bfloat16"``.
            dtype: codec dtype name (default: from ``array.dtype``).
            layout: override the dtype's default layout (``"i4"`` for int8 codes in -8..7,
                ``"u4"`` for uint8 codes below 16).
            meta: JSON-able per-entry metadata.
            mask: name of an earlier ``bool`` entry with as many elements. Only the
                elements where the mask is set are coded; the others must all hold one
                value (stored as ``fill``). If they do not, the tensor is stored whole.
        """
        dtype = dtype or np.dtype(array.dtype).name
        layout = self._resolve(name, dtype, layout)
        flat = np.ascontiguousarray(array).reshape(-1).view(C.numpy_view_dtype(dtype))
        shape = [int(d) for d in array.shape]
        extra: dict[str, Any] | None = None
        if mask is not None:
            keep = self._mask_bits(name, mask, flat.size)
            if keep is not None:
                rest = flat[~keep]
                fill = rest[:1].view(np.uint8)
                if rest.size == 0 or np.all(rest == rest[0]):
                    extra = {"mask": mask, "fill": fill.tobytes().hex() if rest.size else "00" * flat.itemsize}
                    flat = flat[keep]
        step = C.chunk_elements(dtype, layout, self.chunk_size)
        pieces = (flat[i : i + step] for i in range(0, flat.size, step))
        return self._add(
            name, "tensor", dtype, shape, layout, pieces, meta, coded=flat.size if extra else None, extra=extra
        )

    def _mask_bits(self, name: str, mask: str, numel: int) -> np.ndarray | None:
        m = self._names.get(mask)
        if m is None or m.get("dtype") != "bool" or m.get("kind") != "tensor" or "mask" in m:
            raise InputError(f"entry {name!r}: mask {mask!r} is not an earlier bool tensor entry")
        if _numel(m["shape"]) != numel:
            raise InputError(f"entry {name!r}: mask {mask!r} has {_numel(m['shape'])} elements, tensor {numel}")
        bits = m.get("_bits")
        return None if bits is None else bits

    def add_mask(self, name: str, mask: np.ndarray, *, meta: dict[str, Any] | None = None) -> EntryStats:
        """Add a bool tensor that later :meth:`add_tensor` calls may name as ``mask``."""
        arr = np.ascontiguousarray(mask)
        if arr.dtype != np.bool_:
            raise InputError(f"entry {name!r}: a mask must be a bool array, got {arr.dtype}")
        st = self.add_tensor(name, arr, meta=meta)
        self._names[name]["_bits"] = arr.reshape(-1).copy()
        return st

    def add_alias(self, name: str, target: str, *, meta: dict[str, Any] | None = None) -> EntryStats:
        """Add ``name`` as the same tensor as the earlier entry ``target`` (stored once).

        Readers return the same bytes for both; the lossless stage restores tied weights
        as one shared tensor.
        """
        self._check_name(name)
        t = self._names.get(target)
        if t is None or t["kind"] != "tensor":
            raise InputError(f"alias {name!r}: {target!r} is not an earlier tensor entry")
        entry: dict[str, Any] = {"name": name, "kind": "alias", "of": target}
        if meta:
            entry["meta"] = meta
        self.entries.append(entry)
        self._names[name] = entry
        st = EntryStats(name, "alias", t["dtype"], _numel(t["shape"]) * C.itemsize(t["dtype"]), 0)
        self.stats.append(st)
        return st

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
            # Whole chunks inside an immutable piece (``bytes``, as files are read) are
            # passed on as views, without a copy; the rest is gathered into fresh chunk
            # buffers, which the worker threads then own.
            buf = np.empty(step_bytes, np.uint8)
            fill = 0
            for piece in chunks:
                src = (
                    np.frombuffer(piece, np.uint8)
                    if not isinstance(piece, np.ndarray)
                    else piece.reshape(-1).view(np.uint8)
                )
                pos = 0
                if isinstance(piece, bytes):
                    while fill == 0 and src.size - pos >= step_bytes:
                        yield src[pos : pos + step_bytes].view(vdt)
                        pos += step_bytes
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
            arr = np.frombuffer(data, np.uint8)
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

    def manifest_bytes(self) -> tuple[bytes, int]:
        """The stored (zstd) manifest and its decoded length."""
        entries = [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.entries]
        manifest = {"format": "czip", "version": [VERSION_MAJOR, VERSION_MINOR], "meta": self.meta, "entries": entries}
        body = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
        if len(body) > MAX_MANIFEST_BYTES:
            raise InputError(
                f"manifest of {len(body)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit; use a larger chunk_size"
            )
        # small manifests (most models) get zstd's strongest level; big ones a fast one
        level = 19 if len(body) <= 1 << 20 else 3
        return zstandard.ZstdCompressor(level=level).compress(body), len(body)

    def close(self) -> Path:
        """Write manifest and trailer, then atomically move the file into place."""
        if self._closed:
            return self.path
        try:
            stored, raw_len = self.manifest_bytes()
            offset = self._pos
            self._write(stored)
            digest = hashlib.sha256(HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, 0) + stored).digest()
            self._write(TRAILER.pack(offset, len(stored), zlib.crc32(stored), raw_len, digest, END_MAGIC))
            try:
                self._out.close()
            except OSError as err:
                raise OutputError(describe_os_error(self.path, err, self._pos)) from None
            f, self._f = self._f, None
            assert f is not None
            publish_temp(f, self.tmp, self.path, self._pos)
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
    """A validated manifest entry (an alias is resolved to its target's data)."""

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    nbytes: int
    chunks: list[tuple[int, int, list[tuple[int, int, int, int]]]]  # (n, crc, [(off, len, raw, method)])
    meta: dict[str, Any] = field(default_factory=dict)
    alias_of: str | None = None
    mask: str | None = None
    fill: bytes = b""

    @property
    def stored_bytes(self) -> int:
        if self.alias_of is not None:
            return 0
        return sum(s[1] for _, _, streams in self.chunks for s in streams)

    @property
    def coded_elements(self) -> int:
        return sum(n for n, _, _ in self.chunks)


class ContainerReader:
    """Random-access reader of a ``.czip`` file.

    Opening reads and validates only the trailer and the manifest (and checks the
    trailer's SHA-256 over them); each tensor is read and checked on demand. Every failure
    is a :class:`CorruptArchiveError` naming the file and, when the damage is inside a
    chunk, the entry and chunk.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._range_cache: tuple[str, int, np.ndarray] | None = None
        try:
            self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        except IsADirectoryError:
            raise InputError(f"{self.path} is a directory, not a container") from None
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
        head = f.read(HEADER_SIZE)
        magic, major, minor, flags = HEADER.unpack(head)
        if magic != MAGIC:
            raise self._err("not a czip container (bad magic)")
        if major not in READ_MAJORS:
            raise self._err(
                f"container format version {major}.{minor} is not supported (this reader: "
                + " and ".join(f"{m}.x" for m in READ_MAJORS)
                + ")"
                + (
                    "; it was written by an older compress: unpack it with that version and re-pack"
                    if major < min(READ_MAJORS)
                    else ""
                )
            )
        if flags != 0:
            raise self._err(f"unknown header flags {flags:#x}")
        self.major = major
        f.seek(size - TRAILER_SIZE)
        m_off, m_len, m_crc, m_raw, digest, end = TRAILER.unpack(f.read(TRAILER_SIZE))
        if end != END_MAGIC:
            raise self._err("truncated or damaged (bad end marker)")
        self.data_end = size - TRAILER_SIZE
        if m_len > MAX_MANIFEST_STORED or m_raw > MAX_MANIFEST_BYTES:
            raise self._err(f"manifest larger than the {MAX_MANIFEST_BYTES >> 20} MiB limit")
        if m_off < HEADER_SIZE or m_off + m_len != self.data_end:
            raise self._err("truncated or damaged (manifest location out of bounds)")
        self.digest = digest
        self.manifest_offset = m_off
        f.seek(m_off)
        stored = f.read(m_len)
        if len(stored) != m_len or zlib.crc32(stored) != m_crc:
            raise self._err("manifest checksum mismatch")
        if hashlib.sha256(head + stored).digest() != digest:
            raise self._err("SHA-256 of header and manifest does not match the trailer")
        try:
            if zstandard.frame_content_size(stored) != m_raw:
                raise ValueError("size")
            body = zstandard.ZstdDecompressor().decompress(stored, max_output_size=m_raw)
            if len(body) != m_raw:
                raise ValueError("size")
            manifest = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError, UnicodeDecodeError, zstandard.ZstdError) as err:
            raise self._err(f"manifest is not valid compressed JSON ({type(err).__name__})") from None
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
        pos = HEADER_SIZE  # payloads are back to back in manifest order
        for i, e in enumerate(entries):
            entry, pos = self._validate_entry(i, e, pos)
            if entry.name in self.entries:
                raise self._err(f"duplicate entry name {entry.name!r}")
            self.entries[entry.name] = entry
        if pos != self.manifest_offset:
            raise self._err(f"payloads end at {pos}, the manifest starts at {self.manifest_offset}")

    def _validate_entry(self, i: int, e: Any, pos: int) -> tuple[Entry, int]:
        if not isinstance(e, dict):
            raise self._err(f"entry #{i} is not an object")
        name = e.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_BYTES or "\x00" in name:
            raise self._err(f"entry #{i} has no valid name")
        where = f"entry {name!r}"
        kind = e.get("kind")
        meta = e.get("meta", {})
        if not isinstance(meta, dict):
            raise self._err(f"{where}: meta must be an object")
        if kind == "alias":
            of = e.get("of")
            target = self.entries.get(of) if isinstance(of, str) else None
            if target is None or target.kind != "tensor":
                raise self._err(f"{where}: alias of a missing or non-tensor entry")
            return Entry(
                name,
                "alias",
                target.dtype,
                target.shape,
                target.layout,
                target.nbytes,
                target.chunks,
                meta,
                alias_of=target.name,
                mask=target.mask,
                fill=target.fill,
            ), pos
        dtype, layout = e.get("dtype"), e.get("layout")
        if kind not in ("tensor", "blob"):
            raise self._err(f"{where}: unknown kind {kind!r}")
        if (
            not isinstance(dtype, str)
            or not isinstance(layout, str)
            or dtype not in C.DTYPES
            or layout not in C.ALLOWED_LAYOUTS[dtype]
        ):
            raise self._err(f"{where}: unsupported dtype/layout {dtype!r}/{layout!r}")
        shape = e.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(_is_int(d) and 0 <= d < 2**40 for d in shape)
        ):
            raise self._err(f"{where}: invalid shape")
        numel = _numel(shape)
        item = C.itemsize(dtype)
        expect_total = numel
        mask_name, fill = e.get("mask"), b""
        if mask_name is not None:
            m = self.entries.get(mask_name) if isinstance(mask_name, str) else None
            if m is None or m.dtype != "bool" or m.mask is not None or m.kind != "tensor" or _numel(m.shape) != numel:
                raise self._err(f"{where}: mask {mask_name!r} is not an earlier bool tensor of {numel} elements")
            try:
                fill = bytes.fromhex(e.get("fill"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                fill = b""
            if len(fill) != item:
                raise self._err(f"{where}: invalid fill value")
            expect_total = -1  # the mask's popcount, checked on decode
        raw_chunks = e.get("chunks")
        if not isinstance(raw_chunks, list):
            raise self._err(f"{where}: chunks must be a list")
        n_streams = C.LAYOUTS[layout]
        chunks = []
        total = 0
        for ci, ch in enumerate(raw_chunks):
            cw = f"{where} chunk {ci}"
            if not (
                isinstance(ch, list) and len(ch) == 3 and _is_int(ch[0]) and _is_int(ch[1]) and isinstance(ch[2], list)
            ):
                raise self._err(f"{cw}: malformed")
            n, crc, streams = ch
            sparse = layout in C.FLOAT_LAYOUTS and len(streams) == n_streams + 1
            paired = layout == "bytes" and dtype == "int8" and len(streams) == 2
            if (
                n <= 0
                or n * item > MAX_CHUNK_RAW_BYTES
                or not (len(streams) == n_streams or sparse or paired)
                or not 0 <= crc < 2**32
            ):
                raise self._err(f"{cw}: invalid element count, stream count or checksum")
            expect = C.stream_sizes(layout, n, item)
            if sparse or paired:
                # sparse: mask, then the non-zero elements' streams (k <= n each); paired:
                # the packed code pairs, then k/5 escaped codes and their uint32 positions
                k = streams[1][1] if isinstance(streams[1], list) and len(streams[1]) == 3 else -1
                if not (_is_int(k) and 0 <= k <= n) if sparse else not (_is_int(k) and 0 <= k <= 5 * n and k % 5 == 0):
                    raise self._err(f"{cw}: invalid {'sparse' if sparse else 'paired'} chunk")
                expect = [(n + 7) // 8] + C.stream_sizes(layout, k, item) if sparse else [(n + 1) // 2, k]
            checked = []
            for si, s in enumerate(streams):
                if not (isinstance(s, list) and len(s) == 3 and all(_is_int(v) for v in s)):
                    raise self._err(f"{cw} stream {si}: malformed")
                length, raw_len, method = s
                if method not in METHODS_BY_MAJOR[self.major] or raw_len != expect[si] or length < 0:
                    raise self._err(f"{cw} stream {si}: invalid method or size")
                if pos + length > self.manifest_offset:
                    raise self._err(f"{cw} stream {si}: payload lies outside the data region")
                impossible = (
                    (method == C.METHOD_RAW and length != raw_len)
                    or (method == C.METHOD_ZSTD and not C.max_ratio_ok(raw_len, length))
                    or (method in (C.METHOD_ANS, C.METHOD_ANS_EXACT) and raw_len > C.ANS_MAX_BYTES)
                )
                if impossible:
                    raise self._err(f"{cw} stream {si}: declared size impossible for its payload")
                checked.append((pos, length, raw_len, method))
                pos += length
            total += n
            chunks.append((n, crc, checked))
        if expect_total >= 0 and total != expect_total:
            raise self._err(f"{where}: chunks hold {total} elements, shape needs {numel}")
        if total > numel:
            raise self._err(f"{where}: chunks hold more elements than its shape")
        entry = Entry(name, kind, dtype, tuple(shape), layout, numel * item, chunks, meta, mask=mask_name, fill=fill)
        return entry, pos

    # -- access
    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise InputError(f"{self.path}: no entry {name!r}") from None

    def _read_chunk_payload(
        self, where: str, n_crc_streams: tuple[int, int, list]
    ) -> list[tuple[int, memoryview, int]]:
        """One read for a chunk's payloads (they are contiguous), CRC-checked."""
        _, crc, streams = n_crc_streams
        if not streams:
            return []
        off = streams[0][0]
        total = sum(s[1] for s in streams)
        self._f.seek(off)
        data = self._f.read(total)
        if len(data) != total:
            raise self._err(f"{where}: short read at offset {off}")
        if C.crc32(data) != crc:
            raise self._err(f"{where}: checksum mismatch")
        out = []
        view = memoryview(data)
        p = 0
        for _, length, raw_len, method in streams:
            out.append((method, view[p : p + length], raw_len))
            p += length
        return out

    def iter_chunks(
        self,
        name: str,
        threads: int | None = 1,
        out: np.ndarray | None = None,
        into: Callable[[int], Any] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield the decoded raw bytes of each chunk of ``name`` in order (bounded memory).

        With ``out`` (uint8, the entry's ``nbytes``) each chunk is decoded into its slice.
        With ``into`` (:meth:`AlignedWriter.reserve`), each chunk is decoded into the array
        ``into(nbytes)`` returns, asked in chunk order before the chunk is decoded; on
        ``None`` into a buffer of its own; on :attr:`AlignedWriter.BUSY` the chunks in
        flight are yielded first (the caller commits them) and it is asked again.
        A masked entry yields the coded (unmasked) elements only; use :meth:`read_bytes`.
        At most :data:`DECODE_WINDOW_BYTES` of decoded chunks are in flight.
        """
        e = self.entry(name)
        item = C.itemsize(e.dtype)
        nthreads = _default_threads(threads)
        starts = [0]
        for n, _, _ in e.chunks:
            starts.append(starts[-1] + n * item)

        def target(ci: int) -> Any:
            return into(starts[ci + 1] - starts[ci]) if into is not None else None

        def decode(ci: int, streams: list[tuple[int, Any, int]], dest: np.ndarray | None = None) -> np.ndarray:
            n = e.chunks[ci][0]
            view = out[starts[ci] : starts[ci + 1]] if out is not None else dest
            try:
                got = C.decode_chunk(e.layout, n, item, streams, view)
            except ValueError as err:
                raise self._err(f"entry {name!r} chunk {ci}: {err}") from None
            if view is not None and got.__array_interface__["data"][0] != view.__array_interface__["data"][0]:
                view[:] = got
                return view
            return got

        def load(ci: int) -> list[tuple[int, Any, int]]:
            return self._read_chunk_payload(f"entry {name!r} chunk {ci}", e.chunks[ci])

        if nthreads <= 1 or len(e.chunks) <= 1:
            # One decoding thread. With many chunks, the next chunk's payload is read (and
            # its CRC checked) on a helper thread while this one decodes: the file read is
            # a kernel copy plus a CRC pass, 8% of a whole-process unpack's CPU, and like
            # the writer's thread on the output side it overlaps the decoding.
            ahead = ThreadPoolExecutor(1, thread_name_prefix="czip-read") if len(e.chunks) >= 4 else None
            try:
                nxt = ahead.submit(load, 0) if ahead is not None else None
                for ci in range(len(e.chunks)):
                    dest = target(ci)  # nothing is in flight here: never BUSY after the last commit
                    if dest is AlignedWriter.BUSY:
                        raise RuntimeError("iter_chunks: the destination is busy with no chunk in flight")
                    if ahead is not None and nxt is not None:
                        streams = nxt.result()
                        nxt = ahead.submit(load, ci + 1) if ci + 1 < len(e.chunks) else None
                    else:
                        streams = load(ci)
                    yield decode(ci, streams, dest)
            finally:
                if ahead is not None:
                    ahead.shutdown(wait=True)
            return
        # File reads stay on this thread; decoding (GIL released in zstd and numpy) runs in
        # a pool. The window is bounded by decoded bytes, not chunk counts, so memory does
        # not grow with the core count or the chunk size a file declares.
        with ThreadPoolExecutor(nthreads) as pool:
            window: list[tuple[Future, int]] = []
            in_flight = 0
            for ci in range(len(e.chunks)):
                size = e.chunks[ci][0] * item
                while window and (len(window) >= 2 * nthreads or in_flight + size > DECODE_WINDOW_BYTES):
                    fut, s = window.pop(0)
                    in_flight -= s
                    yield fut.result()
                dest = target(ci)
                while dest is AlignedWriter.BUSY:
                    if not window:
                        raise RuntimeError("iter_chunks: the destination is busy with no chunk in flight")
                    fut, s = window.pop(0)
                    in_flight -= s
                    yield fut.result()
                    dest = target(ci)
                window.append((pool.submit(decode, ci, load(ci), dest), size))
                in_flight += size
            for fut, _ in window:
                yield fut.result()

    def iter_range(self, name: str, start: int, length: int) -> Iterator[np.ndarray]:
        """Yield the bytes ``[start, start + length)`` of an unmasked entry, chunk by chunk
        (only the chunks that overlap the range are decoded; nothing is materialised whole)."""
        e = self.entry(name)
        if e.mask is not None:
            raise InputError(f"{self.path}: entry {name!r} is masked; read it whole")
        item = C.itemsize(e.dtype)
        end = start + length
        pos = 0
        for ci, ch in enumerate(e.chunks):
            size = ch[0] * item
            if pos + size > start and pos < end:
                # consecutive segments of a skeleton blob mostly fall in one chunk: keep the
                # last decoded chunk (one chunk of memory) instead of decoding it again
                cached = self._range_cache
                if cached is not None and cached[0] == name and cached[1] == ci:
                    data = cached[2]
                else:
                    streams = self._read_chunk_payload(f"entry {name!r} chunk {ci}", ch)
                    try:
                        data = C.decode_chunk(e.layout, ch[0], item, streams)
                    except ValueError as err:
                        raise self._err(f"entry {name!r} chunk {ci}: {err}") from None
                    self._range_cache = (name, ci, data)
                yield data[max(start - pos, 0) : min(end - pos, size)]
            pos += size
            if pos >= end:
                break

    def read_bytes(self, name: str, threads: int | None = None) -> np.ndarray:
        """The entry's raw bytes as one uint8 array (masked entries scattered back)."""
        e = self.entry(name)
        if e.mask is None:
            out = np.empty(e.nbytes, np.uint8)
            for _ in self.iter_chunks(name, threads, out=out):
                pass
            return out
        keep = self.read_bytes(e.mask).view(np.uint8) != 0
        k = int(np.count_nonzero(keep))
        if k != e.coded_elements:
            raise self._err(f"entry {name!r}: mask {e.mask!r} selects {k} elements, {e.coded_elements} are stored")
        item = C.itemsize(e.dtype)
        values = np.empty(k * item, np.uint8)
        for _ in self.iter_chunks(name, threads, out=values):
            pass
        vdt = np.dtype(f"V{item}")
        full = np.empty(keep.size, vdt)
        full[...] = np.frombuffer(e.fill, vdt)[0]
        full[keep] = values.view(vdt)
        return full.view(np.uint8)

    def read_tensor(self, name: str, threads: int | None = None) -> np.ndarray:
        """Decode one tensor (other entries are not touched). bfloat16 comes back as uint16."""
        e = self.entry(name)
        return self.read_bytes(name, threads).view(C.numpy_view_dtype(e.dtype)).reshape(e.shape)

    def read_blob(self, name: str) -> bytes:
        return self.read_bytes(name).tobytes()

    def verify(self) -> None:
        """Decode every chunk of every entry (CRC and sizes), and every masked entry whole.

        The header and manifest were checked against the trailer's SHA-256 on open.
        """
        for name, e in self.entries.items():
            if e.alias_of is not None:
                continue
            if e.mask is not None:
                self.read_bytes(name, threads=1)
                continue
            for _ in self.iter_chunks(name):
                pass
