"""What a model file or artifact holds: tensors, shapes, dtypes, sparsity, size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import InputError


def _tensor_row(name: str, shape, dtype: str, numel: int, nonzero: int) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(shape),
        "dtype": dtype,
        "numel": numel,
        "nonzero": nonzero,
        "sparsity": 1 - nonzero / numel if numel else 0.0,
    }


def inspect_path(path: Path, trust_model: bool = False) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"not found: {path}")
    if path.is_dir():
        return _inspect_stage_folder(path)
    if path.suffix == ".onnx":
        return _inspect_onnx(path)
    with open(path, "rb") as f:
        if f.read(8) == b"\x89CZIP\r\n\x1a":
            return _inspect_container(path)
    return _inspect_torch(path, trust_model)


def _summarise(path: Path, kind: str, rows: list[dict], extra: dict | None = None) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return {
        "path": str(path),
        "kind": kind,
        "file_bytes": size,
        "tensors": rows,
        "parameters": sum(r["numel"] for r in rows),
        "nonzeros": sum(r["nonzero"] for r in rows),
        "extra": extra or {},
    }


def _torch_rows(tensors: dict) -> list[dict]:
    import torch

    return [
        _tensor_row(n, t.shape, str(t.dtype).replace("torch.", ""), t.numel(), int(torch.count_nonzero(t)))
        for n, t in tensors.items()
        if isinstance(t, torch.Tensor)
    ]


def _inspect_torch(path: Path, trust_model: bool) -> dict[str, Any]:
    from compress.errors import ModelLoadError
    from compress.model_io import _is_torchscript, load_model

    if _is_torchscript(path):
        loaded = load_model(path, None, {}, trust_model)
        return _summarise(path, "TorchScript", _torch_rows(loaded.module.state_dict()))
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        loaded = load_model(path, None, {}, trust_model)  # raises the same clear errors as `run`
        return _summarise(path, "pickled nn.Module", _torch_rows(loaded.module.state_dict()))
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _summarise(path, "state_dict", _torch_rows(obj))
    raise ModelLoadError(f"{path}: not a model file this tool reads (found {type(obj).__name__})")


def _inspect_stage_folder(path: Path) -> dict[str, Any]:
    import torch

    from compress.model_io import EXTRAS_FILE, MODEL_FILE, STATE_FILE

    if not (path / MODEL_FILE).is_file():
        raise InputError(f"{path} is not a stage folder (no {MODEL_FILE})")
    from compress.errors import ModelLoadError

    current = path / MODEL_FILE
    try:
        sd = torch.load(current, map_location="cpu", weights_only=True)
        current = path / EXTRAS_FILE
        extras = torch.load(current, map_location="cpu", weights_only=True) if current.is_file() else {}
        current = path / STATE_FILE
        meta = json.loads(current.read_text()) if current.is_file() else {}
        quant = extras.get("quant", {})
        extra = {
            "lineage": " -> ".join(e["stage"] for e in meta.get("lineage", [])) or "-",
            "quantized": ", ".join(f"{n} ({q['bits']} bit {q.get('method', '')})" for n, q in quant.items()) or "none",
            "masked": ", ".join(extras.get("masks", {})) or "none",
        }
        rows = _torch_rows(sd)
    except Exception as err:  # a truncated or edited file: say which, not torch's internals
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelLoadError(
            f"{current}: corrupt or not a stage file ({first}); re-run the stage to rebuild it"
        ) from None
    return _summarise(path, "stage folder", rows, extra)


def _inspect_container(path: Path) -> dict[str, Any]:
    """A packed file: entries with their dtypes, shapes and coded sizes (nothing decoded)."""
    from compress.lossless.container import ContainerReader

    with ContainerReader(path) as reader:
        rows = []
        for name in reader.names():
            e = reader.entry(name)
            numel = 1
            for d in e.shape:
                numel *= d
            row = _tensor_row(name, e.shape, e.dtype if e.kind != "blob" else "blob", numel, numel)
            row["sparsity"] = 0.0  # not decoded: zeros are unknown without decoding
            row["stored_bytes"] = e.stored_bytes
            rows.append(row)
        meta = reader.meta
    raw = sum(reader.entry(n).nbytes for n in reader.names())
    stored = sum(r["stored_bytes"] for r in rows)
    # meta is free-form JSON written by whoever made the file: show it, never trust its types
    bundle_meta = meta.get("extra")
    is_bundle = isinstance(bundle_meta, dict) and bundle_meta.get("kind") == "compress-device-bundle"
    kind = "device bundle" if is_bundle else "packed file"
    extra = {"coded": f"{raw:,} B -> {stored:,} B (ratio {stored / max(raw, 1):.4f})"}
    source = meta.get("source")
    if isinstance(source, dict):
        size = source.get("size")
        size_text = f"{size:,} B" if isinstance(size, int) and not isinstance(size, bool) else "size unknown"
        extra["packs"] = f"{str(source.get('name'))[:200]} ({str(source.get('format'))[:40]}, {size_text})"
    return _summarise(path, kind, rows, extra)


def _inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as err:
        raise InputError(f"{path}: not a readable ONNX model ({err})") from None
    rows = []
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        rows.append(
            _tensor_row(
                init.name,
                arr.shape,
                onnx.TensorProto.DataType.Name(init.data_type).lower(),
                arr.size,
                int((arr != 0).sum()),
            )
        )
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    extra = {
        "opset": ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import),
        "inputs": ", ".join(i.name for i in model.graph.input),
        "ops": ", ".join(f"{k}x{v}" for k, v in sorted(ops.items())),
    }
    return _summarise(path, "ONNX model", rows, extra)
