"""SmoothQuant's migration of activation outliers into the weights (Xiao et al., ICML 2023).

With 8-bit activations quantized per tensor (onnxruntime's ``DynamicQuantizeLinear``, or a
static QDQ range), a few input channels with large values set the step for all of them.
For each quantized Linear layer, with ``a_j = max |x_j|`` over the calibration data and
``w_j = max_i |W_ij|``, the migration strength ``α`` gives::

    s_j = a_j^α / w_j^(1−α)

and the layer computes ``(x / s)·(W·diag(s))ᵀ``: the same function in float, with the
input's channels flattened for the activation quantizer and the weight (quantized per output
channel) taking a share of the range (``compress.smoothing`` keeps the scaling in the model).
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


@torch.no_grad()
def input_channel_absmax(
    model: nn.Module, layers: list[str], calibration: torch.Tensor, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """``max |x_j|`` of each layer's input channel ``j`` over the calibration data."""
    modules = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:

        def hook(_m, args, name=name):
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], m) if name in amax else m

        handles.append(modules[name].register_forward_pre_hook(hook))
    run_with_hooks(model, calibration, batch_size, handles)
    missing = [n for n in layers if n not in amax]
    if missing:
        raise ValueError(f"smoothing: layers {missing} were not called on the calibration data")
    return amax


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
    alpha: float | dict[str, float],
    batch_size: int = 64,
) -> dict:
    """Smooth every Linear in ``layers`` in place, with one ``alpha`` or a ``{layer: alpha}``
    mapping (layers it leaves out are not smoothed). Layers that read the same tensor get one
    scale (from the largest of their weight columns), so they must share an alpha; layers whose
    weight another module shares are left alone (scaling a tied weight would change its other
    use). Returns a report.

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
    amax = input_channel_absmax(model, chosen, calibration, batch_size)
    spread = {}
    # Layers reading one tensor (q/k/v) share one scale, so the export quantizes that input once.
    wanted = set(chosen)
    groups = [g for g in ([n for n in grp if n in wanted] for grp in shared_input_groups(model, calibration[:2])) if g]
    for group in groups:
        differ = {alphas[n] for n in group}
        if len(differ) > 1:
            raise ValueError(
                f"smoothing: layers {group} read one tensor and share one scaling, but were given alphas "
                f"{[alphas[n] for n in group]}; give them one"
            )
        weights = torch.cat([modules[n].weight.detach() for n in group])
        s = smoothing_scales(amax[group[0]], weights, alphas[group[0]])
        for name in group:
            smooth_linear(modules[name], s)
        # How much flatter the input got: max/median of per-channel ranges, before and after.
        before = amax[group[0]]
        after = before / s.to(before.device)
        spread[",".join(group)] = [
            round((before.max() / before.median().clamp_min(1e-30)).item(), 2),
            round((after.max() / after.median().clamp_min(1e-30)).item(), 2),
        ]
    if skipped:
        log.info("smoothing: left %s", "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    shown = alpha if not isinstance(alpha, dict) else {n: alphas[n] for n in chosen}
    return {"alpha": shown, "layers": len(chosen), "skipped": skipped, "input_spread_before_after": spread}
