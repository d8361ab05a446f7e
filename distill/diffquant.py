"""Differentiable quantization (Polino, Pascanu & Alistarh, ICLR 2018): learned points.

Each quantized weight tensor gets a sorted vector of ``2**bits`` quantization points ``p`` in
the tensor's scaled space ``(w − β)/α`` (``α = max − min``, ``β = min`` over the tensor),
initialised at the quantiles of the scaled weights or evenly on ``[0, 1]``. In the forward
pass every weight snaps to its nearest point, ``v̂ = α·p[j(i)] + β``; autograd then gives the
paper's gradient ``∂L/∂p_j = Σ_{i assigned to j} α·∂L/∂v̂_i``. Only the points train (the float
weights only decide the assignment); they are re-sorted after every step. The loss is
distillation from the float teacher.

One scaling per tensor (not per bucket) makes the result an exact codebook: the stored
``QuantizedTensor`` holds uint8 indices and the codebook ``α·p + β`` of shape ``(1, 2**bits)``.

Optional bit allocation: layers get bits in proportion to the norm of the distillation loss'
gradient with respect to their weights, within ``[min_bits, max_bits]`` and an average
budget.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.qtensor import CodebookTensor, QuantizedTensor
from compress.train import LossFn, TrainConfig

log = logging.getLogger(__name__)

PointsInit = Literal["quantiles", "uniform"]


def initial_points(scaled: torch.Tensor, bits: int, init: PointsInit) -> torch.Tensor:
    """``2**bits`` sorted points in ``[0, 1]``: quantiles of ``scaled`` or evenly spaced."""
    k = 2**bits
    if init == "uniform":
        return torch.linspace(0.0, 1.0, k)
    if init == "quantiles":
        flat = scaled.detach().flatten().float()
        if flat.numel() > 1_000_000:  # torch.quantile's input limit is 16M; a sample suffices
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        return torch.quantile(flat, (torch.arange(k, dtype=torch.float32) + 0.5) / k).sort().values
    raise ValueError(f"points_init {init!r} is not one of 'quantiles', 'uniform'")


def nearest_point(scaled: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``points`` for every value of ``scaled``."""
    mid = (points[1:] + points[:-1]) / 2
    return torch.bucketize(scaled, mid.detach())


class LearnedPoints(nn.Module):
    """Parametrization of a weight: every value snaps to its nearest learned point.

    Args:
        weight: the float weight (fixes ``α``, ``β`` and, through the parametrized original,
            the assignment).
        bits: ``2**bits`` points.
        init: ``"quantiles"`` or ``"uniform"``.
    """

    alpha: torch.Tensor
    beta: torch.Tensor

    def __init__(self, weight: torch.Tensor, bits: int, init: PointsInit = "quantiles") -> None:
        super().__init__()
        w = weight.detach().float()
        self.bits = bits
        self.register_buffer("alpha", (w.max() - w.min()).clamp_min(torch.finfo(torch.float32).tiny))
        self.register_buffer("beta", w.min().clone())
        self.points = nn.Parameter(initial_points((w - self.beta) / self.alpha, bits, init))

    def scaled(self, original: torch.Tensor) -> torch.Tensor:
        return (original.detach().float() - self.beta) / self.alpha

    def codebook(self) -> torch.Tensor:
        """The points in weight units, ``α·p + β``."""
        return self.alpha * self.points + self.beta

    def assignments(self, original: torch.Tensor) -> torch.Tensor:
        return nearest_point(self.scaled(original), self.points)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.codebook()[self.assignments(original)].to(original.dtype)

    @torch.no_grad()
    def sort_(self) -> None:
        self.points.copy_(self.points.sort().values)


def layer_gradient_norms(
    student: nn.Module,
    teacher: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor | None,
    layers: list[str],
    loss_fn: LossFn,
    batch_size: int = 256,
    max_batches: int = 8,
) -> dict[str, float]:
    """Norm of the loss' gradient with respect to each layer's weight, summed over a few batches."""
    mods = dict(student.named_modules())
    weights = {name: mods[name].weight for name in layers}
    grads = {name: torch.zeros_like(w) for name, w in weights.items()}
    was_training = student.training
    flags = {name: w.requires_grad for name, w in weights.items()}
    student.eval()
    try:
        for w in weights.values():
            w.requires_grad_(True)  # the student may be a frozen copy
        for b in range(min(max_batches, math.ceil(len(x) / batch_size))):
            xb = x[b * batch_size : (b + 1) * batch_size]
            yb = None if y is None else y[b * batch_size : (b + 1) * batch_size]
            with torch.no_grad():
                tb = teacher(xb) if teacher is not None else None
            g = torch.autograd.grad(loss_fn(student(xb), yb, tb), list(weights.values()))
            for name, gi in zip(weights, g):
                grads[name] += gi
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
        student.train(was_training)
    return {name: g.norm().item() for name, g in grads.items()}


def allocate_bits(
    norms: dict[str, float], sizes: dict[str, int], budget: float, min_bits: int = 2, max_bits: int = 8
) -> dict[str, int]:
    """Integer bits per layer proportional to ``norms``, averaging at most ``budget`` per weight.

    Solves ``Σ n_l·clip(c·g_l, min, max) = budget·Σ n_l`` for ``c`` by bisection, rounds down,
    then spends what is left on the layers with the largest remainders.
    """
    if not min_bits <= budget <= max_bits:
        raise ValueError(f"bit budget {budget} must lie between min_bits {min_bits} and max_bits {max_bits}")
    names = list(norms)
    total = sum(sizes[n] for n in names)
    allowed = budget * total

    def spent(c: float) -> float:
        return sum(sizes[n] * min(max(c * norms[n], min_bits), max_bits) for n in names)

    lo, hi = 0.0, 1.0
    while spent(hi) < allowed and hi < 1e12:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) <= allowed else (lo, mid)
    target = {n: min(max(lo * norms[n], min_bits), max_bits) for n in names}
    bits = {n: math.floor(target[n] + 1e-9) for n in names}
    used = sum(sizes[n] * bits[n] for n in names)
    for n in sorted(names, key=lambda n: target[n] - bits[n], reverse=True):
        if bits[n] < max_bits and used + sizes[n] <= allowed + 1e-6:
            bits[n] += 1
            used += sizes[n]
    return bits


def differentiable_quantize(
    student: nn.Module,
    teacher: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor | None,
    cfg: TrainConfig,
    layer_bits: dict[str, int],
    *,
    points_init: PointsInit = "quantiles",
    learn_points: bool = True,
    temperature: float = 2.0,
    alpha: float = 0.7,
    mixup: int = 0,
) -> tuple[dict[str, QuantizedTensor], dict]:
    """Learn quantization points for ``layer_bits``' layers of ``student`` (in place).

    Args:
        student: a trained float model; its quantized layers end up holding codebook values.
        teacher: the float teacher of the distillation loss.
        x, y: the training split.
        cfg: training of the points.
        layer_bits: ``{layer name: bits}``.
        points_init: initial points.
        learn_points: False keeps the initial points (the untrained baseline).
        temperature, alpha: the distillation loss.
        mixup: teacher-labelled mixup copies of the inputs (see ``compress.distill.kd.distill``).

    Returns:
        (``{"<layer>.weight": codebook QuantizedTensor}``, ``fit``'s summary).
    """
    from compress.distill.kd import distill

    mods = dict(student.named_modules())
    frozen = [p for p in student.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only the points train
    pts: dict[str, LearnedPoints] = {}
    for name, bits in layer_bits.items():
        pts[name] = LearnedPoints(mods[name].weight, bits, points_init)
        parametrize.register_parametrization(mods[name], "weight", pts[name])
    try:
        summary = {"steps": 0, "final_loss": float("nan"), "seconds": 0.0}
        if learn_points and cfg.epochs > 0:

            def sort_points() -> None:
                for lp in pts.values():
                    lp.sort_()

            params = [lp.points for lp in pts.values()]
            summary = distill(
                student, teacher, x, y, cfg, temperature, alpha, mixup, params=params, after_step=sort_points
            )
        quant: dict[str, QuantizedTensor] = {}
        with torch.no_grad():
            for name, lp in pts.items():
                original = mods[name].parametrizations.weight.original
                idx = lp.assignments(original)
                quant[f"{name}.weight"] = CodebookTensor(
                    codes=idx.to(torch.uint8),
                    bits=lp.bits,
                    codebook=lp.codebook().detach().reshape(1, -1).clone(),
                    method="differentiable_quantization",
                )
    finally:
        for name in pts:
            parametrize.remove_parametrizations(mods[name], "weight", leave_parametrized=True)
        for p in frozen:
            p.requires_grad_(True)
        for name in pts:
            mods[name].weight.requires_grad_(True)
    with torch.no_grad():  # the module holds exactly what the codebook stores
        for key, qt in quant.items():
            dict(student.named_parameters())[key].copy_(qt.dequantize())
    student.eval()
    log.info("differentiable quantization: %s", {n: b for n, b in layer_bits.items()})
    return quant, summary


def distill_method(state, teacher: nn.Module, config, ctx) -> tuple[nn.Module, dict, dict]:
    """The ``differentiable_quantization`` method of the distill stage (see ``compress.distill.stage``)."""
    from compress.distill.kd import build_student, distill, distillation_loss
    from compress.distill.quantized import quantizable_layers
    from compress.metrics import evaluate

    train = ctx.data["train"]
    x, y = train.x, train.y
    ev = ctx.data["eval"] if ctx.data.has("eval") else None
    metrics = ctx.metrics
    student = build_student(config.student, config.student_kwargs, state.module, ctx.seed)
    if config.student != "input":
        pre = distill(student, teacher, x, y, config.pretrain, config.temperature, config.alpha, config.mixup)
        metrics["pretrain_seconds"] = round(pre["seconds"], 3)
        if ev is not None and ev.y is not None:
            metrics["float_student_accuracy"] = evaluate(student, ev.x, ev.y)["accuracy"]
    layers = quantizable_layers(student, config.keep_first_last_float)
    if config.bit_budget is not None:
        loss_fn, needs_teacher = distillation_loss(config.temperature, config.alpha)
        norms = layer_gradient_norms(student, teacher if needs_teacher else None, x, y, layers, loss_fn)
        mods = dict(student.named_modules())
        sizes = {n: mods[n].weight.numel() for n in layers}
        layer_bits = allocate_bits(norms, sizes, config.bit_budget, config.min_bits, config.max_bits)
        metrics["gradient_norms"] = {n: round(v, 6) for n, v in norms.items()}
    else:
        layer_bits = {n: config.bits for n in layers}
    metrics["layer_bits"] = layer_bits
    quant, summary = differentiable_quantize(
        student,
        teacher,
        x,
        y,
        config.train,
        layer_bits,
        points_init=config.points_init,
        learn_points=config.learn_points,
        temperature=config.temperature,
        alpha=config.alpha,
        mixup=config.mixup,
    )
    return student, quant, summary
