"""Which share of a model's parameters a stage actually handled (issue 12: no silent float layers).

A stage reports ``ctx.metrics["coverage"]`` (``parameter_coverage``); the CLI prints it as
one line (``coverage_line``) and the reports show it per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def owners(module: nn.Module) -> dict[str, nn.Module]:
    """Canonical parameter name -> the module that holds it."""
    out: dict[str, nn.Module] = {}
    for mname, m in module.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            out.setdefault(f"{mname}.{pname}" if mname else pname, m)
    return out


def parameter_coverage(
    module: nn.Module,
    handled: set[str],
    reasons: dict[str, str],
    *,
    what: str,
    unsupported_kinds: Callable[[nn.Module], str | None] | None = None,
) -> dict[str, Any]:
    """The coverage record of one stage.

    Args:
        module: the model after the stage.
        handled: canonical names of the parameters the stage handled (quantized, pruned).
        reasons: parameter name -> why it was left alone (for weight matrices the stage
            knows about).
        what: the verb for messages ("quantize", "prune").
        unsupported_kinds: gives the reason for a weight matrix of a module the stage does
            not know (e.g. ``Embedding``); default: "<Type>, not handled by <what>".

    Returns:
        ``{"handled", "total", "fraction", "left": [{"name", "parameters", "reason"}],
        "small_parameters"}`` where ``left`` lists weight matrices (2-D or more) left
        untouched and ``small_parameters`` counts the 1-D ones (biases, norms), which stay float.
    """
    params = dict(module.named_parameters())
    own = owners(module)
    total = sum(p.numel() for p in params.values())
    done = sum(params[n].numel() for n in handled if n in params)
    left = []
    small = 0
    for name, p in params.items():
        if name in handled:
            continue
        if p.dim() < 2:
            small += p.numel()
            continue
        reason = reasons.get(name)
        if reason is None:
            m = own.get(name)
            kind = type(m).__name__ if m is not None else "parameter"
            reason = (
                unsupported_kinds(m) if unsupported_kinds and m is not None else None
            ) or f"{kind}, not handled by {what}"
        left.append({"name": name, "parameters": p.numel(), "reason": reason})
    return {
        "handled": done,
        "total": total,
        "fraction": done / total if total else 0.0,
        "left": left,
        "small_parameters": small,
    }


def coverage_line(stage: str, cov: dict[str, Any]) -> str:
    """``quantize: 12,480 of 13,514 parameters (92%); left float: gru.weight_ih_l0 (GRU, ...)``."""
    verb = "left float" if stage == "quantize" else "left as is"
    text = f"{stage}: {cov['handled']:,} of {cov['total']:,} parameters ({cov['fraction']:.0%})"
    if cov.get("left"):
        text += f"; {verb}: " + ", ".join(f"{x['name']} ({x['reason']})" for x in cov["left"])
    if cov.get("small_parameters"):
        text += f"; {cov['small_parameters']:,} bias/norm parameters unchanged"
    if cov.get("fallbacks"):
        text += "; fallback: " + ", ".join(f"{k} ({v})" for k, v in cov["fallbacks"].items())
    return text


def weight_matrices(module: nn.Module) -> list[tuple[str, str, str, nn.Module]]:
    """Every weight matrix the quantizers handle, in module order:
    ``(canonical parameter name, owner module name, attribute, owner)``.

    Linear and Conv weights, GRU/LSTM/RNN ``weight_ih_l*`` / ``weight_hh_l*`` and
    MultiheadAttention's ``in_proj_weight`` (or ``q/k/v_proj_weight``; its ``out_proj`` is a
    Linear). A Parameter shared by several modules (tied weights) is listed once, under its
    first name in ``named_parameters()``.
    """
    canonical = {id(p): n for n, p in module.named_parameters()}
    seen: set[str] = set()
    out = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            attrs = ["weight"]
        elif isinstance(m, nn.RNNBase):
            attrs = [a for a, p in m.named_parameters(recurse=False) if a.startswith("weight_") and p.dim() == 2]
        elif isinstance(m, nn.MultiheadAttention):
            attrs = [
                a
                for a in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if isinstance(getattr(m, a, None), nn.Parameter)
            ]
        else:
            continue
        for attr in attrs:
            p = getattr(m, attr)
            if not isinstance(p, nn.Parameter):
                continue
            pname = canonical.get(id(p))
            if pname is None or pname in seen:
                continue
            seen.add(pname)
            out.append((pname, name, attr, m))
    return out
