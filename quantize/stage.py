"""The ``quantize`` stage: quantize the weight matrices of the model (biases stay float).

Which weights: every Linear and Conv1d/Conv2d weight, the input/hidden matrices of
GRU/LSTM/RNN layers (``weight_ih_l*``, ``weight_hh_l*``) and MultiheadAttention's input
projection (``in_proj_weight``, or ``q/k/v_proj_weight``; its ``out_proj`` is a Linear).
A Parameter shared by several modules (tied embedding / output weights) is quantized once,
under its first name in ``named_parameters()``.

Before quantizing, eval-mode BatchNorm is folded into the Conv/Linear that feeds it
(``compress.batchnorm``): the folded weight is the one that runs, in PyTorch and in ONNX.

Fills ``state.quant`` with one ``QuantizedTensor`` per quantized weight, writes the
dequantized values into the module (``state.sync_quantized``) and reports per-weight bits,
errors and the stage's coverage under ``ctx.metrics["quantize"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from compress.coverage import coverage_line, parameter_coverage
from compress.grid import as_matrix, float16_nearest
from compress.qtensor import QuantizedTensor, UniformTensor, per_column_ok
from compress.quantize.config import CodebookConfig, GPFQConfig, RTNConfig
from compress.quantize.gpfq import QUANTIZABLE, ROUNDED_ONLY
from compress.registry import method_for
from compress.state import ModelState, StageContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightTarget:
    """One weight matrix the quantize stage can handle."""

    param: str  # canonical parameter name (first name under named_parameters)
    layer: str  # the owning module's name
    attr: str  # the attribute on that module ("weight", "weight_ih_l0", "in_proj_weight")
    kind: str  # the owning module's type name

    @property
    def key(self) -> str:
        """Report key: the layer name for a plain ``<layer>.weight``, else the parameter name."""
        return self.layer if self.attr == "weight" and self.param == f"{self.layer}.weight" else self.param


def weight_attrs(module: nn.Module) -> list[str]:
    """The weight matrices of ``module`` (not of its children) that the quantizers handle."""
    if isinstance(module, (*QUANTIZABLE, *ROUNDED_ONLY)):
        return ["weight"]
    if isinstance(module, nn.RNNBase):
        return [n for n, p in module.named_parameters(recurse=False) if n.startswith("weight_") and p.dim() == 2]
    if isinstance(module, nn.MultiheadAttention):
        return [
            a
            for a in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
            if isinstance(getattr(module, a, None), nn.Parameter)
        ]
    return []


def weight_targets(module: nn.Module) -> dict[str, WeightTarget]:
    """Every quantizable weight of ``module`` by canonical parameter name; a shared
    Parameter appears once (the first module that uses it)."""
    canonical = {id(p): n for n, p in module.named_parameters()}
    targets: dict[str, WeightTarget] = {}
    for name, m in module.named_modules():
        for attr in weight_attrs(m):
            p = getattr(m, attr)
            pname = canonical.get(id(p))
            if pname is None or pname in targets:
                continue
            targets[pname] = WeightTarget(pname, name, attr, type(m).__name__)
    return targets


def select_weights(module: nn.Module, config: RTNConfig | GPFQConfig | CodebookConfig) -> dict[str, WeightTarget]:
    """The weights the config quantizes, by canonical parameter name."""
    chosen = {p: t for p, t in weight_targets(module).items() if config.selects(t.layer, t.param)}
    if not chosen:
        log.warning("quantize: no weight matches layers=%s skip=%s", config.layers, config.skip)
    return chosen


def select_layers(module: nn.Module, config: RTNConfig | GPFQConfig | CodebookConfig) -> dict[str, int]:
    """The Linear/Conv layers the config quantizes, by name, with their bit widths."""
    return {
        t.layer: config.bits_for(t.layer, t.param)
        for t in select_weights(module, config).values()
        if t.attr == "weight" and isinstance(module.get_submodule(t.layer), QUANTIZABLE)
    }


def fold_batchnorms(state: ModelState, ctx: StageContext) -> dict:
    """Fold eval-mode BatchNorm into the preceding Conv/Linear (``compress.batchnorm``) and
    record it in ``state.extras`` so that a cached reload rebuilds the folded model."""
    from compress.batchnorm import EXTRAS_KEY, fold_batchnorm

    if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in state.module.modules()):
        return {"folded": [], "left": []}
    example = _example(state, ctx)
    quantized_layers = {name.rpartition(".")[0] for name in state.quant}
    folded, left = fold_batchnorm(state.module, example, skip=quantized_layers)
    state.extras.setdefault(EXTRAS_KEY, []).extend(folded)
    if left:
        log.warning("quantize: BatchNorm left unfolded: %s", "; ".join(f"{x['bn']} ({x['reason']})" for x in left))
    return {"folded": folded, "left": left}


def _example(state: ModelState, ctx: StageContext) -> torch.Tensor:
    """A few real inputs (calibration, else train or eval data) to find and check the folds on."""
    for split in ("calibration", "train", "eval"):
        if ctx.data.has(split):
            return ctx.data[split].x[:64]
    return state.example_input(batch=2)


def _float16_scales(new: dict[str, QuantizedTensor]) -> None:
    """Round each uniform grid's scales to float16 values once its codes are chosen (a relative
    change of at most 2**-11, one per output channel: far below the codes' own error), so the
    export stores them in 2 bytes (``compress.export.fast_kernels.compact_float_constants``);
    the model then runs the rounded scales too (``sync_quantized``).

    After the method, not inside the grid: GPFQ's codes are chosen for the scale it was given,
    and on all-MiniLM-L6-v2 (64 calibration sentences) rounding the scale before GPFQ changed
    its codes enough to cost 0.0013 of mean cosine; rounded after, the mean cosine is unchanged
    (0.99783 / 0.99677 held-out / informal, against 0.99783 / 0.99679).
    """
    for name, qt in new.items():
        if isinstance(qt, UniformTensor):
            new[name] = dataclasses.replace(qt, scale=float16_nearest(qt.scale))


def apply(state: ModelState, config: RTNConfig | GPFQConfig | CodebookConfig, ctx: StageContext) -> ModelState:
    """Quantize ``state.module``'s selected weights with ``config.method``.

    Args:
        state: the model; pruning masks in ``state.masks`` are honoured (pruned weights stay 0).
        config: the config of a registered quantize method (``rtn``, ``gpfq``, ``codebook``, ...);
            the method's function gets ``(state, config, ctx, chosen, masks)`` with ``chosen``
            mapping canonical parameter names to ``WeightTarget`` and bits, and returns the new
            quantized tensors by parameter name plus a report row per weight.
        ctx: calibration data (GPFQ), the train split (codebook fine-tuning), metrics sink.

    Returns:
        ``state`` with ``quant`` filled and the module holding the dequantized weights.
    """
    start = time.perf_counter()
    batchnorm = fold_batchnorms(state, ctx)
    module = state.module
    targets = select_weights(module, config)
    chosen = {p: (t, config.bits_for(t.layer, t.param)) for p, t in targets.items()}
    masks = {p: state.masks.get(p) for p in chosen}
    activations = getattr(config, "activations", "none")
    if activations != "none":
        # Ranges come from the float model, before any weight moves; GPFQ then sees the
        # quantized activations in its X̃ (compress.quantize.activations.quantized_inputs).
        from compress.quantize.activations import EXTRAS_KEY, activation_spec

        smoothing = getattr(config, "smoothing", None)
        calib = ctx.data.calibration().x if activations == "static" or smoothing is not None else None
        # Integer kernels exist for the inputs of Linear/Conv weights, not recurrent or attention ones.
        layers = sorted(
            {
                t.layer
                for t in targets.values()
                if t.attr == "weight" and isinstance(module.get_submodule(t.layer), QUANTIZABLE)
            }
        )
        if smoothing is not None:
            # Before the ranges and the weights' grids: both must see the smoothed tensors.
            from compress.quantize.smooth import smooth_model

            assert calib is not None
            # smoothing_min_bits: a 4-bit per-channel grid cannot absorb the migrated outliers
            min_bits = getattr(config, "smoothing_min_bits", 2)
            alphas = {
                n: a for n in layers if config.bits_for(n) >= min_bits and (a := config.smoothing_for(n)) is not None
            }
            smooth_report = smooth_model(
                module,
                layers,
                calib,
                alphas,
                batch_size=getattr(config, "batch_size", 64),
                bits={n: config.bits_for(n) for n in alphas},
                activations=activations,
                symmetric=getattr(config, "symmetric", True),
                skew=getattr(config, "smoothing_skew", 1.0),
            )
        state.extras[EXTRAS_KEY] = activation_spec(module, layers, calib, config, seed=ctx.seed)
    method_start = time.perf_counter()
    new, report = method_for("quantize", config)(state, config, ctx, chosen, masks)
    method_seconds = time.perf_counter() - method_start
    if activations != "none":
        from compress.quantize.activations import EXTRAS_KEY

        spec = state.extras[EXTRAS_KEY]
        if activations == "static":
            for pname, moved in bound_static_conv_pairs(new, spec).items():
                report.setdefault(targets[pname].key, {})["u8s8_pair_codes_moved"] = moved
        drop_weight_only_layers(new, spec)
    _float16_scales(new)
    embedding_bits = getattr(config, "embedding_bits", None)
    if embedding_bits is not None:
        from compress.quantize.activations import quantize_embeddings

        tables = quantize_embeddings(
            module,
            embedding_bits,
            state.masks,
            getattr(config, "embedding_range", "max"),
            bits_for=lambda name: config.layer_bits_override(name, f"{name}.weight"),
        )
        if not tables:
            log.warning("quantize: embedding_bits=%d but the model has no nn.Embedding", embedding_bits)
        new.update({k: v for k, v in tables.items() if k not in new})
        report.update(
            {
                k.rsplit(".", 1)[0]: {
                    "bits": v.bits,
                    "granularity": "per_row",
                    "scale_from": getattr(config, "embedding_range", "max"),
                }
                for k, v in tables.items()
            }
        )

    replaced = sorted(set(new) & set(state.quant))
    if replaced:
        log.info("quantize: re-quantizing %s", replaced)
    state.quant.update(new)
    state.sync_quantized()
    if activations == "static":
        from compress.quantize.activations import EXTRAS_KEY, round_static_biases

        round_static_biases(module, state.quant, state.extras[EXTRAS_KEY])
    if state.masks:
        state.apply_masks()

    all_targets = weight_targets(module)
    reasons = {}
    for p, t in all_targets.items():
        if p not in state.quant:
            reasons[p] = (
                f"{t.kind}, skipped by the recipe" if p not in chosen else f"{t.kind}, not supported by {config.method}"
            )
    coverage = parameter_coverage(module, set(state.quant), reasons, what="quantize", unsupported_kinds=_unsupported)
    # A weight the method could not treat (e.g. GPFQ rounding a recurrent hidden-state matrix);
    # a candidate the method itself chose ("gpfq (plain rounding on RTN's grid ...)") is not one.
    fallbacks = {
        k: v["algorithm"]
        for k, v in report.items()
        if not str(v.get("algorithm", config.method)).startswith(config.method)
    }
    if fallbacks:
        coverage["fallbacks"] = fallbacks
    quantized = sum(qt.numel for qt in new.values())
    stored = sum(qt.storage_bits() for qt in new.values())
    if activations != "none" and getattr(config, "smoothing", None) is not None:
        report_extra = {"smoothing": smooth_report}
    else:
        report_extra = {}
    ctx.metrics["quantize"] = {
        **report_extra,
        "method": config.method,
        "seconds": time.perf_counter() - start,
        "layers": report,
        "quantized_weights": quantized,
        # The method alone (GPFQ's calibration and codes), without folding and bookkeeping.
        "method_seconds": method_seconds,
        "params_per_second": quantized / method_seconds if method_seconds > 0 else float("nan"),
        "bits_per_weight": stored / quantized if quantized else float("nan"),
        "float_layers": sorted(t.key for p, t in all_targets.items() if p not in state.quant),
        "batchnorm_folded": batchnorm["folded"],
        "batchnorm_unfolded": batchnorm["left"],
    }
    ctx.metrics["coverage"] = coverage
    if batchnorm["folded"]:
        ctx.metrics["notes"] = [
            f"batchnorm: folded {len(batchnorm['folded'])} BatchNorm into the preceding layer ("
            + ", ".join(f"{f['bn']} -> {f['into']}" for f in batchnorm["folded"])
            + ")"
        ]
    log.info("%s", coverage_line("quantize", coverage))
    return state


def drop_weight_only_layers(new: dict[str, QuantizedTensor], spec: dict) -> list[str]:
    """Take out of the activation spec the layers whose weights no integer kernel takes
    (a per-group grid, a codebook, more than 8 bits; for static activations also an
    asymmetric grid): the export writes them weight-only, with float inputs, so PyTorch must
    not round their inputs either (it did: ONNX parity cosine 0.96 on a random MLP with
    per-group or asymmetric static int8). Returns their names."""
    mode = spec.get("mode")
    layers = spec.get("layers", {})
    dropped = []
    for pname in list(layers):
        qt = new.get(pname)
        if qt is None:
            continue
        if not (per_column_ok(qt) and (mode == "dynamic" or qt.zero_point is None)):
            del layers[pname]
            dropped.append(pname)
    if dropped:
        log.warning(
            "%s activations: %s: weights not symmetric per-channel (the integer kernels' layout): "
            "weight-only, inputs left float",
            mode,
            ", ".join(dropped),
        )
    return dropped


def bound_static_conv_pairs(new: dict[str, QuantizedTensor], spec: dict) -> dict[str, int]:
    """Bound the 8-bit codes of static-activation convolutions to ``U8S8_PAIR_LIMIT`` in the
    order onnxruntime's uint8 × int8 convolution sums them (``compress.grid.conv_kernel_order``),
    in place in ``new``; return how many codes moved, per parameter.

    A Linear's codes are bounded by the methods themselves (GPFQ compensates the rounding in
    the channels after it); a convolution's pairs are channels ``2j, 2j+1`` of one kernel
    position, which the methods' column order does not hold side by side, so the few codes of
    a pair over the bound are moved afterwards, the least in squared codes
    (``compress.grid.limit_u8s8_pairs``). Without this, x86 CPUs without VNNI saturate the
    pair's int16 sum (measured: ONNX parity cosine 0.43 on a random-initialised CNN).
    """
    from compress.grid import conv_kernel_order, from_conv_kernel_order, kernel_pairs_fit, limit_u8s8_pairs

    moved: dict[str, int] = {}
    layers = spec.get("layers", {})
    for pname, qt in list(new.items()):
        if pname not in layers or not isinstance(qt, UniformTensor) or qt.zero_point is not None:
            continue
        codes = qt.codes
        if codes.dim() < 3 or kernel_pairs_fit(codes, qt.bits):
            continue
        bounded = from_conv_kernel_order(limit_u8s8_pairs(conv_kernel_order(codes)), codes.shape).contiguous()
        moved[pname] = int((bounded != codes).sum())
        new[pname] = dataclasses.replace(qt, codes=bounded)
        log.info("quantize: %s: %d codes moved to the uint8 x int8 pair bound", pname, moved[pname])
    return moved


def _unsupported(m: nn.Module) -> str | None:
    """Why a weight matrix of ``m`` no quantize method handles stays float."""
    if isinstance(m, nn.Embedding):
        return "Embedding, not quantized by the quantize stage"
    return None


def masks_respected(state: ModelState) -> bool:
    """Whether every pruned weight of a quantized parameter dequantizes to exactly 0."""
    for name, qt in state.quant.items():
        mask = state.masks.get(name)
        if mask is not None and (as_matrix(qt.dequantize())[~as_matrix(mask).bool()] != 0).any():
            return False
    return True
