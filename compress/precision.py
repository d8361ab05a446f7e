"""Half-precision weights, float32 arithmetic: a bfloat16 checkpoint computed one layer at a time.

A 1 B-parameter checkpoint ships in bfloat16 (2 bytes per parameter) and the pipeline keeps
it so. But a CPU without bfloat16 instructions (AVX2, most edge and CI machines) multiplies
bfloat16 matrices several times slower than float32 ones (measured here: 5.4× for a
1024 × 2048 × 5632 product). ``float32_compute`` keeps the weights in their dtype and runs
every layer in float32: just before a layer computes, its half-precision parameters and
buffers are cast up (one layer's float32 copy at a time, dropped after it), and its
half-precision inputs with them; the activations downstream are float32.

Only passes without gradients are converted (evaluation, calibration): a training step
computes in the weights' own dtype, as PyTorch does. A layer that changes a buffer in its
forward (BatchNorm's running statistics) has the change written back in the buffer's dtype.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)


def _is_half_on_cpu(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype in HALF and t.device.type == "cpu"


def _half_of(module: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """The half-precision tensors ``module`` computes with: ``(tensor, is_buffer)``, each once."""
    seen: dict[int, tuple[torch.Tensor, bool]] = {}
    for p in module.parameters():
        if _is_half_on_cpu(p):
            seen.setdefault(id(p), (p, False))
    for b in module.buffers():
        if _is_half_on_cpu(b):
            seen.setdefault(id(b), (b, True))
    return list(seen.values())


def _up(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.dtype in HALF:
        return value.float()
    if isinstance(value, tuple | list):
        return type(value)(_up(v) for v in value)
    if isinstance(value, dict):
        return {k: _up(v) for k, v in value.items()}
    return value


class _Upcast:
    """Forward hooks of one layer: cast its subtree's half tensors up before it runs, back after.

    A layer is a module with half-precision tensors of its own (``Linear``, a norm, ``GRU``,
    ``MultiheadAttention``). Its whole subtree is cast, because some layers read a child's
    weight without calling the child (``MultiheadAttention.out_proj``); a child whose tensors
    its parent already cast finds nothing left to do.
    """

    def __init__(self) -> None:
        # per layer, a stack of (tensor, its original data, is a buffer) lists: one per open call
        self.saved: dict[int, list[list[tuple[torch.Tensor, torch.Tensor, bool]]]] = {}

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        cast: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self.saved.setdefault(id(module), []).append(cast)  # a stack: a layer may be re-entered
        if torch.is_grad_enabled():
            return None
        for t, is_buffer in _half_of(module):
            original = t.data
            t.data = original.float()
            cast.append((t, original, is_buffer))
        return _up(args), _up(kwargs)

    def post(self, module: nn.Module, _args: tuple, _kwargs: dict, _output: object) -> None:
        stack = self.saved.get(id(module))
        if not stack:
            return
        for t, original, is_buffer in stack.pop():
            if is_buffer:  # e.g. running statistics updated in the forward: keep the update
                original.copy_(t.data)
            t.data = original


@contextlib.contextmanager
def float32_compute(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s gradient-free forwards in float32, its weights kept in their dtype.

    Only tensors on the CPU are cast (a GPU computes half precision at full speed). A no-op
    for a model without half-precision tensors. The hooks travel with copies made
    inside the block (``copy.deepcopy`` keeps a module's hooks) and are removed on exit.
    """
    layers = [
        m for m in module.modules() if any(_is_half_on_cpu(t) for t in [*m._parameters.values(), *m._buffers.values()])
    ]
    if not layers:
        yield
        return
    upcast = _Upcast()
    handles = []
    for m in layers:
        handles.append(m.register_forward_pre_hook(upcast.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(upcast.post, with_kwargs=True, always_call=True))
    log.debug("float32 compute: %d half-precision layers", len(layers))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
