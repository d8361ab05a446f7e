"""The exported file holds the model and nothing of the machine that built it."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external data"])
def test_export_drops_the_exporters_debug_metadata(tmp_path, monkeypatch, external):
    """torch's dynamo exporter records each node's FX node, module path, class hierarchy and
    Python stack trace (with this checkout's file paths); none of it may ship."""
    import compress
    from compress.export import onnx_export
    from compress.export.onnx_export import export_onnx, strip_exporter_metadata
    from compress.zoo import digits_mlp

    if external:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    torch.manual_seed(0)
    module = digits_mlp(hidden=(32,)).eval()
    path = tmp_path / "m.onnx"
    model = export_onnx(module, torch.randn(2, 64), path)
    assert (tmp_path / "m.onnx.data").is_file() == external
    on_disk = onnx.load(str(path), load_external_data=False)
    for m in (model, on_disk):
        assert len(m.graph.node) >= 3
        assert not any(len(n.metadata_props) or n.doc_string for n in m.graph.node)
    checkout = str(Path(compress.__file__).resolve().parents[1]).encode()
    raw = path.read_bytes()
    assert checkout not in raw and b"stack_trace" not in raw
    assert not strip_exporter_metadata(on_disk)  # nothing left to strip

    # and the stripping reaches into subgraphs (If/Loop bodies) and functions
    inner = onnx.helper.make_node("Identity", ["x"], ["y"], doc_string="trace")
    inner.metadata_props.add(key="pkg.torch.onnx.stack_trace", value="File ...")
    body = onnx.helper.make_graph([inner], "body", [], [])
    outer = onnx.helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    g = onnx.helper.make_graph([outer], "g", [], [])
    fn = onnx.helper.make_function("local", "f", ["x"], ["y"], [onnx.NodeProto(doc_string="d")], [])
    hand = onnx.helper.make_model(g, functions=[fn])
    assert strip_exporter_metadata(hand)
    assert not strip_exporter_metadata(hand)
    assert not hand.graph.node[0].attribute[0].g.node[0].metadata_props and not hand.functions[0].node[0].doc_string
