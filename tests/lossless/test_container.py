"""Container integrity: every flipped byte and truncation is caught; hostile files are refused."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard

from compress.errors import InputError
from compress.lossless.container import (
    HEADER_SIZE,
    TRAILER,
    TRAILER_SIZE,
    ContainerReader,
    ContainerWriter,
    CorruptArchiveError,
    write_container,
)


def small_container(path) -> bytes:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(400) * 0.05).astype(np.float32)
    write_container(
        path,
        {
            "w": w,
            "h": (w.astype(np.float16), "float16"),
            "codes": (rng.integers(-8, 8, 101).astype(np.int8), "int8", "i4"),
            "mask": rng.random(100) < 0.3,
            "blob": b"graph bytes " * 20,
        },
        meta={"note": "test"},
        chunk_size=4096,
        threads=1,
    )
    return path.read_bytes()


def open_and_verify(path) -> None:
    with ContainerReader(path) as r:
        r.verify()


def test_roundtrip_meta_and_random_access(tmp_path) -> None:
    small_container(tmp_path / "a.czip")
    with ContainerReader(tmp_path / "a.czip") as r:
        assert r.names() == ["w", "h", "codes", "mask", "blob"]
        assert r.meta == {"note": "test"}
        assert r.read_blob("blob") == b"graph bytes " * 20
        assert r.read_tensor("codes").min() >= -8
        with pytest.raises(InputError, match="no entry"):
            r.read_tensor("missing")


def test_every_flipped_byte_is_detected(tmp_path) -> None:
    path = tmp_path / "a.czip"
    good = small_container(path)
    with ContainerReader(path) as r:
        payload_spans = {
            (name, ci): [(s[0], s[0] + s[1]) for s in streams]
            for name, e in r.entries.items()
            for ci, (_, _, streams) in enumerate(e.chunks)
        }
    bad = tmp_path / "bad.czip"
    for i in range(len(good)):
        data = bytearray(good)
        data[i] ^= 0x5A
        bad.write_bytes(data)
        with pytest.raises(CorruptArchiveError) as info:
            open_and_verify(bad)
        for (name, ci), spans in payload_spans.items():
            if any(a <= i < b for a, b in spans):
                assert f"entry {name!r} chunk {ci}" in str(info.value), (i, str(info.value))


def test_every_truncation_is_detected(tmp_path) -> None:
    path = tmp_path / "a.czip"
    good = small_container(path)
    bad = tmp_path / "bad.czip"
    for n in range(len(good)):
        bad.write_bytes(good[:n])
        with pytest.raises(CorruptArchiveError):
            open_and_verify(bad)


def test_version_and_magic(tmp_path) -> None:
    path = tmp_path / "a.czip"
    good = bytearray(small_container(path))
    good[8:10] = struct.pack("<H", 5)
    path.write_bytes(good)
    with pytest.raises(
        CorruptArchiveError, match=r"version 5\.0 is not supported \(this reader: 2\.x and 3\.x and 4\.x\)$"
    ):
        ContainerReader(path)
    good[8:10] = struct.pack("<H", 1)  # a format-1 file (before the compact manifest)
    path.write_bytes(good)
    with pytest.raises(CorruptArchiveError, match=r"version 1\.0 is not supported.*older compress"):
        ContainerReader(path)
    path.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(CorruptArchiveError, match="not a czip"):
        ContainerReader(path)


def test_version_2_containers_are_read(tmp_path) -> None:
    """Version 3 only added paired int8 chunks: a version-2 file (same bytes, header 2.0,
    its trailer's SHA-256 over that header) reads as before."""
    path = tmp_path / "a.czip"
    good = small_container(path)
    assert struct.unpack("<H", good[8:10])[0] == 4
    old = bytearray(good)
    old[8:10] = struct.pack("<H", 2)
    path.write_bytes(with_manifest(bytes(old), manifest_body(good)))
    with ContainerReader(path) as r:
        r.verify()
        assert r.read_blob("blob") == b"graph bytes " * 20


def manifest_body(good: bytes) -> bytes:
    off, length = TRAILER.unpack(good[-TRAILER_SIZE:])[:2]
    return zstandard.ZstdDecompressor().decompress(good[off : off + length])


def test_paired_chunks_only_for_int8_entries(tmp_path) -> None:
    """A paired chunk (two streams) in a uint8 entry is refused when the file opens."""
    path = tmp_path / "a.czip"
    codes = np.clip(np.round(np.random.default_rng(0).standard_normal(5000) * 3), -8, 7).astype(np.int8)
    write_container(path, {"codes": codes}, threads=1)
    good = path.read_bytes()
    with ContainerReader(path) as r:
        assert len(r.entry("codes").chunks[0][2]) == 2
        assert r.read_tensor("codes").tobytes() == codes.tobytes()
    path.write_bytes(rewrite_manifest(good, lambda m: m["entries"][0].update(dtype="uint8")))
    with pytest.raises(CorruptArchiveError, match="invalid element count, stream count"):
        ContainerReader(path)
    path.write_bytes(rewrite_manifest(good, lambda m: m["entries"][0]["chunks"][0][2][1].__setitem__(1, 7)))
    with pytest.raises(CorruptArchiveError, match="invalid paired chunk"):
        ContainerReader(path)


def rewrite_manifest(good: bytes, edit) -> bytes:
    """A file whose manifest was edited, with every checksum recomputed (hostile, not damaged)."""
    off, length = TRAILER.unpack(good[-TRAILER_SIZE:])[:2]
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(good[off : off + length]))
    edit(manifest)
    return with_manifest(good, json.dumps(manifest).encode())


def with_manifest(good: bytes, body: bytes) -> bytes:
    off = TRAILER.unpack(good[-TRAILER_SIZE:])[0]
    stored = zstandard.ZstdCompressor().compress(body)
    digest = hashlib.sha256(good[:HEADER_SIZE] + stored).digest()
    return good[:off] + stored + TRAILER.pack(off, len(stored), zlib.crc32(stored), len(body), digest, b"CZIPEND\x00")


def stream0(m):
    return m["entries"][0]["chunks"][0][2][0]


HOSTILE_EDITS = {
    "huge shape": lambda m: m["entries"][0].update(shape=[2**40, 2**20]),
    "shape lie": lambda m: m["entries"][0].update(shape=[401]),
    "length past end": lambda m: stream0(m).__setitem__(0, 10**12),
    "negative length": lambda m: stream0(m).__setitem__(0, -5),
    "raw_len lie": lambda m: stream0(m).__setitem__(1, 2**31),
    "payloads shifted": lambda m: stream0(m).__setitem__(0, stream0(m)[0] + 1),
    "element count lie": lambda m: m["entries"][0]["chunks"][0].__setitem__(0, 2**40),
    "crc out of range": lambda m: m["entries"][0]["chunks"][0].__setitem__(1, 2**40),
    "bad dtype": lambda m: m["entries"][0].update(dtype="object"),
    "bad layout": lambda m: m["entries"][0].update(layout="i4"),
    "duplicate": lambda m: m["entries"].append(m["entries"][0]),
    "deep meta": lambda m: m.update(meta=json.loads("[" * 500 + "]" * 500)),
    "entries not list": lambda m: m.update(entries={"a": 1}),
    "bool as int": lambda m: stream0(m).__setitem__(2, True),
    "method unknown": lambda m: stream0(m).__setitem__(2, 7),
    "stream count": lambda m: m["entries"][0]["chunks"][0][2].pop(),
    "name with NUL": lambda m: m["entries"][0].update(name="w\x00x"),
    "alias of missing": lambda m: m["entries"].append({"name": "z", "kind": "alias", "of": "nope"}),
    "mask of missing": lambda m: m["entries"][0].update(mask="nope", fill="00000000"),
    "mask bad fill": lambda m: m["entries"][2].update(mask="mask", fill="zz"),
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_EDITS))
def test_hostile_manifests_are_refused(tmp_path, edit) -> None:
    path = tmp_path / "a.czip"
    good = small_container(path)
    path.write_bytes(rewrite_manifest(good, HOSTILE_EDITS[edit]))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptArchiveError):
            open_and_verify(path)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_deep_manifest_json_is_refused(tmp_path) -> None:
    path = tmp_path / "a.czip"
    good = small_container(path)
    path.write_bytes(with_manifest(good, b"[" * 100000 + b"]" * 100000))
    with pytest.raises(CorruptArchiveError):
        ContainerReader(path)


def test_fuzz_random_and_mutated_files(tmp_path) -> None:
    path = tmp_path / "a.czip"
    good = small_container(path)
    rng = random.Random(1234)
    bad = tmp_path / "fuzz.czip"
    tracemalloc.start()
    try:
        for it in range(400):
            kind = it % 4
            if kind == 0:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000)))
            elif kind == 1:
                data = bytearray(good)
                for _ in range(rng.randint(1, 20)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
            elif kind == 2:
                a, b = sorted(rng.randrange(len(good)) for _ in range(2))
                data = good[:a] + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 50))) + good[b:]
            else:  # valid header and trailer magic around random content
                data = good[:HEADER_SIZE] + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000))) + good[-8:]
            bad.write_bytes(bytes(data))
            try:
                open_and_verify(bad)
            except CorruptArchiveError:
                pass
            else:
                assert bytes(data) == good
        assert tracemalloc.get_traced_memory()[1] < 32 << 20
    finally:
        tracemalloc.stop()


def test_writer_is_atomic(tmp_path) -> None:
    path = tmp_path / "a.czip"
    with pytest.raises(RuntimeError), ContainerWriter(path) as w:
        w.add_tensor("x", np.zeros(10, np.float32))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no file, no temp file


def test_writer_rejects_bad_names_and_dtypes(tmp_path) -> None:
    with ContainerWriter(tmp_path / "a.czip") as w:
        w.add_tensor("x", np.zeros(3, np.float32))
        with pytest.raises(InputError, match="duplicate"):
            w.add_tensor("x", np.zeros(3, np.float32))
        with pytest.raises(InputError, match="layout"):
            w.add_tensor("y", np.zeros(3, np.float32), layout="i4")


def test_format_3_file_reads_byte_identical() -> None:
    """A real file of the format-3 writer (tests/lossless/data/format3.czip: static-model
    ANS streams, paired int8 chunks, a masked int4 entry, sparse floats) decodes to exactly
    the tensors it was written from."""
    from pathlib import Path

    from tests.lossless import format3_fixture as fx

    path = Path(__file__).parent / "data" / "format3.czip"
    with ContainerReader(path) as r:
        r.verify()
        assert r.major == 3
        methods = {s[3] for name in r.names() for c in r.entry(name).chunks for s in c[2]}
        assert methods == {0, 1, 2}  # raw, zstd and the format-3 ANS streams all covered
        assert len(r.entry("i8").chunks[0][2]) == 2  # paired
        for name, arr in fx.arrays().items():
            assert r.read_tensor(name).tobytes() == arr.tobytes(), name
        assert r.read_blob("blob") == fx.BLOB


def test_format_4_method_refused_in_older_versions(tmp_path) -> None:
    """Stream method 3 (ans-exact) is new in format 4: a file that says 3.0 but holds one
    is refused when it opens, naming the stream."""
    path = tmp_path / "a.czip"
    codes = np.clip(np.round(np.random.default_rng(0).laplace(0, 1.5, 3000)), -8, 7).astype(np.int8)
    write_container(path, {"codes": (codes, "int8", "i4")}, threads=1)
    good = path.read_bytes()
    with ContainerReader(path) as r:
        assert r.major == 4 and r.entry("codes").chunks[0][2][0][3] == 3
        assert r.read_tensor("codes").tobytes() == codes.tobytes()
    old = bytearray(good)
    old[8:10] = struct.pack("<H", 3)
    path.write_bytes(with_manifest(bytes(old), manifest_body(good)))
    with pytest.raises(CorruptArchiveError, match="stream 0: invalid method or size"):
        ContainerReader(path)
