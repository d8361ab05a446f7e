"""Device bundles: one packed file with everything an edge device needs to validate.

A bundle is a lossless container (``docs/container-format.md``) holding the ONNX model
(weights coded by dtype, graph kept byte-exact; a model over 2 GB with its external-data
file, restored beside it), the reference inputs and the outputs the
pipeline's final PyTorch model gave on them, optional labels, and a manifest: the
onnxruntime session settings the model was checked with and the limits to check again.

Torch-free: only numpy, zstandard and the standard library, so it runs on the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import InputError

log = logging.getLogger(__name__)

BUNDLE_KIND = "compress-device-bundle"
BUNDLE_VERSION = 1


@dataclass
class Bundle:
    model: Path  # the restored ONNX file
    inputs: np.ndarray | dict[str, np.ndarray]  # one array, or one per named ONNX input
    outputs: np.ndarray
    labels: np.ndarray | None
    manifest: dict[str, Any] = field(default_factory=dict)


def write_bundle(
    onnx_path: Path,
    dst: Path,
    inputs: np.ndarray | dict[str, np.ndarray],
    outputs: np.ndarray,
    labels: np.ndarray | None = None,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """Pack ``onnx_path`` with its reference data into ``dst`` (atomic).

    ``inputs`` is one array fed to the model's single input, or a dict of arrays by ONNX
    input name (a model exported with named inputs, e.g. input_ids + attention_mask).
    A model with external data (``model.onnx.data`` beside it) is packed with its data file.
    """
    from compress.lossless.files import pack_file

    named = inputs if isinstance(inputs, dict) else None
    n = len(next(iter(named.values()))) if named else len(inputs)
    if (
        n != len(outputs)
        or (labels is not None and len(labels) != n)
        or (named and any(len(v) != n for v in named.values()))
    ):
        raise ValueError("inputs, outputs and labels must have the same number of samples")
    tensors = {f"input/{k}": v for k, v in inputs.items()} if isinstance(inputs, dict) else {"inputs": inputs}
    tensors["outputs"] = outputs
    if labels is not None:
        tensors["labels"] = labels
    meta = {"kind": BUNDLE_KIND, "version": BUNDLE_VERSION, **(manifest or {})}
    if named:
        meta["input_names"] = list(named)
    pack_file(onnx_path, dst, extra_tensors=tensors, extra_meta=meta)
    return dst


def is_bundle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89CZIP\r\n\x1a"


def open_bundle(path: Path, workdir: Path) -> Bundle:
    """Verify and unpack a bundle into ``workdir``.

    Raises:
        CorruptArchiveError: a checksum does not match (the bundle was damaged).
        InputError: the file is a packed file but not a device bundle.
    """
    from compress.lossless.container import ContainerReader, CorruptArchiveError
    from compress.lossless.files import unpack_file

    with ContainerReader(path) as reader:
        reader.verify()
        meta = reader.meta.get("extra")
        if not isinstance(meta, dict) or meta.get("kind") != BUNDLE_KIND:
            raise InputError(f"{path} is a packed file but not a device bundle (made by `compress run`)")
        if meta.get("version") != BUNDLE_VERSION:
            raise InputError(
                f"{path}: bundle version {meta.get('version')} is not supported (this reader: {BUNDLE_VERSION})"
            )
        names = set(reader.names())
        input_names = meta.get("input_names")
        wanted = {f"extra/input/{n}" for n in input_names} if isinstance(input_names, list) else {"extra/inputs"}
        missing = (wanted | {"extra/outputs"}) - names
        if missing:
            raise CorruptArchiveError(f"{path}: bundle lacks {', '.join(sorted(missing))}")
        inputs: np.ndarray | dict[str, np.ndarray]
        if isinstance(input_names, list):
            inputs = {n: reader.read_tensor(f"extra/input/{n}") for n in input_names}
        else:
            inputs = reader.read_tensor("extra/inputs")
        outputs = reader.read_tensor("extra/outputs")
        labels = reader.read_tensor("extra/labels") if "extra/labels" in names else None
    model = unpack_file(path, workdir / "model.onnx")
    return Bundle(model=model, inputs=inputs, outputs=outputs, labels=labels, manifest=meta)
