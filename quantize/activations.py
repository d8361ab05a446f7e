"""8-bit activation quantization: calibrated ranges, the fake quantizers GPFQ sees, embeddings.

Activations are quantized the way onnxruntime runs them on a CPU: per tensor, unsigned
8-bit with a zero point (``x ≈ (q − z)·s``, ``q ∈ [0, 255]``), the range always holding 0
so that zero (padding, ReLU's floor) is exact.

* ``dynamic``: the range is the tensor's own min/max, measured at run time
  (``DynamicQuantizeLinear``); nothing is calibrated.
* ``static``: each quantized layer's input and output range is calibrated on the
  calibration split (min/max, or a percentile at both ends) and frozen into the export.

The ranges travel in ``state.extras["activation_quantization"]`` (JSON): ``{"mode", "bits",
"layers": {"<layer>.weight": {"input": [lo, hi], "output": [lo, hi]}}}`` keyed by the
quantized parameter, the same key as ``state.quant``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from compress.qtensor import QuantizedTensor

log = logging.getLogger(__name__)

EXTRAS_KEY = "activation_quantization"
ACTIVATION_BITS = 8
# Values kept per layer and batch for percentile calibration: bounds memory on conv feature maps.
PERCENTILE_SAMPLE = 1 << 16


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


class _RangeObserver:
    """Min/max, or a bounded random sample for percentiles, of every tensor it sees."""

    def __init__(self, method: str, percentile: float, generator: torch.Generator):
        self.method, self.percentile, self.generator = method, percentile, generator
        self.lo, self.hi = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
        if self.method == "percentile":
            if x.numel() > PERCENTILE_SAMPLE:
                x = x[torch.randint(0, x.numel(), (PERCENTILE_SAMPLE,), generator=self.generator)]
            self.samples.append(x)

    def range(self) -> list[float]:
        if self.lo > self.hi:
            raise ValueError("no activations observed: the layer was not called on the calibration data")
        if self.method == "minmax":
            return [self.lo, self.hi]
        values = torch.cat(self.samples).double()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=torch.float64)
        lo, hi = torch.quantile(values, q).tolist() if values.numel() <= 1 << 24 else (self.lo, self.hi)
        return [float(lo), float(hi)]


@torch.no_grad()
def calibrate_ranges(
    model: nn.Module,
    layers: list[str],
    calibration: torch.Tensor,
    *,
    method: str = "percentile",
    percentile: float = 99.99,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """The input and output range of each of ``layers`` over the calibration data.

    Args:
        model: run in eval mode on ``calibration`` in batches (not modified).
        layers: module names (Linear/Conv) whose first input and output are observed.
        method: ``minmax`` or ``percentile`` (lower ``100 − percentile``, upper ``percentile``).

    Returns:
        ``{"<layer>.weight": {"input": [lo, hi], "output": [lo, hi]}}``.
    """
    if method not in ("minmax", "percentile"):
        raise ValueError(f"activation calibration must be 'minmax' or 'percentile', got {method!r}")
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of the model")
    gen = torch.Generator().manual_seed(seed)
    observers = {n: (_RangeObserver(method, percentile, gen), _RangeObserver(method, percentile, gen)) for n in layers}
    handles = []
    for name in layers:
        obs_in, obs_out = observers[name]

        def hook(_m, args, out, obs_in=obs_in, obs_out=obs_out):
            obs_in.observe(args[0])
            obs_out.observe(out)

        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(calibration), batch_size):
            model(calibration[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {f"{n}.weight": {"input": o[0].range(), "output": o[1].range()} for n, o in observers.items()}


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
            def pre(_m, args):
                return (fake_quantize_dynamic(args[0]), *args[1:])
        else:
            lo, hi = ranges["input"]

            def pre(_m, args, lo=lo, hi=hi):
                return (fake_quantize_static(args[0], lo, hi), *args[1:])
        handles.append(layer.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def activation_spec(model: nn.Module, layers: list[str], calibration: torch.Tensor | None, config, seed: int = 0) -> dict:
    """``state.extras["activation_quantization"]`` for ``config.activations`` over ``layers``."""
    mode = config.activations
    if mode == "dynamic":
        return {"mode": mode, "bits": ACTIVATION_BITS, "layers": {f"{n}.weight": {} for n in layers}}
    if calibration is None:
        raise ValueError("static activation quantization needs the calibration split")
    ranges = calibrate_ranges(
        model, layers, calibration, method=config.activation_calibration,
        percentile=config.activation_percentile, seed=seed,
    )
    return {"mode": mode, "bits": ACTIVATION_BITS, "calibration": config.activation_calibration, "layers": ranges}


def quantize_embeddings(module: nn.Module, bits: int, masks: dict | None = None) -> dict[str, QuantizedTensor]:
    """Round-to-nearest codes of every ``nn.Embedding`` table, one symmetric scale per row.

    A row is one token's vector, and a Gather reads whole rows: per-row scales cost one float
    per token and keep a rare token's small vector from being flushed to zero by a large one.
    A table tied to an output Linear (same Parameter) is one parameter: quantized once, its
    one copy serves both uses (the export rewrites every consumer of the initializer).
    """
    from compress.qtensor import signed_range

    out: dict[str, QuantizedTensor] = {}
    seen: set[int] = set()
    for name, mod in module.named_modules():
        if not isinstance(mod, nn.Embedding) or id(mod.weight) in seen:
            continue
        seen.add(id(mod.weight))
        w = mod.weight.detach().float()
        qmin, qmax = signed_range(bits, narrow=True)
        scale = (w.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12)
        codes = torch.clamp(torch.round(w / scale), qmin, qmax)
        mask = (masks or {}).get(f"{name}.weight")
        if mask is not None:
            codes = codes * mask.to(codes.dtype)
        out[f"{name}.weight"] = QuantizedTensor(codes=codes.to(torch.int8), bits=bits, scale=scale, method="rtn")
    return out
