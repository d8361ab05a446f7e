"""An opt-in ONNX signature for models whose pipeline input is not their natural input.

The pipeline hands every model ONE input tensor per sample (``model.input_shape``). A model
whose deployed form takes several named inputs (a text encoder: ``input_ids`` and
``attention_mask``, each with dynamic batch and sequence axes) defines a method
``onnx_signature()`` returning an ``OnnxSignature``; the export stage then exports
``signature.module`` under those names and axes, and feeds onnxruntime (parity, latency)
through ``signature.feeds``. Models without the method are exported as before: one input
named ``input`` with a dynamic batch axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


@dataclass
class OnnxSignature:
    """How to export a model under named inputs.

    Attributes:
        module: the module to export; its ``forward`` takes the named inputs positionally, in
            the order of ``input_names``. It must share its parameters with the model (wrap
            it, do not copy it): the quantized rewrite finds each parameter's initializer by
            identity, whatever prefix the wrapper adds to its name.
        input_names: the ONNX graph's input names.
        dynamic_axes: per input name, ``{axis: axis_name}`` of its dynamic axes; equal names
            are the same dimension (e.g. ``{0: "batch", 1: "sequence"}`` for both inputs).
        split: turns a batch of pipeline samples (a torch tensor or a numpy array, batch
            first) into one array per input name, in order. Must work on both types.
    """

    module: nn.Module
    input_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    split: Callable[[Any], tuple]

    def __post_init__(self) -> None:
        unknown = set(self.dynamic_axes) - set(self.input_names)
        if unknown:
            raise ValueError(
                f"dynamic_axes names inputs {sorted(unknown)} that are not in input_names {self.input_names}"
            )
        if len(set(self.input_names)) != len(self.input_names):
            raise ValueError(f"input_names must be unique, got {self.input_names}")

    def feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """onnxruntime feeds for a batch of pipeline samples ``x`` (numpy)."""
        import numpy as np

        parts = self.split(x)
        if len(parts) != len(self.input_names):
            raise ValueError(f"split() returned {len(parts)} arrays for inputs {self.input_names}")
        return {name: np.ascontiguousarray(p) for name, p in zip(self.input_names, parts)}


def onnx_signature_of(module: Any) -> OnnxSignature | None:
    """The module's ``OnnxSignature`` when it defines ``onnx_signature()``, else None.

    Raises:
        TypeError: ``onnx_signature()`` returned something else.
    """
    fn = getattr(module, "onnx_signature", None)
    if fn is None or not callable(fn):
        return None
    sig = fn()
    if not isinstance(sig, OnnxSignature):
        raise TypeError(
            f"{type(module).__name__}.onnx_signature() must return an OnnxSignature, got {type(sig).__name__}"
        )
    return sig
