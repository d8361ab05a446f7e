"""Per-channel input scaling of a Linear layer (SmoothQuant's mechanism), kept in the model.

SmoothQuant (Xiao et al. 2023) divides a layer's input channel ``j`` by ``s_j`` and
multiplies the weight's column ``j`` by ``s_j``: ``(x / s) · (W·diag(s))ᵀ = x · Wᵀ``, the same
function, but the input the 8-bit activation quantizer sees has its outlier channels
flattened, and the weight (quantized per output channel) absorbs them.

A smoothed layer is a plain ``nn.Linear`` holding the scaled weight, a buffer
``smooth_inv`` (``1/s``) and a forward pre-hook, registered first, that multiplies its input
by it. Every later hook (the fake activation quantizers, range observers, GPFQ's input
capture) and the ONNX export (a ``Mul`` before the ``MatMul``) therefore see the scaled
input the integer kernel gets. The buffer travels in the ``state_dict``; a reload puts the
hooks back with ``restore_smoothing``.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.grid import float16_ceil

BUFFER = "smooth_inv"


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] * getattr(module, BUFFER), *args[1:])


def is_smoothed(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, BUFFER, None), torch.Tensor)


def smooth_linear(layer: nn.Linear, scale: torch.Tensor) -> None:
    """Scale ``layer``'s weight columns by ``scale`` and its input by ``1/scale`` (in place).

    Smoothing an already smoothed layer composes the two scalings.
    """
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"smoothing applies to nn.Linear layers, got {type(layer).__name__}")
    scale = scale.detach().to(device=layer.weight.device, dtype=torch.float32)
    if scale.shape != (layer.in_features,) or not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError(f"smoothing scale must be {layer.in_features} positive finite values")
    # The input's factor 1/s is rounded to a float16 value (the export stores it in 2 bytes,
    # exactly) and the weight takes its exact reciprocal: the layer's function is unchanged.
    inv32 = float16_ceil(1.0 / scale)
    with torch.no_grad():
        layer.weight.mul_((1.0 / inv32).to(layer.weight.dtype))
    inv = inv32.to(layer.weight.dtype)
    if is_smoothed(layer):
        getattr(layer, BUFFER).mul_(inv)
        return
    layer.register_buffer(BUFFER, inv)
    layer.register_forward_pre_hook(_scale_input, prepend=True)


def restore_smoothing(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Before ``load_state_dict``: give the layers a saved state smoothed their buffer and hook.

    Returns the layer names restored.
    """
    restored = []
    suffix = "." + BUFFER
    for key, value in state_dict.items():
        if not key.endswith(suffix):
            continue
        name = key[: -len(suffix)]
        layer = module.get_submodule(name)
        if not is_smoothed(layer):
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"{key}: smoothing is saved for {name}, which is not an nn.Linear")
            layer.register_buffer(BUFFER, torch.ones_like(value))
            layer.register_forward_pre_hook(_scale_input, prepend=True)
            restored.append(name)
    return restored
