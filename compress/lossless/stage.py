"""The ``compress`` stage: pack the model state losslessly into ``<out_dir>/weights.czip``.

Entry names in the container (``<p>`` is a parameter or buffer name of the module):

* ``param/<p>`` - every state_dict tensor that is not quantized, coded by its dtype.
* ``quant/<p>/codes`` - integer codes; packed two per byte (layout ``i4``/``u4``) when
  ``bits <= 4``. ``quant/<p>/scale``, ``/zero_point``, ``/codebook``,
  ``/codebook_of_row`` - the side tensors that exist. The float weight of a quantized
  parameter is NOT stored: it is ``QuantizedTensor.dequantize()`` of the above.
* ``mask/<p>`` - pruning masks, bit-packed. Written first: the codes of a masked
  quantized parameter are stored only where its mask is set (the pruned positions all
  hold one code, kept as the entry's ``fill``), so the mask is paid for once.
* Tied tensors (two state_dict names over one storage, e.g. shared embeddings) are one
  entry; the other name is an ``alias`` entry, and reading restores them as one tensor.

The manifest's ``meta`` holds ``{"kind": "state", "quant": {<p>: {"bits", "method"}}}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.lossless.config import CompressStageConfig
from compress.lossless.container import (
    ContainerReader,
    ContainerWriter,
    CorruptArchiveError,
)
from compress.qtensor import quantized_from_dict
from compress.state import ModelState, StageContext

log = logging.getLogger(__name__)

_TORCH_TO_CODEC = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _TORCH_TO_CODEC[getattr(torch, _name)] = _name
_CODEC_TO_TORCH = {v: k for k, v in _TORCH_TO_CODEC.items()}


def tensor_to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A numpy copy of ``t``'s exact bits and the codec dtype name."""
    dtype = _TORCH_TO_CODEC.get(t.dtype)
    if dtype is None:
        raise TypeError(f"dtype {t.dtype} is not supported by the lossless codec")
    t = t.detach().cpu().contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16).copy(), dtype
    if dtype.startswith("float8"):
        return t.view(torch.uint8).numpy().copy(), dtype
    return t.numpy().copy(), dtype


def numpy_to_tensor(a: np.ndarray, dtype: str) -> torch.Tensor:
    target = _CODEC_TO_TORCH[dtype]
    a = a.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if dtype.startswith("float8"):
        return torch.from_numpy(a).view(target)
    return torch.from_numpy(a)


def _add(w: ContainerWriter, name: str, t: torch.Tensor, layout: str | None = None, meta: dict | None = None):
    arr, dtype = tensor_to_numpy(t)
    return w.add_tensor(name, arr, dtype=dtype, layout=layout, meta=meta)


def _storage_key(t: torch.Tensor) -> tuple:
    """Equal for two names of one tensor (same storage, offset, shape, strides, dtype)."""
    if t.device.type == "meta" or t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def pack_state(state: ModelState, path: Path, config: CompressStageConfig) -> dict[str, Any]:
    """Write the state's tensors to ``path``; returns the metrics the stage records."""
    quant_meta = {name: {"kind": qt.kind, "bits": qt.bits, "method": qt.method} for name, qt in state.quant.items()}
    per_tensor: dict[str, dict[str, Any]] = {}
    tensors = state.module.state_dict(keep_vars=True)
    # A second name of a quantized tensor (a tied output projection) is stored as a reference
    # to the quantized one, whose dequantized value it holds: one copy, as in the ONNX file.
    quantized_storage = {_storage_key(tensors[n]): n for n in state.quant if n in tensors}
    tied_to_quant = {
        name: quantized_storage[_storage_key(t)]
        for name, t in tensors.items()
        if name not in state.quant and _storage_key(t) in quantized_storage
    }
    with ContainerWriter(
        path,
        level=config.level,
        chunk_size=config.chunk_size,
        threads=config.threads,
        meta={"kind": "state", "quant": quant_meta, "tied_to_quant": tied_to_quant},
    ) as w:
        for name, mask in state.masks.items():
            arr, _ = tensor_to_numpy(mask.to(torch.bool))
            st = w.add_mask(f"mask/{name}", arr)
            per_tensor.setdefault(name, {"raw_bytes": 0, "packed_bytes": 0})
            per_tensor[name]["mask_packed_bytes"] = st.stored_bytes
        stored_at: dict[tuple, str] = {}
        for name, t in tensors.items():
            if name in state.quant or name in tied_to_quant:
                continue
            t = t.detach()
            key = _storage_key(t)
            if key in stored_at:  # tied: one storage under two names
                st = w.add_alias(f"param/{name}", stored_at[key])
            else:
                st = _add(w, f"param/{name}", t)
                stored_at[key] = f"param/{name}"
            row = per_tensor.setdefault(name, {"raw_bytes": 0, "packed_bytes": 0})
            row["raw_bytes"] += st.raw_bytes
            row["packed_bytes"] += st.stored_bytes
        for name, qt in state.quant.items():
            raw = packed = 0
            codes_layout = None
            if qt.bits <= 4:
                codes_layout = "u4" if qt.codes_dtype == torch.uint8 else "i4"
            # The codes unpacked (the container codes them itself), then the side tensors.
            side = {k: v for k, v in qt.to_dict().items() if isinstance(v, torch.Tensor) and k != "packed"}
            parts = {"codes": qt.codes, **side}
            mask_entry = f"mask/{name}" if name in state.masks and state.masks[name].numel() == qt.numel else None
            for part, t in parts.items():
                if t is None:
                    continue
                if part == "codes":
                    arr, dtype = tensor_to_numpy(t)
                    st = w.add_tensor(f"quant/{name}/codes", arr, dtype=dtype, layout=codes_layout, mask=mask_entry)
                else:
                    st = _add(w, f"quant/{name}/{part}", t)
                raw += st.raw_bytes
                packed += st.stored_bytes
            row = per_tensor.setdefault(name, {"raw_bytes": 0, "packed_bytes": 0})
            row.update(raw_bytes=raw, packed_bytes=row["packed_bytes"] + packed, bits=qt.bits)
        for name in state.masks:
            per_tensor[name]["packed_bytes"] += per_tensor[name]["mask_packed_bytes"]
        entry_bytes = sum(s.stored_bytes for s in w.stats)
    for v in per_tensor.values():
        v["ratio"] = v["packed_bytes"] / v["raw_bytes"] if v["raw_bytes"] else None
    params = dict(state.module.named_parameters())
    dense = sum(p.numel() * 4 for p in params.values())
    nonzeros = 0
    for name, p in params.items():
        value = state.quant[name].dequantize() if name in state.quant else p.detach()
        if name in state.masks:
            value = value * state.masks[name].to(value.dtype)
        nonzeros += int(torch.count_nonzero(value))
    packed = path.stat().st_size
    return {
        "file": str(path),
        "dense_bytes": dense,
        "packed_bytes": packed,
        "entry_bytes": entry_bytes,
        "ratio": packed / dense if dense else None,
        "nonzeros": nonzeros,
        "n_params": sum(p.numel() for p in params.values()),
        "per_tensor": per_tensor,
    }


def apply(state: ModelState, config: CompressStageConfig, ctx: StageContext) -> ModelState:
    """Pack ``state`` into ``ctx.out_dir / config.filename``; the state is returned unchanged.

    Records in ``ctx.metrics``: ``dense_bytes`` (float32 size of all parameters),
    ``packed_bytes`` (container size), ``ratio`` (packed / dense), ``nonzeros`` (non-zero
    parameter values after masks and quantization), ``per_tensor`` (raw/packed bytes and
    ratio per parameter) and ``file``.
    """
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(ctx.out_dir) / config.filename
    metrics = pack_state(state, path, config)
    ctx.metrics.update(metrics)
    ctx.artifacts[config.filename] = path
    ctx.log.info(
        "packed %d parameters: %d dense bytes -> %d bytes (ratio %.4f) in %s",
        metrics["n_params"],
        metrics["dense_bytes"],
        metrics["packed_bytes"],
        metrics["ratio"] or 0.0,
        path,
    )
    return state


def unpack_state_tensors(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a stage container back.

    Returns:
        ``{"params": {name: Tensor}, "quant": {name: QuantizedTensor}, "masks": {name: bool Tensor}}``
        with every tensor bit-identical to what was packed.
    """
    params: dict[str, torch.Tensor] = {}
    quant_parts: dict[str, dict[str, Any]] = {}
    masks: dict[str, torch.Tensor] = {}
    with ContainerReader(path) as r:
        if r.meta.get("kind") != "state":
            raise CorruptArchiveError(f"{path}: not a model-state container")
        qmeta = r.meta.get("quant", {})
        tied = r.meta.get("tied_to_quant", {})
        loaded: dict[str, torch.Tensor] = {}
        for entry_name in r.names():
            e = r.entry(entry_name)
            if e.alias_of is not None and e.alias_of in loaded:
                t = loaded[e.alias_of]  # tied tensors come back as one tensor
            else:
                t = numpy_to_tensor(r.read_tensor(entry_name), e.dtype)
                loaded[entry_name] = t
            group, _, rest = entry_name.partition("/")
            if group == "param":
                params[rest] = t
            elif group == "mask":
                masks[rest] = t
            elif group == "quant":
                pname, _, part = rest.rpartition("/")
                quant_parts.setdefault(pname, {})[part] = t
    quant = {}
    for pname, parts in quant_parts.items():
        info = qmeta.get(pname, {}) if isinstance(qmeta, dict) else {}
        try:
            fields = {"bits": int(info["bits"]), "method": str(info.get("method", "")), **parts}
            if "kind" in info:
                fields["kind"] = info["kind"]
            quant[pname] = quantized_from_dict(fields)
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptArchiveError(f"{path}: quantized tensor {pname!r} is inconsistent: {err}") from None
    if not isinstance(tied, dict) or not all(isinstance(v, str) and v in quant for v in tied.values()):
        raise CorruptArchiveError(f"{path}: 'tied_to_quant' names a quantized tensor the container lacks")
    shared: dict[str, torch.Tensor] = {}
    for name, source in tied.items():  # tied to a quantized tensor: one value under both names
        if source not in shared:
            shared[source] = quant[source].dequantize()
        params[str(name)] = shared[source]
    return {"params": params, "quant": quant, "masks": masks}
