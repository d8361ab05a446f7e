"""Outputs of pack/unpack: unique temp files, no silent replacement, clean refusals (exit 2).

One test per hostile or mistaken case of issue 13 that concerns containers and their paths.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard

from compress.artifacts import OutputError, atomic_write_bytes
from compress.commands.pack import pack, unpack
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
from compress.lossless.files import default_unpack_path, pack_file, unpack_file


@pytest.fixture
def model(tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "m.safetensors"
    rng = np.random.default_rng(0)
    save_file({"w": (rng.standard_normal(6000) * 0.02).astype(np.float32), "b": np.arange(7, dtype=np.int64)}, str(src))
    return src


def only_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_default_unpack_name_comes_from_the_container_not_its_manifest(tmp_path, model) -> None:
    packed = tmp_path / "evil.czip"
    pack_file(model, packed)
    with ContainerReader(packed) as r:
        assert r.meta["source"]["name"] == "m.safetensors"
    # the stored name only lends a known suffix; ".bashrc" lends nothing
    assert default_unpack_path(tmp_path / "x.safetensors.czip", ".bashrc").name == "x.safetensors"
    assert default_unpack_path(tmp_path / "bundle.czip", "model.onnx").name == "bundle.onnx"
    assert default_unpack_path(tmp_path / "bundle.czip", "../../.bashrc").name == "bundle"
    out = unpack_file(packed, None)
    assert out == tmp_path / "evil.safetensors" and out.read_bytes() == model.read_bytes()


def test_unpack_never_replaces_without_force(tmp_path, model, capsys) -> None:
    packed = tmp_path / "m.safetensors.czip"
    pack(model, None, 3, 1)
    victim = tmp_path / "keep.safetensors"
    victim.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists; pass --force"):
        unpack(packed, None, output=victim)
    assert victim.read_bytes() == b"precious"
    assert unpack(packed, None, output=victim, force=True, threads=2) == 0
    assert victim.read_bytes() == model.read_bytes()
    with pytest.raises(OutputError, match="exists; pass --force"):
        pack(model, None, 3, 1)  # m.safetensors.czip is already there


def test_input_and_output_the_same_file(tmp_path, model) -> None:
    packed = tmp_path / "m.czip"
    pack_file(model, packed)
    link = tmp_path / "alias.czip"
    os.link(packed, link)
    before = packed.read_bytes()
    with pytest.raises(InputError, match="is the input file"):
        unpack_file(packed, link)
    with pytest.raises(InputError, match="is the input file"):
        pack_file(model, model)
    assert packed.read_bytes() == before and model.exists()


def test_unpack_of_a_tmp_named_container_keeps_its_input(tmp_path, model) -> None:
    packed = tmp_path / "m.safetensors.tmp"
    pack_file(model, packed)
    unpack_file(packed, tmp_path / "m2.safetensors")
    assert packed.exists() and (tmp_path / "m2.safetensors").read_bytes() == model.read_bytes()


def test_planted_symlink_is_not_followed(tmp_path, model) -> None:
    packed = tmp_path / "m.czip"
    pack_file(model, packed)
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    for name in ("out.safetensors.tmp", ".out.safetensors.tmp"):
        (tmp_path / name).symlink_to(target)
    unpack_file(packed, tmp_path / "out.safetensors")
    assert target.read_bytes() == b"untouched"


@pytest.mark.parametrize("where", ["missing folder", "directory"])
def test_pack_and_unpack_to_a_missing_folder_or_a_directory(tmp_path, model, where) -> None:
    packed = tmp_path / "m.czip"
    pack_file(model, packed)
    dst = tmp_path / "nope" / "x.czip" if where == "missing folder" else tmp_path
    msg = "does not exist" if where == "missing folder" else "is a directory"
    with pytest.raises(OutputError, match=msg):
        pack_file(model, dst)
    with pytest.raises(OutputError, match=msg):
        unpack_file(packed, dst)
    assert not (tmp_path / "nope").exists()


def test_cli_exit_codes_for_bad_paths(tmp_path, model) -> None:
    packed = tmp_path / "m.czip"
    pack_file(model, packed)
    cases = [
        ["pack", str(model), "-o", str(tmp_path / "no" / "x.czip")],
        ["unpack", str(packed), "-o", str(tmp_path)],
        ["unpack", str(tmp_path)],
        ["unpack", str(packed), "-o", str(model)],  # exists, no --force
    ]
    for args in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_writer_abort_removes_its_temp_file_when_close_fails(tmp_path, monkeypatch) -> None:
    path = tmp_path / "a.czip"
    w = ContainerWriter(path, threads=1)
    w.add_tensor("x", np.zeros(1000, np.float32))
    real = w._f

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(real, name)

    w._f = Full()
    with pytest.raises(OutputError, match=r"cannot write .*a\.czip: No space left on device \([\d,]+ bytes free"):
        w.close()
    assert only_files(tmp_path) == []


def test_writer_refuses_nul_and_overlong_names(tmp_path) -> None:
    with ContainerWriter(tmp_path / "a.czip", threads=1) as w:
        for bad in ("a\x00b", "n" * 5000, ""):
            with pytest.raises(InputError, match="entry name"):
                w.add_tensor(bad, np.zeros(2, np.float32))


def hostile(good: bytes, edit) -> bytes:
    off, length = TRAILER.unpack(good[-TRAILER_SIZE:])[:2]
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(good[off : off + length]))
    edit(manifest)
    body = json.dumps(manifest).encode()
    stored = zstandard.ZstdCompressor().compress(body)
    digest = hashlib.sha256(good[:HEADER_SIZE] + stored).digest()
    return good[:off] + stored + TRAILER.pack(off, len(stored), zlib.crc32(stored), len(body), digest, b"CZIPEND\x00")


def test_zstd_frame_with_garbage_header(tmp_path) -> None:
    path = tmp_path / "a.czip"
    write_container(path, {"w": np.tile(np.arange(50, dtype=np.float32), 200)}, threads=1)
    with ContainerReader(path) as r:
        off, _, _, method = r.entries["w"].chunks[0][2][0]
        assert method == 1
    data = bytearray(path.read_bytes())
    data[off : off + 8] = b"\xde\xad\xbe\xef" * 2

    # a hostile writer also fixes the chunk CRC: the frame header itself must be refused
    def fix_crc(m):
        chunk = m["entries"][0]["chunks"][0]
        start = off
        total = sum(s[0] for s in chunk[2])
        chunk[1] = zlib.crc32(bytes(data[start : start + total]))

    path.write_bytes(hostile(bytes(data), fix_crc))
    with ContainerReader(path) as r, pytest.raises(CorruptArchiveError, match="entry 'w' chunk 0: zstd frame header"):
        r.read_tensor("w")


def test_zero_length_streams_are_refused(tmp_path) -> None:
    path = tmp_path / "a.czip"
    good = write_container(path, {"w": np.ones(100, np.float32)}, threads=1).read_bytes()

    def zero(m):
        for s in m["entries"][0]["chunks"][0][2]:
            s[0] = 0

    path.write_bytes(hostile(good, zero))
    with pytest.raises(CorruptArchiveError), ContainerReader(path) as r:
        r.verify()


def test_stored_names_with_nul_overlong_or_naming_a_directory(tmp_path, model) -> None:
    packed = tmp_path / "m.czip"
    good = pack_file(model, packed).dst.read_bytes()
    packed.write_bytes(hostile(good, lambda m: m["entries"][0].update(name="t\x00x")))
    with pytest.raises(CorruptArchiveError, match="no valid name"):
        unpack_file(packed, tmp_path / "o1.safetensors")
    packed.write_bytes(hostile(good, lambda m: m["entries"][0].update(name="n" * 5000)))
    with pytest.raises(CorruptArchiveError, match="no valid name"):
        unpack_file(packed, tmp_path / "o2.safetensors")
    # a stored file name naming an existing directory is never used as the output
    (tmp_path / "sub").mkdir()
    packed.write_bytes(hostile(good, lambda m: m["meta"]["source"].update(name="sub")))
    out = unpack_file(packed, None)
    assert out == tmp_path / "m" and out.read_bytes() == model.read_bytes()
    assert (tmp_path / "sub").is_dir()


def test_declared_size_checked_before_writing(tmp_path, model) -> None:
    packed = tmp_path / "m.czip"
    good = pack_file(model, packed).dst.read_bytes()
    packed.write_bytes(hostile(good, lambda m: m["meta"]["source"].update(size=1024)))
    with pytest.raises(CorruptArchiveError, match="segments hold .* declares 1024"):
        unpack_file(packed, tmp_path / "o.safetensors")
    assert only_files(tmp_path) == ["m.czip", "m.safetensors"]


def test_huge_manifest_is_refused_fast(tmp_path) -> None:
    path = tmp_path / "a.czip"
    good = write_container(path, {"w": np.ones(10, np.float32)}, threads=1).read_bytes()
    off = TRAILER.unpack(good[-TRAILER_SIZE:])[0]
    stored = os.urandom(62 << 20)
    path.write_bytes(good[:off] + stored + TRAILER.pack(off, len(stored), 0, 1 << 30, bytes(32), b"CZIPEND\x00"))
    with pytest.raises(CorruptArchiveError, match="manifest larger than"):
        ContainerReader(path)


def test_inspect_with_mistyped_meta(tmp_path, model) -> None:
    from compress.inspect import inspect_path

    packed = tmp_path / "m.czip"
    good = pack_file(model, packed).dst.read_bytes()
    packed.write_bytes(hostile(good, lambda m: m["meta"].update(source={"size": "big", "name": 5}, extra=[1])))
    info = inspect_path(packed)
    assert info["kind"] == "packed file" and "size unknown" in info["extra"]["packs"]
    packed.write_bytes(hostile(good, lambda m: m["meta"].update(source="x")))
    assert inspect_path(packed)["kind"] == "packed file"


def test_concurrent_packs_and_unpacks_to_one_destination(tmp_path, model) -> None:
    dst = tmp_path / "one.czip"

    def do_pack(_):
        try:
            pack_file(model, dst, threads=1)
            return "ok"
        except OutputError:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(do_pack, range(8)))
    assert "ok" in results and set(results) <= {"ok", "refused"}
    out = tmp_path / "one.safetensors"

    def do_unpack(_):
        unpack_file(dst, out, threads=1)
        return out.read_bytes() == model.read_bytes()

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(do_unpack, range(8)))
    assert out.read_bytes() == model.read_bytes()
    assert only_files(tmp_path) == ["m.safetensors", "one.czip", "one.safetensors"]


def test_concurrent_processes_writing_one_file(tmp_path) -> None:
    dst = tmp_path / "shared.bin"
    code = (
        "import sys; from pathlib import Path; from compress.artifacts import atomic_write_bytes;"
        "atomic_write_bytes(Path(sys.argv[1]), bytes([int(sys.argv[2])]) * 3_000_000)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(dst), str(i)]) for i in range(6)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    data = dst.read_bytes()
    assert len(data) == 3_000_000 and len(set(data)) == 1  # one writer's complete file
    assert only_files(tmp_path) == ["shared.bin"]
    atomic_write_bytes(dst, b"x")
    assert dst.read_bytes() == b"x"


def test_small_file_cannot_expand_into_large_memory(tmp_path, model) -> None:
    """A few-KB file whose skeleton blob decodes to 64 MiB of zeros (16 MiB chunks, the
    limit): unpack decodes chunk by chunk and refuses, never holding the blob whole."""
    import tracemalloc

    packed = tmp_path / "m.czip"
    with ContainerWriter(packed, chunk_size=16 << 20, threads=1, meta={}) as w:
        w.add_blob("skeleton/0", (bytes(16 << 20) for _ in range(4)), size=64 << 20)
    good = packed.read_bytes()
    assert len(good) < 10_000
    segments = [["b", "skeleton/0", i << 20, 1 << 20] for i in range(64)]
    packed.write_bytes(
        hostile(
            good,
            lambda m: m.update(
                meta={
                    "kind": "file",
                    "source": {"name": "x.safetensors", "size": 64 << 20, "sha256": "0" * 64},
                    "segments": segments,
                }
            ),
        )
    )
    tracemalloc.start()
    try:
        with pytest.raises(CorruptArchiveError, match="does not match the original"):
            unpack_file(packed, tmp_path / "o.safetensors", threads=1)
        assert tracemalloc.get_traced_memory()[1] < 120 << 20
    finally:
        tracemalloc.stop()
    assert not (tmp_path / "o.safetensors").exists()
