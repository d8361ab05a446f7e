"""Float ONNX export and the onnxruntime checks that go with it.

Export and validation are one motion (as in timm's ``onnx_export(check=True)``): the
ONNX checker with full check, then onnxruntime CPU inference compared with PyTorch, then
latency. onnx / onnxruntime are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from torch import nn

from compress.metrics import model_size

if TYPE_CHECKING:
    import onnx

    from compress.onnx_signature import OnnxSignature

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
# Protobuf refuses messages above 2 GiB; stay well under it before switching to external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def export_onnx(
    module: nn.Module,
    example_input: torch.Tensor,
    path: Path,
    opset: int = 21,
    exporter: str = "dynamo",
    dynamic_batch: bool = True,
    signature: OnnxSignature | None = None,
):
    """Export ``module`` to ``path`` and return the loaded ``onnx.ModelProto``.

    Weights are embedded unless the model is too large for one protobuf, in which case
    they go to ``<path>.data`` beside it. Initializer names equal the PyTorch parameter
    names where the exporter keeps them (a Linear on 2-D inputs; a Linear on sequences
    becomes MatMul over a folded, transposed copy that the quantized rewrite finds by
    value). The write is atomic.

    Args:
        module: the model (eval mode is set).
        example_input: a batch of pipeline samples (``dynamic_batch`` needs 2 or more).
        path: the ONNX file to write.
        opset: ONNX opset.
        exporter: ``dynamo`` or ``legacy``.
        dynamic_batch: make the batch axis dynamic (default signature only).
        signature: export ``signature.module`` with its named inputs and dynamic axes instead
            of ``module`` with one input named ``input`` (see ``compress.onnx_signature``).
    """
    import onnx

    module = module.eval()
    dyn: tuple[dict[int, object] | None, ...] | None
    legacy_axes: dict[str, dict[int, str]] | None
    if signature is not None:
        module = signature.module.eval()
        args = tuple(signature.split(example_input))
        input_names = list(signature.input_names)
        axes = signature.dynamic_axes
        dims: dict[str, object] = {}
        dyn = tuple(
            {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in axes.get(inp, {}).items()} or None
            for inp in input_names
        )
        legacy_axes = {n: dict(a) for n, a in axes.items()}
        first_axes = axes.get(input_names[0], {})
        if 0 in first_axes:
            legacy_axes[OUTPUT_NAME] = {0: first_axes[0]}
    else:
        args = (example_input,)
        input_names = [INPUT_NAME]
        dyn = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        legacy_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    weight_bytes = model_size(module)["dense_bytes"]
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    # Exported into a private folder beside ``path`` under the final file name, so the data
    # file's recorded location is already ``<path.name>.data``: publishing is two renames,
    # never a copy of the weights.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        tmp = staging / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                with _quiet_dynamo_logs():
                    program = torch.onnx.export(
                        module,
                        args,
                        dynamo=True,
                        input_names=input_names,
                        output_names=[OUTPUT_NAME],
                        dynamic_shapes=dyn,
                        optimize=True,
                        verbose=False,
                        # at the recipe's opset directly: converting afterwards loaded the
                        # whole model (an embedded 614 MB model peaked 3 GB above the export)
                        opset_version=opset,
                    )
                assert program is not None  # dynamo=True always returns an ONNXProgram (None is the legacy path's)
                program.save(str(tmp), external_data=external)
                del program  # the exporter's graph holds references to every weight
            else:
                torch.onnx.export(
                    module,
                    args,
                    str(tmp),
                    opset_version=opset,
                    dynamo=False,
                    input_names=input_names,
                    output_names=[OUTPUT_NAME],
                    dynamic_axes=legacy_axes,
                )
        model = onnx.load(str(tmp), load_external_data=False)
        if exporter == "dynamo" and model.opset_import[0].version != opset:
            from onnx import version_converter

            # External tensors stay references: the converter rewrites nodes, not weights.
            model = version_converter.convert_version(model if external else onnx.load(str(tmp)), opset)
            strip_exporter_metadata(model)
            save_onnx(model, tmp, base_dir=staging, external=external)
        elif strip_exporter_metadata(model) or (external and external_locations(model) != {data_file_name(path)}):
            save_onnx(model, tmp, base_dir=staging, external=external)  # e.g. the legacy exporter's file per tensor
        if (staging / data_file_name(path)).is_file():
            os.replace(staging / data_file_name(path), path.parent / data_file_name(path))
        else:  # embedded (or every tensor too small to move out)
            _remove_stale_data(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return onnx.load(str(path), load_external_data=False)


def strip_exporter_metadata(model: onnx.ModelProto) -> bool:
    """Drop what the exporter records per node for debugging (``metadata_props``: the FX
    node, module path, class hierarchy and Python stack trace; ``doc_string``), in every
    graph and function of ``model``; True when there was any.

    It is not the model: it names the build machine's files and grew the quickstart's
    43 KB ONNX file by 11 KB. onnxruntime never reads it.
    """
    found = False

    def nodes(items: Iterable[onnx.NodeProto]) -> None:
        nonlocal found
        for node in items:
            if len(node.metadata_props) or node.doc_string:
                found = True
                del node.metadata_props[:]
                node.doc_string = ""
            for attr in node.attribute:  # the bodies of If, Loop and Scan
                for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                    nodes(sub.node)

    nodes(model.graph.node)
    for function in model.functions:
        nodes(function.node)
    return found


def data_file_name(onnx_path: Path | str) -> str:
    """The name of the external-data file of ``onnx_path``: ``<name>.data`` beside it."""
    return Path(onnx_path).name + ".data"


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` is stored outside the protobuf."""
    return bool(external_locations(model))


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The external-data file names the tensors of ``model`` refer to."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors
    from onnx.external_data_helper import uses_external_data as external

    return {ExternalDataInfo(t).location for t in _get_all_tensors(model) if external(t)}


def onnx_files(path: Path) -> list[Path]:
    """``path`` and, when its weights are stored externally, the data file beside it."""
    data = path.with_name(data_file_name(path))
    return [path, data] if data.is_file() else [path]


def save_onnx(
    model: onnx.ModelProto, path: Path, base_dir: Path | None = None, external: bool | None = None
) -> list[Path]:
    """Write ``model`` to ``path`` (atomically), its weights in ``<path.name>.data`` when external.

    Tensors of ``model`` that already live in an external file (under ``base_dir``) are
    copied into the new data file piece by piece, and tensors held in memory are moved out
    one at a time, so memory stays at the graph plus one piece: a model over 2 GB is never
    held twice. The data file is written beside ``path`` under a temporary name and
    renamed before the model that refers to it; a source and the destination may be the
    same file.

    Args:
        model: the model. Modified: with external data, its tensors afterwards refer to the
            new data file and hold no bytes in memory.
        path: the ``.onnx`` file to write.
        base_dir: the folder the external references of ``model`` are relative to
            (default: ``path``'s folder).
        external: force external data on or off; None decides by size
            (``EXTERNAL_DATA_THRESHOLD``).

    Returns:
        The files written: ``[path]`` or ``[path, data file]``.
    """
    import onnx
    from onnx.external_data_helper import _get_initializer_tensors, load_external_data_for_model

    path = Path(path)
    base_dir = Path(base_dir) if base_dir is not None else path.parent
    inits = list(_get_initializer_tensors(model))
    if external is None:
        external = sum(_tensor_bytes(t) for t in inits) > EXTERNAL_DATA_THRESHOLD
    tmp = path.with_name(path.name + ".tmp")
    if not external:
        if uses_external_data(model):
            load_external_data_for_model(model, str(base_dir))  # below the threshold: fits in memory
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
        _remove_stale_data(path)
        return [path]
    data_name = data_file_name(path)
    data_tmp = path.with_name(data_name + ".tmp")
    try:
        with contextlib.ExitStack() as stack, open(data_tmp, "wb") as out:
            sources: dict[str, BinaryIO] = {}

            def source(location: str) -> BinaryIO:
                if location not in sources:
                    sources[location] = stack.enter_context(open(base_dir / location, "rb"))
                return sources[location]

            moved = sum(_externalize(t, out, base_dir, data_name, source) for t in inits)
        onnx.save(model, str(tmp))
        if not moved:  # every tensor is small enough to stay inline: no data file
            os.replace(tmp, path)
            _remove_stale_data(path)
            return [path]
        os.replace(data_tmp, path.with_name(data_name))
        os.replace(tmp, path)
    finally:
        data_tmp.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return [path, path.with_name(data_name)]


# Tensors under this many bytes stay inside the protobuf (onnx's own default).
EXTERNAL_MIN_TENSOR_BYTES = 1024
# Large tensors start on a page boundary, so onnxruntime can memory-map them.
PAGE_ALIGN = 4096
COPY_PIECE = 16 << 20


def _tensor_bytes(t: onnx.TensorProto) -> int:
    from onnx.external_data_helper import ExternalDataInfo
    from onnx.external_data_helper import uses_external_data as external

    if external(t):
        return int(ExternalDataInfo(t).length or 0)
    return len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()


def _externalize(
    t: onnx.TensorProto, out: BinaryIO, base_dir: Path, data_name: str, source: Callable[[str], BinaryIO]
) -> bool:
    """Append ``t``'s bytes to ``out`` and point ``t`` at them; False for a small tensor kept inline."""
    from onnx import TensorProto
    from onnx.external_data_helper import ExternalDataInfo
    from onnx.external_data_helper import uses_external_data as external

    if external(t):
        info = ExternalDataInfo(t)
        src_path = base_dir / info.location
        if not src_path.is_file():
            raise FileNotFoundError(f"tensor {t.name!r}: external data file {src_path} is missing")
        src = source(info.location)
        offset = int(info.offset or 0)
        length = int(info.length) if info.length is not None else src_path.stat().st_size - offset
        if offset + length > src_path.stat().st_size:
            raise ValueError(f"tensor {t.name!r}: {src_path} ends before the tensor's {length} bytes at {offset}")
        pieces = _read_pieces(src, offset, length)
    elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_TENSOR_BYTES:
        length = len(t.raw_data)
        pieces = iter((t.raw_data,))
    else:
        return False
    pos = out.tell()
    if length >= PAGE_ALIGN:
        pad = -pos % PAGE_ALIGN
        out.write(b"\0" * pad)
        pos += pad
    for piece in pieces:
        out.write(piece)
    del t.external_data[:]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", pos), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return True


def _read_pieces(f, offset: int, length: int):
    f.seek(offset)
    left = length
    while left:
        piece = f.read(min(left, COPY_PIECE))
        if not piece:
            raise ValueError("external data file shrank while reading")
        left -= len(piece)
        yield piece


def _remove_stale_data(path: Path) -> None:
    # A data file left by an earlier, larger export of the same name would be packed and
    # shipped with a model that no longer uses it.
    path.with_name(data_file_name(path)).unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_dynamo_logs():
    # The dynamo exporter prints progress lines and warns about torchvision ops; the
    # pipeline reports progress itself. The levels are restored afterwards, so a host
    # application that imports the library keeps its own logging settings.
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.onnx._internal.exporter._registration")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def check_model(path: Path) -> None:
    """The ONNX checker with full shape/type inference."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
