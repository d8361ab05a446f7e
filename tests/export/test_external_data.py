"""ONNX external data (models over 2 GB): export, parity, pack/unpack, bundle, validate.

The threshold is lowered to 0 so a digits MLP takes the same path a 1 B model does:
weights in ``model.onnx.data`` beside the graph.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import DIGITS_RECIPE


@pytest.fixture
def external_threshold(monkeypatch):
    """Every export writes external data."""
    from compress.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)


@pytest.fixture(scope="module")
def external_run(tmp_path_factory, digits_mlp_path):
    """One quantize (RTN int4) → export run whose ONNX keeps its weights in model.onnx.data."""
    from compress.export import onnx_export
    from compress.pipeline import run
    from compress.recipe import parse_recipe

    text = DIGITS_RECIPE.format(
        stages="  - quantize: {method: rtn, bits: 4}\n  - export: {latency_runs: 5, exact_quantized_kernels: true}",
        gates="  {}",
    )
    out = tmp_path_factory.mktemp("external") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
        result = run(parse_recipe(text, "external.yaml"), digits_mlp_path, out)
    assert result.passed, result.failures
    return out, result.report


def _data_refs(path: Path) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_float_export_writes_one_data_file_and_matches_torch(tmp_path, external_threshold, exporter):
    from compress.export.onnx_export import export_onnx
    from compress.runtime import ort_predict, ort_session
    from compress.zoo import digits_mlp

    torch.manual_seed(0)
    module = digits_mlp(hidden=(32,)).eval()
    x = torch.randn(8, 64)
    path = tmp_path / "m.onnx"
    model = export_onnx(module, x[:2], path, exporter=exporter)
    assert (tmp_path / "m.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no staging left over
    assert _data_refs(path) == {"m.onnx.data"}
    assert all(not t.raw_data for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    onnx.checker.check_model(str(path), full_check=True)
    got = ort_predict(ort_session(path), x.numpy())
    np.testing.assert_allclose(got, module(x).detach().numpy(), atol=1e-5, rtol=1e-4)


def test_pipeline_external_data_end_to_end(external_run, cli, tmp_path):
    out, report = external_run
    data = out / "model.onnx.data"
    assert data.is_file() and "model.onnx.data" in report["artifacts"]
    assert _data_refs(out / "model.onnx") == {"model.onnx.data"}
    export_row = report["stages"][-1]
    # the size the gate checks counts the data file: most of the bytes are in it
    assert export_row["final_size_bytes"] == (out / "model.onnx").stat().st_size + data.stat().st_size
    parity = {c["gate"]: c for c in report["checks"]}
    assert parity["onnx_parity_within_tolerance"]["passed"]
    assert not any(p.name.startswith("float_reference") for p in (out / "stages" / "02-export").iterdir())

    # compress pack / unpack: the pair comes back byte-identical
    code, stdout, _ = cli("pack", out / "model.onnx", tmp_path / "m.czip")
    assert code == 0, stdout
    restored = tmp_path / "restored"
    restored.mkdir()
    code, stdout, _ = cli("unpack", tmp_path / "m.czip", restored / "model.onnx")
    assert code == 0, stdout
    for name in ("model.onnx", "model.onnx.data"):
        assert (restored / name).read_bytes() == (out / name).read_bytes(), name
    # unpacking again refuses to overwrite the data file without --force
    (restored / "model.onnx").unlink()
    code, stdout, stderr = cli("unpack", tmp_path / "m.czip", restored / "model.onnx")
    assert code == 2 and "model.onnx.data" in stdout + stderr

    # the bundle carries the data file, and validate loads it (a fresh folder: nothing beside it)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "bundle.czip", alone / "bundle.czip")
    code, stdout, stderr = cli("validate", alone / "bundle.czip")
    assert code == 0, stdout + stderr


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_data_file_is_refused(external_run, cli, tmp_path, damage):
    out, _ = external_run
    model = tmp_path / "model.onnx"
    shutil.copy(out / "model.onnx", model)
    if damage == "truncated":
        blob = (out / "model.onnx.data").read_bytes()
        (tmp_path / "model.onnx.data").write_bytes(blob[: len(blob) // 2])
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32))
    for args in (("validate", model, "--data", data), ("pack", model, tmp_path / "m.czip")):
        code, stdout, stderr = cli(*args)
        message = stdout + stderr
        assert code == 2, (args, message)
        assert "model.onnx.data" in message and damage in message, message
        assert "Traceback" not in message
    assert not (tmp_path / "m.czip").exists()


def _tiny_external_model(folder: Path, location: str) -> Path:
    """A one-Add ONNX model whose 4x64 weight lives in the external file ``location``."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(4, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [w],
    )
    path = folder / "tiny.onnx"
    (folder / Path(location).parent).mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        helper.make_model(graph), str(path), save_as_external_data=True, location=location, size_threshold=0
    )
    return path


def test_pack_round_trip_of_a_hand_made_external_model(tmp_path):
    from compress.lossless.files import onnx_external_data, pack_file, unpack_file

    path = _tiny_external_model(tmp_path, "weights.bin")
    found = onnx_external_data(path)
    assert list(found) == ["weights.bin"] and found["weights.bin"][0].dtype == "float32"
    report = pack_file(path, tmp_path / "t.czip")
    assert report.src_bytes == path.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    unpack_file(tmp_path / "t.czip", out / "renamed.onnx")  # the data keeps the name the graph refers to
    assert (out / "renamed.onnx").read_bytes() == path.read_bytes()
    assert (out / "weights.bin").read_bytes() == (tmp_path / "weights.bin").read_bytes()


def test_data_file_outside_the_model_folder_is_refused(tmp_path):
    from compress.errors import InputError
    from compress.lossless.files import pack_file

    path = _tiny_external_model(tmp_path, "sub/weights.bin")
    with pytest.raises(InputError, match="not a file beside the model"):
        pack_file(path, tmp_path / "t.czip")


def test_save_onnx_moves_weights_in_and_out_of_the_data_file(tmp_path):
    """The quantized rewrite's two endings: still external (same data file name, rewritten in
    place) or embedded again once the integer model is under the threshold."""
    from compress.export.onnx_export import save_onnx

    src = _tiny_external_model(tmp_path, "tiny.onnx.data")
    want = np.arange(256, dtype=np.float32).reshape(4, 64)
    model = onnx.load(str(src), load_external_data=False)
    assert save_onnx(model, src, external=True) == [src, tmp_path / "tiny.onnx.data"]  # reads and writes one file
    assert _data_refs(src) == {"tiny.onnx.data"}
    assert not list(tmp_path.glob("*.tmp"))
    loaded = onnx.load(str(src))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), want)

    model = onnx.load(str(src), load_external_data=False)
    assert save_onnx(model, src, external=False) == [src]
    assert _data_refs(src) == set() and not (tmp_path / "tiny.onnx.data").exists()  # no stale data file
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(onnx.load(str(src)).graph.initializer[0]), want)
