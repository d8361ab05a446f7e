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

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from compress.fake_quant import (  # noqa: F401  (re-exported: the quantize stage's activation API)
    ACTIVATIONS_KEY,
    fake_quantize_dynamic,
    fake_quantize_static,
    quantized_inputs,
    uint8_qparams,
)
from compress.qtensor import QuantizedTensor, UniformTensor

log = logging.getLogger(__name__)

EXTRAS_KEY = ACTIVATIONS_KEY
ACTIVATION_BITS = 8
# Values kept per layer and batch for percentile calibration: bounds memory on conv feature maps.
PERCENTILE_SAMPLE = 1 << 16


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
def run_with_hooks(model: nn.Module, calibration: torch.Tensor, batch_size: int, handles: list) -> None:
    """Run ``model`` in eval mode over ``calibration`` in batches, then remove the observer
    ``handles`` and restore its training mode (also when the forward fails)."""
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(calibration), batch_size):
            model(calibration[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


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
    run_with_hooks(model, calibration, batch_size, handles)
    unseen = [n for n, o in observers.items() if o[0].lo > o[0].hi]
    if unseen:
        # e.g. nn.MultiheadAttention's out_proj: the attention uses its weight directly
        log.warning(
            "static activations: %s never called as a module on the calibration data: "
            "weights quantized, activations left float",
            ", ".join(unseen),
        )
    return {
        f"{n}.weight": {"input": o[0].range(), "output": o[1].range()} for n, o in observers.items() if n not in unseen
    }


def kernel_pair_limit(spec: dict | None, pname: str) -> int | None:
    """The input-pair code bound (``compress.grid.U8S8_PAIR_LIMIT``) for weight ``pname``, or None.

    A layer with integer activations (dynamic or static) runs on onnxruntime's uint8 × int8
    kernels, whose int16 pair sums saturate on x86 CPUs without VNNI unless the codes respect
    the bound; codes that do are exported as int8 (the fast kernel), others as uint8 with zero
    point 128 (exact, slower). A Linear's pairs are neighbouring input features; a
    convolution's are the channels ``2j, 2j+1`` of one kernel position
    (``compress.grid.conv_kernel_order``), which the methods bound in that order.
    """
    from compress.grid import U8S8_PAIR_LIMIT

    if spec and spec.get("mode") in ("dynamic", "static") and pname in spec.get("layers", {}):
        return U8S8_PAIR_LIMIT
    return None


def activation_spec(
    model: nn.Module, layers: list[str], calibration: torch.Tensor | None, config, seed: int = 0
) -> dict:
    """``state.extras["activation_quantization"]`` for ``config.activations`` over ``layers``."""
    mode = config.activations
    if mode == "dynamic":
        return {"mode": mode, "bits": ACTIVATION_BITS, "layers": {f"{n}.weight": {} for n in layers}}
    if calibration is None:
        raise ValueError("static activation quantization needs the calibration split")
    ranges = calibrate_ranges(
        model,
        layers,
        calibration,
        method=config.activation_calibration,
        percentile=config.activation_percentile,
        seed=seed,
    )
    return {"mode": mode, "bits": ACTIVATION_BITS, "calibration": config.activation_calibration, "layers": ranges}


@torch.no_grad()
def round_static_biases(model: nn.Module, quant: dict[str, QuantizedTensor], spec: dict) -> list[str]:
    """Round each static layer's bias onto its int32 grid ``s_act · s_w`` (onnxruntime's QDQ
    bias), so PyTorch runs the bias the export stores (measured as shipped).

    Only layers the integer kernels can take (symmetric, one scale per output channel, as
    ``compress.export.fast_kernels.StaticQDQ``); returns the rounded biases' names.
    """
    from compress.fake_quant import int32_bias_step

    modules = dict(model.named_modules())
    done = []
    for pname, ranges in spec.get("layers", {}).items():
        qt = quant.get(pname)
        layer = modules.get(pname.rsplit(".", 1)[0])
        bias = getattr(layer, "bias", None)
        if (
            bias is None
            or not isinstance(qt, UniformTensor)
            or qt.zero_point is not None
            or qt.scale.shape[1] != 1
            or qt.bits > 8
        ):
            continue
        act_scale, _ = uint8_qparams(*ranges["input"])
        w_scale = qt.scale.float().numpy()[:, 0]
        if w_scale.shape[0] == 1:
            w_scale = np.repeat(w_scale, bias.numel())
        step = torch.from_numpy(int32_bias_step(act_scale, w_scale))
        codes = torch.clamp(torch.round(bias.detach().double() / step.double().clamp_min(1e-30)), -(2**31), 2**31 - 1)
        bias.copy_((codes.float() * step).to(bias.dtype))
        done.append(pname.rsplit(".", 1)[0] + ".bias")
    return done


# Clipping factors ``embedding_range: mse`` tries per row (fractions of the row's max |w|).
EMBEDDING_CLIP_FACTORS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


# A table with more rows than this stores its row scales as 8-bit indices into a table of
# this many log-spaced steps (``compress.grid.log_grid_ceil``): a quarter of the bytes.
ROW_SCALE_LEVELS = 256


def _compact_row_scales(scale: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Row steps the export stores compactly, never smaller than ``scale`` (nothing clipped):
    float16 values, and for a table of more than ``ROW_SCALE_LEVELS`` rows one of that many
    log-spaced steps (on all-MiniLM-L6-v2's 30 522-row word table: 122 → 31 KB). All-zero
    rows (``live`` False) take the smallest live step; their codes are 0 anyway."""
    from compress.grid import float16_ceil, log_grid_ceil

    if not bool(live.any()):
        return float16_ceil(scale)
    out = scale.clone()
    rows = int(live.sum())
    out[live] = log_grid_ceil(scale[live]) if rows > ROW_SCALE_LEVELS else float16_ceil(scale[live])
    out[~live] = out[live].min()
    return out


def quantize_embeddings(
    module: nn.Module,
    bits: int,
    masks: dict | None = None,
    scale_from: str = "max",
    bits_for: Callable[[str], int | None] | None = None,
) -> dict[str, QuantizedTensor]:
    """Round-to-nearest codes of every ``nn.Embedding`` table, one symmetric scale per row.

    A row is one token's vector, and a Gather reads whole rows: per-row scales cost one float
    per token and keep a rare token's small vector from being flushed to zero by a large one.
    A table tied to an output Linear (same Parameter) is one parameter: quantized once, its
    one copy serves both uses (the export rewrites every consumer of the initializer).

    Args:
        module: the model; every ``nn.Embedding`` in it is quantized.
        bits: code width (4 or 8); codes lie in the narrow signed range ``[-qmax, qmax]``.
        masks: pruning masks by parameter name (pruned entries get code 0).
        scale_from: ``max``: step ``max|row| / qmax`` (no value clipped); ``mse``: the step,
            among ``EMBEDDING_CLIP_FACTORS`` times that, with the lowest squared error of
            the row. At 4 bits a few large entries otherwise set a step so coarse that most
            of the row rounds to 0 or ±1 (measured on all-MiniLM-L6-v2's word table: relative
            error 0.132 → 0.112, sentence cosine 0.994 → 0.997).
        bits_for: a table's own bit width by module name (None: ``bits``). Small tables
            every token reads (positions, token types) cost little at 8 bits and much at 4:
            on all-MiniLM-L6-v2, 4-bit position / token-type tables alone drop the sentence
            cosine to 0.997 / 0.993, at 8 bits to 0.99999 / 0.9999.
    """
    from compress.qtensor import signed_range

    if scale_from not in ("max", "mse"):
        raise ValueError(f"embedding scale_from must be 'max' or 'mse', got {scale_from!r}")
    out: dict[str, QuantizedTensor] = {}
    seen: set[int] = set()
    for name, mod in module.named_modules():
        if not isinstance(mod, nn.Embedding) or id(mod.weight) in seen:
            continue
        seen.add(id(mod.weight))
        w = mod.weight.detach().float()
        table_bits = (bits_for(name) if bits_for is not None else None) or bits
        if table_bits not in (4, 8):
            raise ValueError(f"embedding table {name!r}: {table_bits} bits; embedding tables take 4 or 8 bits")
        qmin, qmax = signed_range(table_bits, narrow=True)
        peak = w.abs().amax(1, keepdim=True)
        scale = (peak / qmax).clamp_min(1e-12)
        if scale_from == "mse":
            best_err = torch.full_like(peak, float("inf"))
            best = scale
            for factor in EMBEDDING_CLIP_FACTORS:
                s = (peak * factor / qmax).clamp_min(1e-12)
                err = ((torch.clamp(torch.round(w / s), qmin, qmax) * s - w) ** 2).sum(1, keepdim=True)
                better = err < best_err
                best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
            scale = best
        scale = _compact_row_scales(scale, peak > 0)
        codes = torch.clamp(torch.round(w / scale), qmin, qmax)
        mask = (masks or {}).get(f"{name}.weight")
        if mask is not None:
            codes = codes * mask.to(codes.dtype)
        out[f"{name}.weight"] = UniformTensor(codes=codes.to(torch.int8), bits=table_bits, scale=scale, method="rtn")
    return out
