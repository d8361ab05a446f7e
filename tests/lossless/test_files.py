"""Byte-identical pack/unpack of safetensors, ONNX and torch.save files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from compress.commands.pack import pack, unpack
from compress.errors import InputError
from compress.lossless.container import ContainerReader, ContainerWriter, CorruptArchiveError
from compress.lossless.files import pack_file, unpack_file


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


def roundtrip(src, tmp_path, **opts):
    packed = tmp_path / "x.czip"
    report = pack_file(src, packed, **opts)
    out = unpack_file(packed, tmp_path / ("restored" + src.suffix))
    assert out.read_bytes() == src.read_bytes()
    return report


def test_safetensors_all_dtypes(tmp_path) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 70, generator=g) * 0.02
    tensors = {
        "f32": w,
        "bf16": w.to(torch.bfloat16),
        "f16": w.to(torch.float16),
        "i8": torch.randint(-128, 127, (513,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (7, 3), dtype=torch.uint8, generator=g),
        "i64": torch.arange(77),
        "bool": torch.rand(99, generator=g) < 0.5,
        "f64": torch.randn(5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt"})
    report = roundtrip(src, tmp_path, chunk_size=8192, threads=2)
    assert report.ratio < 0.95
    assert report.n_regions == 9  # the empty tensor has no bytes


def test_onnx_roundtrip(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_model(), torch.randn(1, 16), str(src), dynamo=False)
    report = roundtrip(src, tmp_path)
    assert report.n_regions == 4


def test_onnx_helper_model_with_constant_and_fp16(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((8, 8)) * 0.1).astype(np.float16), "w")
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((8,), np.float32), "cv"))
    cast = helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT)
    mm = helper.make_node("MatMul", ["x", "wf"], ["y0"])
    add = helper.make_node("Add", ["y0", "c"], ["y"])
    graph = helper.make_graph(
        [c, cast, mm, add],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[w],
    )
    model = helper.make_model(graph)
    src = tmp_path / "h.onnx"
    onnx.save(model, str(src))
    report = roundtrip(src, tmp_path)
    assert report.n_regions == 2
    assert {e.dtype for e in report.entries} >= {"float16", "float32"}


def test_torch_save_roundtrip_is_byte_identical(tmp_path) -> None:
    sd = tiny_model().state_dict()
    sd["half"] = torch.randn(100).half()
    sd["codes"] = torch.randint(-8, 8, (64,), dtype=torch.int8)
    src = tmp_path / "stage.pt"
    torch.save(sd, src)
    report = roundtrip(src, tmp_path)
    assert {e.dtype for e in report.entries} >= {"float32", "float16", "int8"}
    loaded = torch.load(tmp_path / "restored.pt", weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_unknown_type_and_bad_files(tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("hi")
    with pytest.raises(InputError, match=r"supported: \.onnx, \.pt, \.pth, \.safetensors"):
        pack_file(txt)
    with pytest.raises(InputError, match="no such file"):
        pack_file(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="not a valid ONNX"):
        pack_file(bad)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10" * 8)
    with pytest.raises(InputError, match="safetensors"):
        pack_file(bad_st)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="torch.save"):
        pack_file(bad_pt)


def test_unpack_detects_damage(tmp_path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(2000)}, str(src))
    packed = tmp_path / "m.czip"
    pack_file(src, packed)
    data = bytearray(packed.read_bytes())
    data[100] ^= 1
    packed.write_bytes(data)
    with pytest.raises(CorruptArchiveError, match="chunk 0"):
        unpack_file(packed, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_functions(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(5000) * 0.02}, str(src))
    assert pack(src, None, 3, 1) == 0
    assert "ratio" in capsys.readouterr().out
    restored = tmp_path / "r.safetensors"
    assert unpack(tmp_path / "m.safetensors.czip", restored) == 0
    assert restored.read_bytes() == src.read_bytes()
    with pytest.raises(InputError):
        pack(tmp_path / "nope.safetensors", None, 3, None)


def test_unpack_checks_the_crc_and_still_reads_sha256_containers(tmp_path) -> None:
    """New containers carry a CRC-32 of the original file; containers written before it
    carry a SHA-256, still checked. A wrong value is refused, and no output appears."""
    import hashlib

    from safetensors.torch import save_file

    from tests.lossless.test_file_safety import hostile

    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64), "i": torch.arange(100, dtype=torch.int8)}, str(src))
    packed = tmp_path / "m.czip"
    pack_file(src, packed)
    good = packed.read_bytes()
    with ContainerReader(packed) as r:
        source = dict(r.meta["source"])
    assert "sha256" not in source and isinstance(source["crc32"], int)

    sha = hashlib.sha256(src.read_bytes()).hexdigest()

    def old_style(m):
        del m["meta"]["source"]["crc32"]
        m["meta"]["source"]["sha256"] = sha

    packed.write_bytes(hostile(good, old_style))
    assert unpack_file(packed, tmp_path / "old.safetensors").read_bytes() == src.read_bytes()

    for key, bad in (("crc32", source["crc32"] ^ 1), ("sha256", "0" * 64)):

        def wrong(m, key=key, bad=bad):
            m["meta"]["source"].pop("crc32")
            m["meta"]["source"][key] = bad

        packed.write_bytes(hostile(good, wrong))
        name = "CRC-32" if key == "crc32" else "SHA-256"
        with pytest.raises(CorruptArchiveError, match=f"does not match the original's size/{name}"):
            unpack_file(packed, tmp_path / "bad.safetensors")
        assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("direct_fails", [False, True])
def test_aligned_writer_writes_exact_bytes(tmp_path, monkeypatch, direct_fails) -> None:
    """The container's and unpack's writer: pieces of any size, full blocks written in
    the background, a last block that is not aligned (padded, then cut), and the plain
    fallback where a file system refuses direct writes."""
    import errno
    import os

    from compress.lossless import container

    if direct_fails:

        def refuse(*args):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(container.os, "pwrite", refuse)
    block = container.AlignedWriter.BLOCK
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 3 * block + 3 * 12_345, dtype=np.uint8)
    path = tmp_path / "out.bin"
    with open(path, "wb") as f:
        w = container.AlignedWriter(f)
        pos = 0
        for size in (1, 4095, 12_345, block, block + 7, 10**9):
            w.write(memoryview(data[pos : pos + size]))
            pos += size
        w.close()
        w.close()
        assert w.fd is None
    assert os.path.getsize(path) == data.size
    assert path.read_bytes() == data.tobytes()


def test_a_background_write_error_fails_the_container(tmp_path, monkeypatch) -> None:
    """A block written in the background that fails (a full disk) is reported by the
    writer as an OutputError naming the file, and no file is left."""
    import errno

    from compress.artifacts import OutputError
    from compress.lossless import container

    real = container.os.pwrite

    def full_after_first_block(fd, data, at):
        if at >= container.AlignedWriter.BLOCK:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, at)

    monkeypatch.setattr(container.os, "pwrite", full_after_first_block)
    noise = np.random.default_rng(0).integers(0, 256, 5 * container.AlignedWriter.BLOCK, dtype=np.uint8)
    with (
        pytest.raises(OutputError, match=r"cannot write .*x\.czip: No space left on device"),
        ContainerWriter(tmp_path / "x.czip", threads=1) as w,
    ):
        w.add_blob("noise", noise.tobytes())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("direct_fails", [False, True])
def test_aligned_writer_reserve_commit_and_checksum(tmp_path, monkeypatch, direct_fails) -> None:
    """Chunks decoded straight into the writer's blocks (reserve/commit, several
    outstanding at once as decoding threads hold them), mixed with copied writes and with
    chunks too large for a block's slack, land in order; the running CRC-32 is the
    file's; with O_DIRECT refused everything goes through the plain file."""
    import errno
    import os
    import zlib

    from compress.lossless import container

    if direct_fails:

        def refuse(*args):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(container.os, "pwrite", refuse)
    W = container.AlignedWriter
    rng = np.random.default_rng(1)
    sizes = [1, 4095, 3 << 20, 1 << 20, 12_345, W.SLACK + W.BLOCK + 1, 7, *([1 << 20] * 20), 99_999]
    data = rng.integers(0, 256, sum(sizes), dtype=np.uint8)
    path = tmp_path / "out.bin"
    busy = fallback = 0
    with open(path, "wb") as f:
        w = W(f, checksum=True)
        pos, held = 0, []  # (view, source slice) reserved, not yet committed
        for i, n in enumerate(sizes):
            piece = data[pos : pos + n]
            pos += n
            if i in (4, 25):  # a copied write: everything outstanding goes first
                for view, src in held:
                    view[:] = src
                    w.commit(view)
                held = []
                w.write(memoryview(piece))
                continue
            dest = w.reserve(n)
            while dest is W.BUSY:
                busy += 1
                view, src = held.pop(0)
                view[:] = src
                w.commit(view)
                dest = w.reserve(n)
            if dest is None:
                fallback += 1
                assert not held  # None only with nothing outstanding
                w.commit(piece.copy())
                continue
            held.append((dest, piece))
            if len(held) > 3:
                view, src = held.pop(0)
                view[:] = src
                w.commit(view)
        for view, src in held:
            view[:] = src
            w.commit(view)
        w.close()
    assert path.read_bytes() == data.tobytes()
    assert w.crc == zlib.crc32(data.tobytes())
    assert os.path.getsize(path) == data.size
    if not direct_fails:
        assert busy > 0 and fallback == 1  # both paths were taken
