"""8-bit activation quantization as onnxruntime runs it, simulated in PyTorch.

Shared by the quantize stage (GPFQ sees quantized inputs in X̃) and the export stage (the
PyTorch reference that onnxruntime's integer kernels are checked against). Activations are
unsigned 8-bit per tensor with a zero point, the range always holding 0.
``spec`` is ``state.extras["activation_quantization"]``: ``{"mode": "dynamic" | "static",
"bits": 8, "layers": {"<layer>.weight": {"input": [lo, hi], "output": [lo, hi]}}}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# The state.extras key the quantize stage writes the activation quantization under.
ACTIVATIONS_KEY = "activation_quantization"


def uint8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of the unsigned 8-bit grid over ``[lo, hi]`` (widened to hold 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if scale <= 0:
        return 1.0, 0
    zero_point = round(-lo / scale)
    return scale, min(max(zero_point, 0), 255)


def fake_quantize_static(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x`` rounded to the unsigned 8-bit grid of ``[lo, hi]`` (QuantizeLinear → DequantizeLinear)."""
    scale, zp = uint8_qparams(lo, hi)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return (q - zp) * scale


def fake_quantize_dynamic(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as onnxruntime's ``DynamicQuantizeLinear`` does, one range per sample
    (an edge device runs one sample at a time)."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(1).values.clamp_max(0)
    hi = flat.max(1).values.clamp_min(0)
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    zp = torch.round(-lo / scale).clamp(0, 255)
    shape = (-1,) + (1,) * (x.dim() - 1)
    scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return (q - zp) * scale


@contextlib.contextmanager
def quantized_inputs(model: nn.Module, spec: dict | None) -> Iterator[None]:
    """While active, the quantized layers of ``model`` see 8-bit inputs as onnxruntime gives them.

    ``spec`` is ``state.extras["activation_quantization"]`` (None or mode ``none``: nothing
    changes). GPFQ runs its quantized network under this, so its inputs X̃ carry the
    activation quantization error, as the method intends.
    """
    if not spec or spec.get("mode", "none") == "none":
        yield
        return
    modules = dict(model.named_modules())
    handles = []
    for pname, ranges in spec["layers"].items():
        layer = modules.get(pname.rsplit(".", 1)[0])
        if layer is None:
            continue
        if spec["mode"] == "dynamic":

            def pre_dynamic(_m, args):
                return (fake_quantize_dynamic(args[0]), *args[1:])

            pre = pre_dynamic
        else:
            lo, hi = ranges["input"]

            def pre_static(_m, args, lo=lo, hi=hi):
                return (fake_quantize_static(args[0], lo, hi), *args[1:])

            pre = pre_static

        handles.append(layer.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
