"""SmoothQuant's migration of activation outliers into the weights (Xiao et al., ICML 2023).

With 8-bit activations quantized per tensor (onnxruntime's ``DynamicQuantizeLinear``, or a
static QDQ range), a few input channels with large values set the step for all of them.
For each quantized Linear layer, with ``a_j = max |x_j|`` over the calibration data and
``w_j = max_i |W_ij|``, the migration strength ``α`` gives::

    s_j = a_j^α / w_j^(1−α)

and the layer computes ``(x / s)·(W·diag(s))ᵀ``: the same function in float, with the
input's channels flattened for the activation quantizer and the weight (quantized per output
channel) taking a share of the range (``compress.smoothing`` keeps the scaling in the model).

The activation grid is asymmetric (uint8 with a zero point over the tensor's ``[min, max]``),
so a tensor's negative and positive extents cost separately. ``a_j = max |x_j|`` treats a
channel's two tails alike: after a GELU (``x ≥ −0.17``) the channels with small values get
small ``s_j``, their −0.17 tails grow by ``1/s_j`` and end up setting the tensor's minimum
(all-MiniLM-L6-v2 at alpha 0.7: the FFN outputs' inputs span −1.6..0.6 where the positive
side needs 0.6). ``skew`` κ ≤ 1 weighs the tensor's narrow side by ``1/κ``:
``a_j = max(hi_j, −lo_j/κ)`` when the negative side is the narrow one (``max(−lo_j, hi_j/κ)``
otherwise), so no channel's narrow tail reaches beyond about κ times the wide side's extent;
κ = 1 is SmoothQuant's ``max |x_j|`` (``range_magnitude``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compress.quantize.activations import run_with_hooks
from compress.quantize.gpfq import shared_input_groups
from compress.smoothing import smooth_linear

log = logging.getLogger(__name__)

# Scales stay in this band: a dead input channel (a_j = 0) or weight column (w_j = 0) gets 1.
SCALE_RANGE = (1e-4, 1e4)

# ``smoothing: auto``: the alphas tried for each group of layers reading one tensor (None: not
# smoothed), the share of the calibration data held out to judge them, and at most this many
# held-out samples kept in memory.
AUTO_ALPHAS = (None, 0.5, 0.6, 0.7, 0.8, 0.9)
# ``smoothing_skew: auto``: the narrow-side weights κ tried for each group (``range_magnitude``).
AUTO_SKEWS = (1.0, 0.5, 0.25, 0.125)
AUTO_HOLDOUT = 0.25
AUTO_MAX_HELDOUT = 64


@torch.no_grad()
def input_channel_ranges(
    model: nn.Module, layers: list[str], calibration: torch.Tensor, batch_size: int = 64
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(min x_j, max x_j)`` of each layer's input channel ``j`` over the calibration data."""
    modules = dict(model.named_modules())
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in layers:

        def hook(_m, args, name=name):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            lo, hi = flat.amin(0), flat.amax(0)
            if name in ranges:
                lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
            ranges[name] = (lo, hi)

        handles.append(modules[name].register_forward_pre_hook(hook))
    run_with_hooks(model, calibration, batch_size, handles)
    missing = [n for n in layers if n not in ranges]
    if missing:
        raise ValueError(f"smoothing: layers {missing} were not called on the calibration data")
    return ranges


def input_channel_absmax(
    model: nn.Module, layers: list[str], calibration: torch.Tensor, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """``max |x_j|`` of each layer's input channel ``j`` over the calibration data."""
    ranges = input_channel_ranges(model, layers, calibration, batch_size)
    return {n: range_magnitude(lo, hi, 1.0) for n, (lo, hi) in ranges.items()}


def range_magnitude(lo: torch.Tensor, hi: torch.Tensor, skew: float = 1.0) -> torch.Tensor:
    """Per channel, the magnitude SmoothQuant divides out: ``max(hi_j, −lo_j/κ)`` when the
    tensor's negative side is its narrow one, else ``max(−lo_j, hi_j/κ)`` (κ = ``skew``).

    With κ = 1 this is ``max |x_j|``. For an asymmetric 8-bit grid, κ < 1 keeps channels from
    stretching the narrow side: a channel whose narrow tail is more than κ times its wide
    one is scaled by its narrow tail, weighted ``1/κ``.
    """
    if not 0.0 < skew <= 1.0:
        raise ValueError(f"smoothing skew must be in (0, 1], got {skew}")
    neg, pos = (-lo).clamp_min(0), hi.clamp_min(0)
    if float(neg.max()) <= float(pos.max()):
        return torch.maximum(pos, neg / skew)
    return torch.maximum(neg, pos / skew)


@torch.no_grad()
def _split_statistics(
    model: nn.Module, layers: list[str], calibration: torch.Tensor, batch_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Per input channel ``min`` and ``max`` of each layer's input on the fit part of the
    calibration data, and the held-out part's inputs (the last ``AUTO_HOLDOUT`` of it), batch
    by batch (a model may trim each batch's padding to its own length)."""
    n = calibration.shape[0]
    held = max(1, min(AUTO_MAX_HELDOUT, round(n * AUTO_HOLDOUT)))
    if n - held < 1:
        raise ValueError(f"smoothing: auto needs at least 2 calibration samples, got {n}")
    modules = dict(model.named_modules())
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    fitting = [True]
    handles = []
    for name in layers:

        def hook(_m, args, name=name):
            x = args[0].detach().float()
            if fitting[0]:
                flat = x.reshape(-1, x.shape[-1])
                mn, mx = flat.amin(0), flat.amax(0)
                lo[name] = torch.minimum(lo[name], mn) if name in lo else mn
                hi[name] = torch.maximum(hi[name], mx) if name in hi else mx
            else:
                kept[name].append(x)

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        run_with_hooks(model, calibration[: n - held], batch_size, [])
        fitting[0] = False
        run_with_hooks(model, calibration[n - held :], batch_size, [])
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in layers if name not in lo or not kept[name]]
    if missing:
        raise ValueError(f"smoothing: layers {missing} were not called on the calibration data")
    return lo, hi, kept


def smoothing_error(
    scale: torch.Tensor,
    fit_range: tuple[torch.Tensor, torch.Tensor],
    held_x: list[torch.Tensor],
    weights: list[torch.Tensor],
    bits: list[int],
    activations: str = "dynamic",
    symmetric: bool = True,
) -> float:
    """Relative squared output error of layers reading one input, smoothed by ``scale``, with
    8-bit activations (``dynamic``: per sample, as onnxruntime's DynamicQuantizeLinear;
    ``static``: the fit part's range) and round-to-nearest weights, on held-out inputs.

    Summed over the layers of the group: ``Σ ||Q(x/s)·Q(W·diag(s))ᵀ − x·Wᵀ||² / ||x·Wᵀ||²``,
    ``held_x`` a list of input batches.
    """
    from compress.fake_quant import fake_quantize_dynamic, fake_quantize_static
    from compress.grid import U8S8_PAIR_LIMIT
    from compress.quantize.rtn import rtn_quantize

    s = scale.to(held_x[0].device)
    lo, hi = fit_range
    wq = []
    for w, b in zip(weights, bits):
        pair = U8S8_PAIR_LIMIT if activations == "dynamic" and b >= 8 else None
        wq.append(rtn_quantize(w.float() * s, b, symmetric=symmetric, pair_limit=pair).dequantize())
    num, den = [0.0] * len(weights), [0.0] * len(weights)
    for x in held_x:
        x_q = x / s
        if activations == "dynamic":
            x_q = fake_quantize_dynamic(x_q)
        else:
            x_q = fake_quantize_static(x_q, float((lo / s).min().clamp_max(0)), float((hi / s).max().clamp_min(0)))
        flat_x, flat_q = x.reshape(-1, x.shape[-1]), x_q.reshape(-1, x.shape[-1])
        for i, w in enumerate(weights):
            y = flat_x @ w.float().T
            num[i] += float(((flat_q @ wq[i].T - y) ** 2).sum())
            den[i] += float((y**2).sum())
    return sum(n / max(d, 1e-30) for n, d in zip(num, den))


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j^α / w_j^(1−α)`` for a weight ``(out, in)``; 1 where a channel is dead."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    a = act_absmax.double()
    w = weight.detach().abs().amax(0).double().to(a.device)
    live = (a > 0) & (w > 0)
    s = torch.where(live, a.clamp_min(1e-30) ** alpha / w.clamp_min(1e-30) ** (1 - alpha), torch.ones_like(a))
    return s.clamp(*SCALE_RANGE).float()


def smooth_model(
    model: nn.Module,
    layers: list[str],
    calibration: torch.Tensor,
    alpha: float | str | dict[str, float | str],
    batch_size: int = 64,
    *,
    bits: dict[str, int] | None = None,
    activations: str = "dynamic",
    symmetric: bool = True,
    skew: float | str = 1.0,
) -> dict:
    """Smooth every Linear in ``layers`` in place, with one ``alpha`` or a ``{layer: alpha}``
    mapping (layers it leaves out are not smoothed). Layers that read the same tensor get one
    scale (from the largest of their weight columns), so they must share an alpha; layers whose
    weight another module shares are left alone (scaling a tied weight would change its other
    use). Returns a report.

    ``alpha`` ``"auto"``: each group of layers reading one tensor takes, among ``AUTO_ALPHAS``
    (None: not smoothed), the alpha whose scales, measured on the fit part of the calibration
    data, give the lowest ``smoothing_error`` on the held-out part (``AUTO_HOLDOUT``). Judged
    on data the scales did not see, a high alpha that fits the calibration's channel maxima
    too closely loses to a milder one. ``bits`` (per layer, default 8), ``activations`` and
    ``symmetric`` describe the quantization that error simulates.

    ``skew`` κ (``range_magnitude``): 1 is SmoothQuant's ``max |x_j|``; ``"auto"``: each group
    takes the κ among ``AUTO_SKEWS`` with the lowest held-out error (jointly with the alpha
    when that is ``auto`` too), judged as above.

    Raises:
        ValueError: layers reading one tensor were given different alphas.
    """
    alphas = dict.fromkeys(layers, alpha) if not isinstance(alpha, dict) else alpha
    layers = [n for n in layers if n in alphas]
    modules = dict(model.named_modules())
    uses: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    chosen, skipped = [], {}
    for name in layers:
        layer = modules[name]
        if not isinstance(layer, nn.Linear):
            skipped[name] = f"{type(layer).__name__}, not a Linear"
        elif uses.get(id(layer.weight), 0) > 1:
            skipped[name] = "its weight is tied to another layer"
        else:
            chosen.append(name)
    if skew != "auto" and not (isinstance(skew, (int, float)) and 0.0 < skew <= 1.0):
        raise ValueError(f"smoothing skew must be in (0, 1] or 'auto', got {skew!r}")
    ranges = input_channel_ranges(model, chosen, calibration, batch_size)
    spread: dict[str, list[float]] = {}
    picked: dict[str, dict] = {}
    # Layers reading one tensor (q/k/v) share one scale, so the export quantizes that input once.
    wanted = set(chosen)
    groups = [g for g in ([n for n in grp if n in wanted] for grp in shared_input_groups(model, calibration[:2])) if g]
    auto_first = [g[0] for g in groups if skew == "auto" or any(alphas[n] == "auto" for n in g)]
    auto_stats = _split_statistics(model, auto_first, calibration, batch_size) if auto_first else ({}, {}, {})
    for group in groups:
        differ = {alphas[n] for n in group}
        if len(differ) > 1:
            raise ValueError(
                f"smoothing: layers {group} read one tensor and share one scaling, but were given alphas "
                f"{[alphas[n] for n in group]}; give them one"
            )
        weights = torch.cat([modules[n].weight.detach() for n in group])
        group_alpha: float | str | None = alphas[group[0]]
        group_skew = skew
        if group_alpha == "auto" or skew == "auto":
            candidates = AUTO_ALPHAS if group_alpha == "auto" else (group_alpha,)
            skews = AUTO_SKEWS if skew == "auto" else (float(skew),)
            group_alpha, group_skew, errors = _choose_alpha(
                group, modules, auto_stats, bits or {}, activations, symmetric, candidates, skews
            )
            picked[",".join(group)] = {"alpha": group_alpha, "skew": group_skew, "heldout_error": errors}
            if group_alpha is None:
                continue
        assert isinstance(group_alpha, (int, float)) and isinstance(group_skew, (int, float))
        lo, hi = ranges[group[0]]
        s = smoothing_scales(range_magnitude(lo, hi, float(group_skew)), weights, float(group_alpha))
        for name in group:
            smooth_linear(modules[name], s)
        # How much flatter the input got: max/median of per-channel ranges, before and after.
        before = range_magnitude(lo, hi, 1.0)
        after = before / s.to(before.device)
        spread[",".join(group)] = [
            round((before.max() / before.median().clamp_min(1e-30)).item(), 2),
            round((after.max() / after.median().clamp_min(1e-30)).item(), 2),
        ]
    if skipped:
        log.info("smoothing: left %s", "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    shown = alpha if not isinstance(alpha, dict) else {n: alphas[n] for n in chosen}
    report: dict = {"alpha": shown, "layers": len(chosen), "skipped": skipped, "input_spread_before_after": spread}
    if picked:
        report["auto"] = picked
        log.info("smoothing auto: %s", {g: (v["alpha"], v["skew"]) for g, v in picked.items()})
    return report


def _choose_alpha(
    group: list[str],
    modules: dict,
    stats: tuple,
    bits: dict[str, int],
    activations: str,
    symmetric: bool,
    alphas: tuple = AUTO_ALPHAS,
    skews: tuple[float, ...] = (1.0,),
) -> tuple[float | None, float, dict[str, float]]:
    """The ``(alpha, skew)`` among ``alphas × skews`` (None: not smoothed, any skew) with the
    lowest held-out ``smoothing_error`` for ``group``, and every candidate's error (keyed
    ``"alpha"``, or ``"alpha/skew"`` when several skews are tried)."""
    lo, hi, held = stats
    first = group[0]
    weights = [modules[n].weight.detach() for n in group]
    layer_bits = [bits.get(n, 8) for n in group]
    errors: dict[str, float] = {}
    best, best_skew, best_err = None, skews[0], float("inf")
    for a in alphas:
        for k in skews if a is not None else skews[:1]:
            if a is None:
                s = torch.ones_like(hi[first])
            else:
                s = smoothing_scales(range_magnitude(lo[first], hi[first], k), torch.cat(weights), a)
            err = smoothing_error(s, (lo[first], hi[first]), held[first], weights, layer_bits, activations, symmetric)
            errors[str(a) if len(skews) == 1 or a is None else f"{a}/{k}"] = float(f"{err:.4g}")
            if err < best_err:
                best, best_skew, best_err = a, k, err
    return best, best_skew, errors
