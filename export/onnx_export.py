"""Float ONNX export and the onnxruntime checks that go with it.

Export and validation are one motion (as in timm's ``onnx_export(check=True)``): the
ONNX checker with full check, then onnxruntime CPU inference compared with PyTorch, then
latency. onnx / onnxruntime are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.metrics import model_size

if TYPE_CHECKING:
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
    tmp = path.with_name(path.name + ".tmp")
    weight_bytes = model_size(module)["dense_bytes"]
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
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
                )
            assert program is not None  # dynamo=True always returns an ONNXProgram (None is the legacy path's)
            program.save(str(tmp), external_data=external)
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

        model = version_converter.convert_version(onnx.load(str(tmp)), opset)
        onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return onnx.load(str(path))


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
