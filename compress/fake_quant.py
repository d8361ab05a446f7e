"""8-bit activation quantization as onnxruntime runs it, simulated in PyTorch.

Shared by the quantize stage (GPFQ sees quantized inputs in X̃) and the export stage (the
PyTorch reference that onnxruntime's integer kernels are checked against). Activations are
unsigned 8-bit per tensor with a zero point, the range always holding 0.
``spec`` is ``state.extras["activation_quantization"]``: ``{"mode": "dynamic" | "static",
"bits": 8, "layers": {"<layer>.weight": {"input": [lo, hi], "output": [lo, hi]}}}``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import numpy as np
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


def int32_bias_step(act_scale: float, weight_scale) -> np.ndarray:
    """The step of a static layer's int32 bias, ``s_act · s_w`` per output channel (float32):
    onnxruntime's QDQ form. The quantize stage rounds the bias onto it, so the export's int32
    codes hold exactly the bias PyTorch runs."""
    return (act_scale * np.asarray(weight_scale, np.float32).astype(np.float64)).astype(np.float32)


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


# Ops that commute with the monotone 8-bit rounding (value-preserving rearrangements and
# MaxPool): a tensor rounded after them equals it rounded before. The export keeps one
# grid through them (``compress.export.fast_kernels.PASS_THROUGH``), so onnxruntime runs
# them on uint8 and the simulation may round once, where the next layer reads the tensor.
PASS_THROUGH_FUNCS = frozenset(
    {
        "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
        "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "flatten", "reshape", "view", "transpose", "permute", "squeeze", "unsqueeze", "contiguous",
    }
)  # fmt: skip
RELU_FUNCS = frozenset({"relu", "relu_"})
# Reads of a tensor's metadata: not a use of its values (the tensor stays pending).
META_FUNCS = frozenset({"__get__", "size", "dim", "numel", "stride", "is_contiguous", "__len__"})
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _StaticRounding:
    """Rounds a statically quantized model's tensors where its QDQ export rounds them.

    The export (``compress.export.fast_kernels.StaticQDQ``) gives each tensor one uint8 grid
    and every reader reads the rounded copy:

    * a quantized layer's input: the layer's calibrated input range;
    * a Conv's output: the first quantized layer reached through pass-through ops
      (``PASS_THROUGH_FUNCS``, a ReLU folded into the zero point) sets the grid; a ReLU
      right after the Conv is folded ([0, hi]); otherwise the Conv's own output range;
    * a residual ``Add`` of two rounded tensors (``out + x``): rounded only where a quantized
      layer reads it (through a ReLU and pass-through ops), on that layer's grid.

    Here a Conv's output is *pending*: it is rounded on its own grid when anything other
    than a ReLU, a pass-through op or a quantized layer reads it; a quantized layer rounds
    its input on its own grid (the export's grid for that tensor). A rounded tensor is
    substituted for its original in every later read (the skip path of a residual block
    reads the same uint8 tensor as the next Conv). Tensors are tracked by identity, each
    entry dropped when its tensor is freed.
    """

    def __init__(self):
        self.pending: dict[int, tuple] = {}  # id → (weakref, lo, hi, folds_relu)
        self.rounded: dict[int, tuple] = {}  # id → (weakref, rounded tensor)
        self.active = True

    def _track(self, table: dict, t: torch.Tensor, *value) -> None:
        key = id(t)

        def forget(_ref: weakref.ref) -> None:  # the tensor is freed: its id may be reused
            table.pop(key, None)

        table[key] = (weakref.ref(t, forget), *value)

    def _get(self, table: dict, t) -> tuple | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = table.get(id(t))
        return entry if entry is not None and entry[0]() is t else None

    def round_input(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        """A quantized layer's input: its rounded copy if any reader already rounded it."""
        done = self._get(self.rounded, x)
        if done is not None:
            return done[1]
        self.active = False
        try:
            xq = fake_quantize_static(x, lo, hi)
        finally:
            self.active = True
        self.pending.pop(id(x), None)
        self._track(self.rounded, x, xq)
        return xq

    def mark_output(self, y: torch.Tensor, lo: float, hi: float) -> None:
        self._track(self.pending, y, lo, hi, True)

    def _resolve(self, t):
        done = self._get(self.rounded, t)
        if done is not None:
            return done[1]
        wait = self._get(self.pending, t)
        if wait is None:
            return t
        tq = fake_quantize_static(t, wait[1], wait[2])
        self.pending.pop(id(t), None)
        self._track(self.rounded, t, tq)
        return tq

    def handle(self, func, args, kwargs):
        from torch.utils._pytree import tree_flatten, tree_map

        name = getattr(func, "__name__", "")
        if not self.active or name in META_FUNCS:
            return func(*args, **kwargs)
        first = args[0] if args else None
        wait = self._get(self.pending, first)
        if wait is not None and (name in PASS_THROUGH_FUNCS or (name in RELU_FUNCS and wait[3])):
            out = func(*args, **kwargs)
            lo, hi, folds = (0.0, max(wait[2], 0.0), False) if name in RELU_FUNCS else wait[1:]
            for o in tree_flatten(out)[0][:1]:  # max_pool's indices are not values
                if isinstance(o, torch.Tensor):
                    self._track(self.pending, o, lo, hi, folds)
            return out
        if not any(isinstance(t, torch.Tensor) for t in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)
        self.active = False
        try:
            args, kwargs = tree_map(self._resolve, (args, kwargs))
            out = func(*args, **kwargs)
        finally:
            self.active = True
        return out


def _function_mode(rounding: _StaticRounding):
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return rounding.handle(func, args, kwargs or {})

    return Mode()


@contextlib.contextmanager
def quantized_inputs(model: nn.Module, spec: dict | None) -> Iterator[None]:
    """While active, ``model`` computes with 8-bit activations where onnxruntime rounds them.

    ``spec`` is ``state.extras["activation_quantization"]`` (None or mode ``none``: nothing
    changes). ``dynamic``: each quantized layer's input is rounded on its own per-sample
    range. ``static``: every tensor the QDQ export rounds (layer inputs, Conv outputs,
    residual Adds, see ``_StaticRounding``). GPFQ runs its quantized network under this, so
    its inputs X̃ carry the activation quantization error, as the method intends.
    """
    if not spec or spec.get("mode", "none") == "none":
        yield
        return
    modules = dict(model.named_modules())
    handles = []
    static = spec["mode"] != "dynamic"
    rounding = _StaticRounding() if static else None
    for pname, ranges in spec["layers"].items():
        layer = modules.get(pname.rsplit(".", 1)[0])
        if layer is None:
            continue
        if rounding is None:

            def pre_dynamic(_m, args):
                return (fake_quantize_dynamic(args[0]), *args[1:])

            handles.append(layer.register_forward_pre_hook(pre_dynamic))
            continue
        lo, hi = ranges["input"]

        def pre_static(_m, args, lo=lo, hi=hi):
            return (rounding.round_input(args[0], lo, hi), *args[1:])

        handles.append(layer.register_forward_pre_hook(pre_static))
        if isinstance(layer, CONV_TYPES) and "output" in ranges:
            out_lo, out_hi = ranges["output"]

            def post_static(_m, _args, out, lo=out_lo, hi=out_hi):
                rounding.mark_output(out, lo, hi)

            handles.append(layer.register_forward_hook(post_static))
    try:
        if rounding is None:
            yield
        else:
            with _function_mode(rounding):
                yield
    finally:
        for h in handles:
            h.remove()
