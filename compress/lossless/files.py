"""Pack and unpack model files byte-identically.

Every supported format reduces to one idea: a file is a *skeleton* (headers, graph,
pickles) with *typed regions* (the tensors' raw bytes) cut into it. Each region is coded
with its dtype's layout; the skeleton bytes between regions are kept verbatim as blobs.
Unpacking writes skeleton and regions back in file order, so the output is the original
byte for byte - no re-serialisation is involved - and the CRC-32 of the original (stored
in the manifest; a SHA-256 in older containers) is checked while writing.

* ``.safetensors`` - regions from the header's ``data_offsets`` (header kept verbatim).
* ``.onnx`` - regions are the ``raw_data`` fields of initializers and of tensor
  attributes (e.g. ``Constant``), found by walking the protobuf wire format directly.
  A model over 2 GB keeps its weights in an external-data file beside it: that file is
  packed into the same container, typed from the tensors that refer to it, and restored
  beside the model (``_pack_external_data``).
* ``.pt`` / ``.pth`` - torch.save zip archives: regions are the stored (uncompressed)
  ``data/<key>`` records, typed from the pickle's storage types (read without executing
  it). Restoration is byte-identical, not merely an equivalent state_dict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import pickle
import re
import struct
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

import numpy as np

from compress.errors import InputError
from compress.lossless import codec as C
from compress.lossless.container import (
    AlignedWriter,
    ContainerReader,
    ContainerWriter,
    CorruptArchiveError,
    EntryStats,
)

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = {".safetensors": "safetensors", ".onnx": "onnx", ".pt": "torch", ".pth": "torch"}
READ_PIECE = 4 << 20  # bytes read from the source per I/O call
SKELETON_FLUSH = 16 << 20  # skeleton bytes buffered before they are written as a blob
C_MAX_NAME = 1024  # entry names are cut to this many characters (labels are informative only)


@dataclass(frozen=True)
class Region:
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    label: str


@dataclass
class PackReport:
    """What :func:`pack_file` did."""

    src: Path
    dst: Path
    format: str
    src_bytes: int
    packed_bytes: int
    seconds: float
    n_regions: int
    entries: list[EntryStats] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Packed size over original size (smaller is better)."""
        return self.packed_bytes / self.src_bytes if self.src_bytes else 1.0

    @property
    def mb_per_s(self) -> float:
        return self.src_bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def detect_format(path: Path) -> str:
    fmt = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    return fmt


# ============================================================================ safetensors

_ST_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    # BOOL stays as plain bytes: a file may hold byte values other than 0/1 there.
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _safetensors_regions(path: Path, f: BinaryIO, size: int) -> list[Region]:
    head = f.read(8)
    if len(head) != 8:
        raise InputError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n > 100 << 20 or 8 + n > size:
        raise InputError(f"{path}: not a safetensors file (header length {n} out of range)")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as err:
        raise InputError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not an object)")
    base = 8 + n
    regions = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            st_dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry") from None
        regions.append(Region(base + begin, end - begin, _ST_DTYPES.get(st_dtype, "uint8"), shape, name))
    return regions


# =================================================================================== onnx


def _varint(buf: memoryview | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or varint value) of a message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fno, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos, end)
            yield fno, wt, val, val
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("length-delimited field runs past its message")
            yield fno, wt, pos, pos + n
            pos += n
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > end:
            raise ValueError("field runs past its message")


_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
    17: "float8_e4m3fn",
    19: "float8_e5m2",
}


def _onnx_tensor(buf: mmap.mmap, start: int, end: int, out: list[Region]) -> None:
    dims: list[int] = []
    dtype = 0
    name = ""
    raw: tuple[int, int] | None = None
    for fno, wt, a, b in _fields(buf, start, end):
        if fno == 1 and wt == 0:
            dims.append(a)
        elif fno == 1 and wt == 2:  # packed dims
            pos = a
            while pos < b:
                v, pos = _varint(buf, pos, b)
                dims.append(v)
        elif fno == 2 and wt == 0:
            dtype = a
        elif fno == 8 and wt == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif fno == 9 and wt == 2:
            raw = (a, b)
    if raw is not None and raw[1] > raw[0]:
        out.append(Region(raw[0], raw[1] - raw[0], _ONNX_DTYPES.get(dtype, "uint8"), tuple(dims), name or "tensor"))


def _onnx_graph(buf: mmap.mmap, start: int, end: int, out: list[Region], depth: int) -> None:
    if depth > 32:
        raise ValueError("subgraphs nest too deep")
    for fno, wt, a, b in _fields(buf, start, end):
        if wt != 2:
            continue
        if fno == 5:  # initializer
            _onnx_tensor(buf, a, b, out)
        elif fno == 1:  # node -> attributes
            for afno, awt, aa, ab in _fields(buf, a, b):
                if afno != 5 or awt != 2:
                    continue
                for tfno, twt, ta, tb in _fields(buf, aa, ab):
                    if twt != 2:
                        continue
                    if tfno in (5, 10):  # t, tensors
                        _onnx_tensor(buf, ta, tb, out)
                    elif tfno in (6, 11):  # g, graphs
                        _onnx_graph(buf, ta, tb, out, depth + 1)


def _onnx_regions(path: Path, f: BinaryIO, size: int) -> list[Region]:
    if size == 0:
        raise InputError(f"{path}: not an ONNX model (empty file)")
    regions: list[Region] = []
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            saw_graph = False
            for fno, wt, a, b in _fields(buf, 0, size):
                if fno == 7 and wt == 2:
                    saw_graph = True
                    _onnx_graph(buf, a, b, regions, 0)
            if not saw_graph:
                raise ValueError("no graph field")
        except (ValueError, IndexError) as err:
            raise InputError(f"{path}: not a valid ONNX model ({err})") from None
    return regions


# ================================================================================= torch


_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "ShortStorage": "int16",
    "IntStorage": "int32",
    "LongStorage": "int64",
}


class _Stub:
    """Stands for any global in a pickle; calling or building it does nothing."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, value: Any) -> None:
        pass


class _StorageLister(pickle.Unpickler):
    """Reads a torch pickle's storage records without importing or calling anything."""

    def __init__(self, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.storages: dict[str, str] = {}

    def find_class(self, module: str, name: str) -> Any:
        return _Stub(name)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
            stype, key = pid[1], str(pid[2])
            self.storages[key] = _STORAGE_DTYPES.get(getattr(stype, "name", ""), "uint8")
        return _Stub()


def _torch_regions(path: Path, f: BinaryIO, size: int) -> list[Region]:
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
        pkl = next((i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"), None)
        if pkl is None or pkl.file_size > 256 << 20:
            raise ValueError("no data.pkl record")
        lister = _StorageLister(zf.read(pkl))
        try:
            lister.load()
        except Exception as err:
            log.debug("%s: pickle not fully read (%s); untyped storages stay bytes", path, err)
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise InputError(f"{path}: not a torch.save zip archive ({err}); legacy pickles are not supported") from None
    regions = []
    pattern = re.compile(r"(?:^|/)data/(\d+)$")
    for info in infos:
        m = pattern.search(info.filename)
        if not m or info.compress_type != zipfile.ZIP_STORED or info.file_size == 0:
            continue
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            continue
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        dtype = lister.storages.get(m.group(1), "uint8")
        item = C.itemsize(dtype)
        regions.append(Region(start, info.file_size, dtype, (info.file_size // item,), info.filename))
    return regions


# ============================================================================ pack/unpack


def _clean_regions(regions: list[Region], size: int, path: Path) -> list[Region]:
    """Sort, drop impossible regions, and retype ones whose size does not match their dtype."""
    out: list[Region] = []
    pos = 0
    for r in sorted(regions, key=lambda r: r.offset):
        if r.length <= 0 or r.offset < pos or r.offset + r.length > size:
            log.warning("%s: region %r overlaps or lies outside the file; kept as plain bytes", path, r.label)
            continue
        numel = 1
        for d in r.shape:
            numel *= d
        if numel * C.itemsize(r.dtype) != r.length:
            r = Region(r.offset, r.length, "uint8", (r.length,), r.label)
        out.append(r)
        pos = r.offset + r.length
    return out


class _Pipeline:
    """Runs ``consume(item)`` on a background thread, in order, behind a short queue.

    Writing (and checksumming) then overlaps reading and decoding: file writes release
    the GIL for large buffers. An error in ``consume`` is raised by the
    next :meth:`put` or by :meth:`close`. Items must not be modified after ``put``.
    """

    def __init__(self, consume: Any, depth: int = 4) -> None:
        import queue
        import threading

        self._consume = consume
        self._q: queue.Queue = queue.Queue(depth)
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="czip-pipeline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._err is None:
                try:
                    self._consume(item)
                except BaseException as err:
                    self._err = err

    def put(self, item: Any) -> None:
        if self._err is not None:
            raise self._err
        self._q.put(item)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._err is not None:
            raise self._err


class _SourceCheck:
    """The whole-file check of a packed file: zlib's CRC-32 of every byte, in file order.

    ISA-L computes it at several GB/s, beside a SHA-256 at about 1.5 GB/s that cost as
    much CPU as decoding bf16 weights (whole-process unpack ran at a quarter of the
    codec's speed). Each chunk's payload already carries its own CRC-32 (storage damage);
    this one catches a restored file that differs from the original (a wrong segment
    plan or a codec fault). Containers written before it hold a SHA-256, still checked.
    """

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = C.crc32(data, self.value)


def _read_range(f: BinaryIO, start: int, length: int, hasher: Any) -> Iterator[bytes]:
    f.seek(start)
    left = length
    while left:
        piece = f.read(min(left, READ_PIECE))
        if not piece:
            raise InputError(f"source file shrank while reading (offset {start + length - left})")
        hasher.update(piece)
        left -= len(piece)
        yield piece


def _pack_segments(
    w: ContainerWriter, f: BinaryIO, regions: list[Region], size: int, hasher: _SourceCheck, prefix: str = ""
) -> list[list[Any]]:
    """Code one file of ``size`` bytes into ``w``; return the segments that rebuild it.

    Each region becomes a tensor entry ``<prefix>t/<i>/<label>``; the bytes between
    regions are gathered into blobs ``<prefix>skeleton/<k>`` of at most
    ``SKELETON_FLUSH`` bytes, and a gap at least that long is a blob of its own,
    ``<prefix>gap/<offset>``, streamed. Every byte is read once, in file order, and
    passes through ``hasher``. Used for model files (no prefix) and for ONNX external
    data files (``external/<i>/``); :func:`_restore_segments` is the inverse.
    """
    segments: list[list[Any]] = []
    skel = bytearray()
    skel_count = 0

    def flush_skeleton() -> None:
        nonlocal skel, skel_count
        if skel:
            w.add_blob(f"{prefix}skeleton/{skel_count}", bytes(skel))
            skel_count += 1
            skel = bytearray()

    def add_gap(start: int, length: int) -> None:
        nonlocal skel
        if length <= 0:
            return
        if length >= SKELETON_FLUSH:
            flush_skeleton()
            name = f"{prefix}gap/{start}"
            w.add_blob(name, _read_range(f, start, length, hasher), size=length)
            segments.append(["b", name, 0, length])
            return
        if len(skel) + length > SKELETON_FLUSH:
            flush_skeleton()
        segments.append(["b", f"{prefix}skeleton/{skel_count}", len(skel), length])
        for piece in _read_range(f, start, length, hasher):
            skel += piece

    pos = 0
    for i, r in enumerate(regions):
        add_gap(pos, r.offset - pos)
        name = f"{prefix}t/{i}/{r.label}"[:C_MAX_NAME]
        w.add_tensor_chunks(name, r.dtype, r.shape, _read_range(f, r.offset, r.length, hasher), meta={"label": r.label})
        segments.append(["t", name, 0, r.length])
        pos = r.offset + r.length
    add_gap(pos, size - pos)
    flush_skeleton()
    return segments


def pack_file(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    level: int = C.DEFAULT_LEVEL,
    chunk_size: int = C.DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    extra_meta: dict[str, Any] | None = None,
    force: bool = True,
) -> PackReport:
    """Pack a model file into a ``.czip`` container (memory stays at a few chunks).

    Args:
        src: a ``.safetensors``, ``.onnx``, ``.pt`` or ``.pth`` file.
        dst: output path (default: ``src`` + ``.czip``).
        level: zstd level (1-22). chunk_size: raw bytes per chunk. threads: None = all cores.
        extra_tensors: more arrays to store beside the file, as entries ``extra/<name>``
            (a device bundle's reference inputs and outputs); ``unpack_file`` ignores them.
        extra_meta: JSON stored as the manifest's ``meta["extra"]``.
        force: replace an existing ``dst`` (otherwise refused before any work).

    Raises:
        InputError: missing file, unsupported type or a file that does not parse.
    """
    src = Path(src)
    if src.is_dir():
        raise InputError(f"{src} is a directory, not a model file")
    if not src.is_file():
        raise InputError(f"{src}: no such file")
    fmt = detect_format(src)
    dst = Path(dst) if dst is not None else src.with_name(src.name + ".czip")
    from compress.artifacts import check_output_path

    check_output_path(dst, force=force, sources=(src,))
    if dst.resolve() == src.resolve():
        raise InputError(f"{dst} is the input file; choose another output")
    t0 = time.perf_counter()
    size = src.stat().st_size
    # ONNX external data: found and checked (present, long enough) before any work.
    external = onnx_external_data(src) if fmt == "onnx" else {}
    with open(src, "rb") as f:
        parse = {"safetensors": _safetensors_regions, "onnx": _onnx_regions, "torch": _torch_regions}[fmt]
        regions = _clean_regions(parse(src, f, size), size, src)
        hasher = _SourceCheck()  # one pass over the source, as it is read for coding
        meta: dict[str, Any] = {"kind": "file", "source": {"format": fmt, "name": src.name, "size": size}}
        with ContainerWriter(dst, level=level, chunk_size=chunk_size, threads=threads, meta=meta) as w:
            segments = _pack_segments(w, f, regions, size, hasher)
            if external:
                meta["external_data"] = _pack_external_data(w, src.parent, external)
            for name, array in (extra_tensors or {}).items():
                w.add_tensor(f"extra/{name}", np.ascontiguousarray(array))
            if extra_meta is not None:
                meta["extra"] = extra_meta
            meta["source"]["crc32"] = hasher.value
            meta["segments"] = segments
            w.meta = meta
            stats = list(w.stats)
    seconds = time.perf_counter() - t0
    size += sum(f["size"] for f in meta.get("external_data", []))
    n_regions = len(regions) + sum(len(r) for r in external.values())
    report = PackReport(src, dst, fmt, size, dst.stat().st_size, seconds, n_regions, stats)
    log.info("packed %s -> %s: %d -> %d bytes (ratio %.4f)", src, dst, size, report.packed_bytes, report.ratio)
    return report


def default_unpack_path(container: Path, stored_name: str | None) -> Path:
    """Where ``compress unpack`` writes by default: beside the container, named after the
    container's own file name minus ``.czip`` (never after the name stored inside it,
    which whoever made the file chose). The stored name only lends its suffix when the
    container's name has none that we know (``bundle.czip`` -> ``bundle.onnx``).
    """
    name = container.name
    base = name[: -len(".czip")] if name.lower().endswith(".czip") and len(name) > 5 else name + ".out"
    stored_suffix = Path(stored_name or "").suffix.lower()
    if Path(base).suffix.lower() not in SUPPORTED_SUFFIXES and stored_suffix in SUPPORTED_SUFFIXES:
        base += stored_suffix
    return container.with_name(base)


def unpack_file(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    force: bool = True,
) -> Path:
    """Restore the original file from a container written by :func:`pack_file`.

    The segment list is checked against the declared size before anything is written;
    the output goes to a unique temp file beside ``dst``, its CRC-32 (SHA-256 for older
    containers) is checked against the original's while writing, and only then is it
    renamed into place.

    Args:
        src: the container.
        dst: output path (default: :func:`default_unpack_path`).
        threads: decoding threads (None: all cores).
        force: replace an existing ``dst`` (the CLI passes ``--force``).

    Raises:
        InputError: missing file, unusable destination. CorruptArchiveError: damaged
        container or hash mismatch. OutputError: the output cannot be written.
    """
    from compress.artifacts import check_output_path

    src = Path(src)
    if src.is_dir():
        raise InputError(f"{src} is a directory, not a packed file")
    if not src.is_file():
        raise InputError(f"{src}: no such file")
    with ContainerReader(src) as r:
        meta = r.meta
        source = meta.get("source") if meta.get("kind") == "file" else None
        segments = meta.get("segments")
        if not isinstance(source, dict) or not isinstance(segments, list):
            raise CorruptArchiveError(f"{src}: not a packed file (no file segments in the manifest)")
        size, sha, crc = source.get("size"), source.get("sha256"), source.get("crc32")
        if not (isinstance(size, int) and _is_count(size) and (_is_count(crc) or isinstance(sha, str))):
            raise CorruptArchiveError(f"{src}: the manifest's source size/checksum is malformed")
        name = source.get("name")
        dst = Path(dst) if dst is not None else default_unpack_path(src, name if isinstance(name, str) else None)
        check_output_path(dst, force=force, sources=(src,))
        plan = _check_segments(src, r, segments, size)
        companions = _external_data_plan(src, r, meta, dst.parent, force)
        check: int | str = crc if _is_count(crc) else str(sha)  # older files hold a SHA-256
        _restore_segments(src, r, plan, size, check, dst, threads)
        for path, data_plan, data_size, data_crc in companions:
            _restore_segments(src, r, data_plan, data_size, data_crc, path, threads)
    log.info("unpacked %s -> %s (%d bytes)", src, dst, size)
    return dst


def _check_segments(src: Path, r: ContainerReader, segments: list[Any], size: int) -> list[tuple[str, str, int, int]]:
    """Validate the segment list against the entries and the declared size, up front."""
    plan = []
    total = 0
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 4 and seg[0] in ("b", "t") and isinstance(seg[1], str)):
            raise CorruptArchiveError(f"{src}: malformed segment list")
        kind, ename, start, length = seg
        entry = r.entries.get(ename)
        if entry is None or entry.mask is not None or not _is_count(start) or not _is_count(length):
            raise CorruptArchiveError(f"{src}: segment refers to a missing or unusable entry {ename!r}")
        if start + length > entry.nbytes:
            raise CorruptArchiveError(f"{src}: segment of {ename!r} out of range")
        if kind == "t" and (start != 0 or length != entry.nbytes):
            raise CorruptArchiveError(f"{src}: partial segment of {ename!r}")
        total += length
        plan.append((kind, ename, start, length))
    if total != size:
        raise CorruptArchiveError(f"{src}: segments hold {total} bytes, the manifest declares {size}")
    return plan


def _is_count(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# ======================================================= ONNX external data (issue 17)
#
# A data file is coded like a model file, by the same segment writer and reader
# (_pack_segments, _restore_segments): its tensors (typed from the TensorProtos that point
# into it) as typed entries, the bytes between them (alignment padding, untyped data) as
# blobs, under ``external/<i>/``; the manifest's ``external_data`` lists each file's name,
# size, CRC-32 and segments, and unpack restores it beside the model byte for byte.

_ONNX_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _onnx_external_tensor(buf: mmap.mmap, start: int, end: int, out: list[tuple[str, Region | None]]) -> None:
    dims: list[int] = []
    dtype = 0
    name = ""
    location_field = 0
    entries: dict[str, str] = {}
    for fno, wt, a, b in _fields(buf, start, end):
        if fno == 1 and wt == 0:
            dims.append(a)
        elif fno == 1 and wt == 2:
            pos = a
            while pos < b:
                v, pos = _varint(buf, pos, b)
                dims.append(v)
        elif fno == 2 and wt == 0:
            dtype = a
        elif fno == 8 and wt == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif fno == 13 and wt == 2:  # external_data: StringStringEntryProto {1: key, 2: value}
            key = value = ""
            for efno, ewt, ea, eb in _fields(buf, a, b):
                if ewt == 2 and efno in (1, 2):
                    text = bytes(buf[ea:eb]).decode("utf-8", "replace")
                    key, value = (text, value) if efno == 1 else (key, text)
            entries[key] = value
        elif fno == 14 and wt == 0:
            location_field = a
    if location_field != _ONNX_EXTERNAL:
        return
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else -1
    except ValueError:
        raise ValueError(f"tensor {name!r} has a malformed external-data offset/length") from None
    label = name or "tensor"
    out.append(
        (entries.get("location", ""), Region(offset, length, _ONNX_DTYPES.get(dtype, "uint8"), tuple(dims), label))
    )


def _onnx_external_graph(buf: mmap.mmap, start: int, end: int, out: list, depth: int) -> None:
    if depth > 32:
        raise ValueError("subgraphs nest too deep")
    for fno, wt, a, b in _fields(buf, start, end):
        if wt != 2:
            continue
        if fno == 5:
            _onnx_external_tensor(buf, a, b, out)
        elif fno == 1:
            for afno, awt, aa, ab in _fields(buf, a, b):
                if afno != 5 or awt != 2:
                    continue
                for tfno, twt, ta, tb in _fields(buf, aa, ab):
                    if twt == 2 and tfno in (5, 10):
                        _onnx_external_tensor(buf, ta, tb, out)
                    elif twt == 2 and tfno in (6, 11):
                        _onnx_external_graph(buf, ta, tb, out, depth + 1)


def onnx_external_data(path: Path) -> dict[str, list[Region]]:
    """The external-data files an ONNX model's tensors refer to, with each file's tensors.

    Torch- and onnx-free (the protobuf wire format is walked directly), so ``compress
    validate`` uses it on a device to check a model's data file before loading it.

    Returns:
        ``{file name: regions}``: file names are relative to the model's folder, regions
        sorted by offset, with the lengths of regions that run to the end of the file
        filled in. Empty for a model without external data.

    Raises:
        InputError: the model does not parse, a location is not a plain file name beside
            the model, a data file is missing, or it is shorter than its tensors need (the
            message names the file).
    """
    path = Path(path)
    refs: list[tuple[str, Region | None]] = []
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: not an ONNX model (empty file)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            for fno, wt, a, b in _fields(buf, 0, size):
                if fno == 7 and wt == 2:
                    _onnx_external_graph(buf, a, b, refs, 0)
        except (ValueError, IndexError) as err:
            raise InputError(f"{path}: not a valid ONNX model ({err})") from None
    files: dict[str, list[Region]] = {}
    for location, region in refs:
        assert region is not None
        if not _plain_name(location):
            raise InputError(
                f"{path}: tensor {region.label!r} keeps its data in {location!r}, which is not a file "
                "beside the model; only data files in the model's own folder are supported"
            )
        files.setdefault(location, []).append(region)
    out: dict[str, list[Region]] = {}
    for location, regions in files.items():
        data = path.with_name(location)
        if not data.is_file():
            raise InputError(
                f"{data}: missing; {path.name} keeps the weights of {len(regions)} tensors in this "
                "external-data file (copy it next to the model)"
            )
        data_size = data.stat().st_size
        fixed = []
        for r in sorted(regions, key=lambda r: r.offset):
            length = data_size - r.offset if r.length < 0 else r.length
            if r.offset + length > data_size:
                raise InputError(
                    f"{data}: truncated ({data_size} bytes); tensor {r.label!r} of {path.name} needs bytes "
                    f"{r.offset}..{r.offset + length}"
                )
            fixed.append(Region(r.offset, length, r.dtype, r.shape, r.label))
        out[location] = fixed
    return out


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _pack_external_data(w: ContainerWriter, folder: Path, files: dict[str, list[Region]]) -> list[dict[str, Any]]:
    """Code each external-data file into ``w`` (entries ``external/<i>/...``); returns the
    manifest records ``{"name", "size", "sha256", "segments"}``."""
    return [
        _pack_one_data_file(w, f"external/{i}", folder / name, found) for i, (name, found) in enumerate(files.items())
    ]


def _pack_one_data_file(w: ContainerWriter, prefix: str, path: Path, found: list[Region]) -> dict[str, Any]:
    size = path.stat().st_size
    regions = _clean_regions(found, size, path)
    hasher = _SourceCheck()
    with open(path, "rb") as f:
        segments = _pack_segments(w, f, regions, size, hasher, prefix + "/")
    return {"name": path.name, "size": size, "crc32": hasher.value, "segments": segments}


def _external_data_plan(
    src: Path, r: ContainerReader, meta: dict[str, Any], folder: Path, force: bool
) -> list[tuple[Path, list[tuple[str, str, int, int]], int, int]]:
    """Check a container's external-data records and their destinations before anything is written."""
    from compress.artifacts import check_output_path

    records = meta.get("external_data", [])
    if not isinstance(records, list):
        raise CorruptArchiveError(f"{src}: malformed external_data list")
    out = []
    for rec in records:
        if not isinstance(rec, dict):
            raise CorruptArchiveError(f"{src}: malformed external_data record")
        name, size, crc, segments = rec.get("name"), rec.get("size"), rec.get("crc32"), rec.get("segments")
        if not (isinstance(name, str) and _plain_name(name)):
            raise CorruptArchiveError(f"{src}: external data file name {name!r} is not a plain file name")
        if not (_is_count(size) and _is_count(crc) and isinstance(segments, list)):
            raise CorruptArchiveError(f"{src}: the size/CRC-32/segments of external data file {name!r} are malformed")
        path = folder / name
        check_output_path(path, force=force, sources=(src,))
        out.append((path, _check_segments(src, r, segments, size), size, crc))
    return out


def _restore_segments(
    src: Path,
    r: ContainerReader,
    plan: list[tuple[str, str, int, int]],
    size: int,
    check: int | str,
    dst: Path,
    threads: int | None,
) -> None:
    """Write one restored file from its checked segment plan: atomically, never more than
    ``size`` bytes, and only if its checksum matches ``check`` (a CRC-32, or the SHA-256
    hex digest of older containers). The inverse of :func:`_pack_segments`, for model
    files and external data files alike.

    Tensors are decoded straight into the writer's aligned blocks, which the writer
    checksums (CRC-32) and writes (direct) on its own thread behind the decoding: no copy
    of the decoded bytes and no hand-off per chunk. Older containers' SHA-256 is computed
    on a pipeline thread behind the decoding instead.
    """
    from compress.artifacts import atomic_open

    if isinstance(check, int):
        _restore_direct(src, r, plan, size, check, dst, threads)
        return
    hasher: Any = hashlib.sha256()
    written = 0
    with atomic_open(dst, size_hint=size) as out:
        writer = AlignedWriter(out)

        def sink(buf: Any) -> None:
            writer.write(buf)
            hasher.update(buf)

        pipe = _Pipeline(sink)  # one chunk or a few in flight
        try:
            for kind, ename, start, length in plan:
                # a byte range of a blob: decode only the chunks it covers
                pieces = r.iter_chunks(ename, threads) if kind == "t" else r.iter_range(ename, start, length)
                for chunk in pieces:
                    buf = chunk.data.cast("B") if chunk.flags.c_contiguous else chunk.tobytes()
                    written += len(buf)
                    if written > size:
                        raise CorruptArchiveError(f"{src}: restored {dst.name} exceeds the declared {size} bytes")
                    pipe.put(buf)
        finally:
            try:
                pipe.close()
            finally:
                writer.close()
        if written != size or hasher.hexdigest() != check:
            raise CorruptArchiveError(f"{src}: restored {dst.name} does not match the original's size/SHA-256")


def _restore_direct(
    src: Path,
    r: ContainerReader,
    plan: list[tuple[str, str, int, int]],
    size: int,
    check: int,
    dst: Path,
    threads: int | None,
) -> None:
    """:func:`_restore_segments` for a CRC-32 checked file (every container since format 2)."""
    from compress.artifacts import atomic_open

    written = 0
    with atomic_open(dst, size_hint=size) as out:
        writer = AlignedWriter(out, checksum=True)
        try:
            for kind, ename, start, length in plan:
                if kind == "t":
                    pieces = r.iter_chunks(ename, threads, into=writer.reserve)
                else:  # a byte range of a blob: decode only the chunks it covers
                    pieces = r.iter_range(ename, start, length)
                for chunk in pieces:
                    written += chunk.nbytes
                    if written > size:
                        raise CorruptArchiveError(f"{src}: restored {dst.name} exceeds the declared {size} bytes")
                    writer.commit(chunk)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if written != size or writer.crc != check:
            raise CorruptArchiveError(f"{src}: restored {dst.name} does not match the original's size/CRC-32")
