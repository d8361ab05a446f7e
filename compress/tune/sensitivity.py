"""Layer sensitivity: quantize one layer at a time, at each bit width, and measure the output.

Each (layer, bits) is quantized with the quantize stage's own ``apply`` (the recipe's method
and options, restricted to that layer), the model is run on calibration samples and its
output compared with the unquantized model's; then the layer is restored. The cost of each
choice (bytes under each size objective) comes from the same quantized tensor.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from compress.metrics import predict
from compress.state import ModelState, StageContext

log = logging.getLogger(__name__)

FLOAT = "float"


def glob_escape(name: str) -> str:
    """A glob that matches exactly ``name`` (module names rarely hold glob characters)."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def divergence(out: torch.Tensor, ref: torch.Tensor, metric: str) -> float:
    """Mean KL(softmax(ref) || softmax(out)) per sample, or mean 1 - cosine."""
    out, ref = out.flatten(1).double(), ref.flatten(1).double()
    if metric == "kl":
        logp_ref = torch.log_softmax(ref, dim=1)
        logp_out = torch.log_softmax(out, dim=1)
        return float((logp_ref.exp() * (logp_ref - logp_out)).sum(1).mean())
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    return float((1 - cos).mean())


def code_entropy_bits(codes: torch.Tensor) -> float:
    """Empirical entropy of integer codes in bits per value: what an entropy coder approaches."""
    _, counts = torch.unique(codes.flatten(), return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def choice_costs(qt: Any | None, weight: torch.Tensor) -> dict[str, float]:
    """Bytes of one layer's weight under each size objective.

    ``onnx_size``: the ONNX initializer (float32, or 4-bit containers for 2-4 bits and 8-bit
    ones for 5-8 bits, as the export stage writes them) plus scales; ``packed_size``: the
    codes at their empirical entropy plus scales (pruned zeros cost next to nothing), float
    weights at 4 bytes per nonzero.
    """
    n = weight.numel()
    if qt is None:
        return {"onnx_size": 4.0 * n, "packed_size": 4.0 * int(torch.count_nonzero(weight))}
    side = max(qt.storage_bits() - qt.numel * qt.bits, 0) / 8
    container = 4 if qt.bits <= 4 else 8
    return {
        "onnx_size": n * container / 8 + side,
        "packed_size": n * code_entropy_bits(qt.codes) / 8 + side,
    }


def measure(
    state: ModelState,
    quant_config: Any,
    layers: list[str],
    bits: list[int | str],
    ctx_data: Any,
    reference: torch.nn.Module,
    seed: int,
    samples: int,
    metric: str,
) -> dict[str, dict[str, dict[str, float]]]:
    """Sensitivity and cost of every layer at every bit width, one layer quantized at a time.

    Args:
        state: the model as the quantize stage receives it (after the recipe's earlier stages).
        quant_config: the quantize config of the variant (method and options); ``layers``,
            ``skip``, ``bits`` and ``layer_bits`` are replaced per measurement.
        layers: module names of the layers to measure.
        bits: bit widths to measure (``"float"``: the layer unquantized, divergence 0).
        ctx_data: the recipe's data (``DataBundle``); calibration samples are measured on.
        reference: the pipeline's input model (the stage context's reference).
        seed: the quantize stage's seed.
        samples: calibration samples the output is compared on.
        metric: ``"kl"`` or ``"cosine"``.

    Returns:
        ``{layer: {str(bits): {"divergence", "onnx_size", "packed_size"}}}``.
    """
    from compress.quantize.stage import apply as quantize_apply

    x = ctx_data.calibration().x[:samples]
    module = state.module
    base_out = predict(module, x)
    params = dict(module.named_parameters())
    table: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="compress-sensitivity-") as tmp:
        for layer in layers:
            pname = f"{layer}.weight"
            weight = params[pname]
            original = weight.detach().clone()
            previous = state.quant.get(pname)
            row: dict[str, dict[str, float]] = {}
            for b in bits:
                if b == FLOAT:
                    row[FLOAT] = {"divergence": 0.0, **choice_costs(None, original)}
                    continue
                cfg = quant_config.model_copy(
                    update={"layers": [glob_escape(layer)], "skip": [], "bits": int(b), "layer_bits": {}}
                )
                ctx = StageContext(
                    data=ctx_data,
                    out_dir=Path(tmp),
                    device=torch.device("cpu"),
                    reference=reference,
                    seed=seed,
                    log=logging.getLogger("compress.stage.quantize"),
                )
                torch.manual_seed(seed)
                try:
                    quantize_apply(state, cfg, ctx)
                    qt = state.quant.get(pname)
                    div = divergence(predict(module, x), base_out, metric)
                    row[str(b)] = {
                        "divergence": div if math.isfinite(div) else float("inf"),
                        **choice_costs(qt, original),
                    }
                except Exception as err:  # this width is unavailable for this layer; the search goes on without it
                    log.warning(
                        "sensitivity %s at %s bits failed (%s: %s): choice left out", layer, b, type(err).__name__, err
                    )
                    row[str(b)] = {"divergence": float("nan"), "onnx_size": float("nan"), "packed_size": float("nan")}
                finally:
                    with torch.no_grad():
                        weight.copy_(original)
                    if previous is None:
                        state.quant.pop(pname, None)
                    else:
                        state.quant[pname] = previous
            table[layer] = row
            log.info("sensitivity %s: %s", layer, {k: f"{v['divergence']:.3g}" for k, v in row.items()})
    return table
