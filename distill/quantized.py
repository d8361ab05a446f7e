"""Quantized distillation (Polino, Pascanu & Alistarh, ICLR 2018).

The student trains with its weights quantized in the forward pass while full-precision
"shadow" weights receive the gradient (straight-through estimator). The quantizer is the
paper's bucketed linear ("min/max") scaling: per bucket of ``d`` values, ``α = max − min``,
``β = min``; ``2**bits`` levels; deterministic or stochastic rounding.

Buckets are groups of consecutive input columns of one row of the weight viewed as
``(out, in_flat)`` (a bucket of ``d`` consecutive values of the flattened tensor when ``d``
divides the row length), so a quantized weight is exactly a ``QuantizedTensor`` with per-group
``scale`` of shape ``(out, in_flat / d)`` and an int8 ``zero_point``: levels ``0..2**bits−1``
are stored shifted into the signed range, ``code = level + qmin``.

One deviation from the paper keeps the stored integers exact: ``β`` is rounded to a multiple
of the step (an integer zero point) and every bucket's range includes 0. A level grid
``β + k·α/(s−1)`` with arbitrary ``β`` has no integer zero point, so it could not be stored as
``(codes − zero_point)·scale``; the rounded grid moves by at most half a step (the largest
weight of a bucket may clip by at most half a step).

Shadow weights live in ``fit``'s hooks: ``before_step`` keeps ``w`` and writes ``Q(w)`` into
the parameter; ``after_step`` sets ``w ← w + (p − Q(w))``, i.e. applies to the shadow weight
the update the optimizer just made. The update of Adam/SGD does not depend on the parameter's
value, so this equals stepping the shadow weight with the gradient taken at ``Q(w)`` (weight
decay, if any, is applied at ``Q(w)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compress.coverage import weight_matrices
from compress.errors import InputError
from compress.grid import uniform_scale
from compress.qtensor import QuantizedTensor, UniformTensor, signed_range

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
MIN_FUSED_BLOCK = 16  # onnxruntime fuses blockwise int4 weights for power-of-two blocks >= 16
Rounding = Literal["deterministic", "stochastic"]


def bucket_columns(cols: int, bucket: int) -> int:
    """Input columns per bucket for a row of ``cols`` values and a bucket size ``bucket``.

    A whole row when ``cols <= bucket``; else the largest power-of-two divisor of ``cols`` in
    ``[16, bucket]`` (what onnxruntime's blockwise int4 kernels fuse), else the largest divisor
    of ``cols`` that is ``<= bucket``.
    """
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    if cols <= bucket:
        return cols
    p = 1 << (bucket.bit_length() - 1)
    while p >= MIN_FUSED_BLOCK:
        if cols % p == 0:
            return p
        p >>= 1
    return max(d for d in range(1, bucket + 1) if cols % d == 0)


@dataclass
class BucketGrid:
    """Per-bucket linear grid: value of level ``l`` is ``(l − zero_level)·scale``.

    Attributes:
        scale: ``(rows, groups)`` step ``α / (2**bits − 1)``.
        zero_level: ``(rows, groups)`` integer level of 0 (``−β / scale``), in ``[0, 2**bits − 1]``.
        bits: bits per value.
        group: columns per bucket.
    """

    scale: torch.Tensor
    zero_level: torch.Tensor
    bits: int
    group: int

    @property
    def levels(self) -> int:
        return 2**self.bits


def bucket_grid(w: torch.Tensor, bits: int, group: int) -> BucketGrid:
    """Polino's min/max scaling of every bucket of ``group`` columns of ``w`` viewed as (out, in_flat).

    The shared asymmetric grid of ``compress.grid.uniform_scale`` (range widened to include
    0, step ``(max − min) / (2**bits − 1)``), with its signed zero point as an unsigned level.
    """
    rows = w.shape[0]
    v = w.detach().float().reshape(rows, -1)
    if v.shape[1] % group:
        raise ValueError(f"bucket of {group} columns does not divide rows of {v.shape[1]} values")
    granularity = "per_group" if group < v.shape[1] else "per_channel"
    scale, zero_point = uniform_scale(v, bits, granularity=granularity, group_size=group, symmetric=False)
    assert zero_point is not None  # an asymmetric grid always has one
    qmin, _ = signed_range(bits)
    zero_level = zero_point.float() - qmin
    return BucketGrid(scale=scale, zero_level=zero_level, bits=bits, group=group)


def quantize_levels(
    w: torch.Tensor, grid: BucketGrid, rounding: Rounding = "deterministic", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Integer levels (as float, shape ``(rows, groups, group)``) of ``w`` on ``grid``.

    Deterministic: ``round(w/scale) + zero_level``. Stochastic: ``⌊x⌋ + Bernoulli(x − ⌊x⌋)`` with
    ``x = w/scale + zero_level`` (unbiased inside the grid). Clipped to ``[0, 2**bits − 1]``.
    """
    rows = w.shape[0]
    v = w.detach().float().reshape(rows, -1, grid.group)
    x = v / grid.scale.unsqueeze(-1) + grid.zero_level.unsqueeze(-1)
    if rounding == "deterministic":
        q = torch.round(x)
    elif rounding == "stochastic":
        low = torch.floor(x)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        q = low + (u < (x - low)).to(x.dtype)
    else:
        raise ValueError(f"rounding {rounding!r} is not one of 'deterministic', 'stochastic'")
    return q.clamp(0, grid.levels - 1)


def dequantize_levels(levels: torch.Tensor, grid: BucketGrid, shape: torch.Size) -> torch.Tensor:
    """Float values of ``levels``: ``(level − zero_level)·scale`` (bit-identical to the QuantizedTensor)."""
    return ((levels - grid.zero_level.unsqueeze(-1)) * grid.scale.unsqueeze(-1)).reshape(shape)


def bucket_quantize(
    w: torch.Tensor,
    bits: int,
    bucket: int = 256,
    rounding: Rounding = "deterministic",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``Q(w)``: ``w`` quantized with the bucketed linear quantizer (same shape and dtype)."""
    w2 = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    group = bucket_columns(w2.shape[1], bucket)
    grid = bucket_grid(w2, bits, group)
    return (
        dequantize_levels(quantize_levels(w2, grid, rounding, generator), grid, w2.shape).reshape(w.shape).to(w.dtype)
    )


def to_quantized_tensor(w: torch.Tensor, bits: int, bucket: int = 256) -> QuantizedTensor:
    """Deterministic ``Q(w)`` as a ``QuantizedTensor`` (per-group scale and int8 zero point).

    ``result.dequantize()`` equals ``bucket_quantize(w, bits, bucket)`` exactly.
    """
    if w.dim() < 2:
        raise ValueError(
            f"only weights of Linear/Conv layers (>= 2-D) are stored quantized, got shape {tuple(w.shape)}"
        )
    group = bucket_columns(w[0].numel(), bucket)
    grid = bucket_grid(w, bits, group)
    levels = quantize_levels(w, grid)
    qmin, _ = signed_range(bits)
    codes = (levels + qmin).to(torch.int8).reshape(w.shape)
    zero_point = (grid.zero_level + qmin).to(torch.int8)
    return UniformTensor(
        codes=codes, bits=bits, scale=grid.scale.clone(), zero_point=zero_point, method="quantized_distillation"
    )


def quantizable_layers(module: nn.Module, keep_first_last_float: bool = False) -> list[str]:
    """Names of the Linear/Conv layers whose weights are quantized, in definition order."""
    names = [name for name, m in module.named_modules() if isinstance(m, QUANTIZABLE)]
    if keep_first_last_float:
        names = names[1:-1]
    return names


def quantizable_weights(module: nn.Module, keep_first_last_float: bool = False) -> list[str]:
    """Canonical names of the weights trained quantized, in definition order: Linear/Conv
    weights, GRU/LSTM/RNN input/hidden matrices and attention input projections
    (``compress.coverage.weight_matrices``); a tied weight once."""
    names = [pname for pname, *_ in weight_matrices(module)]
    if keep_first_last_float:
        names = names[1:-1]
    return names


class ShadowWeights:
    """``fit`` hooks for training with quantized weights and float shadow weights.

    Args:
        params: the weights trained quantized, by name.
        bits, bucket, rounding: the quantizer.
        seed: seed of the stochastic rounding.
    """

    def __init__(
        self, params: dict[str, nn.Parameter], bits: int, bucket: int, rounding: Rounding, seed: int = 0
    ) -> None:
        self.params = params
        self.bits, self.bucket, self.rounding = bits, bucket, rounding
        self.generator = torch.Generator().manual_seed(seed)
        self._shadow: dict[str, torch.Tensor] = {}
        self._quantized: dict[str, torch.Tensor] = {}

    def before_step(self) -> None:
        """Keep the shadow weights; put their quantized values into the parameters."""
        with torch.no_grad():
            for name, p in self.params.items():
                self._shadow[name] = p.detach().clone()
                q = bucket_quantize(p, self.bits, self.bucket, self.rounding, self.generator)
                self._quantized[name] = q
                p.copy_(q)

    def after_step(self) -> None:
        """Apply the optimizer's update to the shadow weights and put them back."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self._shadow[name] + (p - self._quantized[name]))
        self._shadow.clear()
        self._quantized.clear()

    def finalize(self) -> dict[str, QuantizedTensor]:
        """Quantize the shadow weights (deterministic rounding) into the parameters; return them stored."""
        out = {}
        with torch.no_grad():
            for name, p in self.params.items():
                qt = to_quantized_tensor(p.detach(), self.bits, self.bucket)
                p.copy_(qt.dequantize().to(p.dtype))
                out[name] = qt
        return out


def weight_params(module: nn.Module, layers: list[str]) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for ``layers`` (weight names, or layer names meaning ``<layer>.weight``)."""
    params = dict(module.named_parameters())
    return {(n if n in params else f"{n}.weight"): params[n if n in params else f"{n}.weight"] for n in layers}


def quantized_distill(
    student: nn.Module,
    teacher: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor | None,
    cfg,
    *,
    bits: int = 4,
    bucket: int = 256,
    rounding: Rounding = "deterministic",
    keep_first_last_float: bool = False,
    temperature: float = 2.0,
    alpha: float = 0.7,
    mixup: int = 0,
) -> tuple[dict[str, QuantizedTensor], dict]:
    """Train ``student`` in place with quantized weights; leave ``Q(w)`` in it.

    ``alpha = 0`` is the labels-only baseline (the same quantized training, no teacher);
    ``mixup`` adds teacher-labelled mixup inputs (see ``compress.distill.kd.distill``).

    Returns:
        (``{"<layer>.weight": QuantizedTensor}``, ``fit``'s summary).
    """
    from compress.distill.kd import distill

    layers = quantizable_weights(student, keep_first_last_float)
    if not layers:
        raise InputError(
            "quantized distillation: the student has no Linear/Conv/recurrent/attention weight to quantize"
        )
    shadow = ShadowWeights(weight_params(student, layers), bits, bucket, rounding, seed=cfg.seed)
    summary = distill(
        student,
        teacher,
        x,
        y,
        cfg,
        temperature,
        alpha,
        mixup,
        before_step=shadow.before_step,
        after_step=shadow.after_step,
    )
    quant = shadow.finalize()
    log.info("quantized distillation: %d layers at %d bits, bucket %d", len(quant), bits, bucket)
    return quant, summary


def rtn_bucket_quantize(
    module: nn.Module, bits: int, bucket: int = 256, keep_first_last_float: bool = False
) -> dict[str, QuantizedTensor]:
    """Round-to-nearest with the same quantizer (no training): the post-training baseline. In place."""
    layers = quantizable_weights(module, keep_first_last_float)
    quant = {}
    with torch.no_grad():
        for name, p in weight_params(module, layers).items():
            qt = to_quantized_tensor(p.detach(), bits, bucket)
            p.copy_(qt.dequantize().to(p.dtype))
            quant[name] = qt
    return quant


def distill_method(state, teacher: nn.Module, config, ctx) -> tuple[nn.Module, dict, dict]:
    """The ``quantized`` method of the distill stage (Polino et al.; see ``compress.distill.stage``)."""
    from compress.distill.kd import build_student

    train = ctx.data["train"]
    student = build_student(config.student, config.student_kwargs, state.module, ctx.seed)
    # Fold BatchNorm first: the student then trains the weights that run (and export),
    # instead of quantized weights an exporter would rescale by the BatchNorm afterwards.
    from compress.batchnorm import EXTRAS_KEY, fold_batchnorm

    if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in student.modules()):
        folded, left = fold_batchnorm(student, train.x[:64])
        state.extras.setdefault(EXTRAS_KEY, []).extend(folded)
        summary_folds = {"batchnorm_folded": folded, "batchnorm_unfolded": left}
    else:
        summary_folds = {}
    quant, summary = quantized_distill(
        student,
        teacher,
        train.x,
        train.y,
        config.train,
        bits=config.bits,
        bucket=config.bucket,
        rounding=config.rounding,
        keep_first_last_float=config.keep_first_last_float,
        temperature=config.temperature,
        alpha=config.alpha,
        mixup=config.mixup,
    )
    summary.update(summary_folds)
    return student, quant, summary
