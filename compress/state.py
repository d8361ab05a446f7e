"""What flows between stages: the model plus what a plain ``nn.Module`` cannot hold."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.qtensor import QuantizedTensor

if TYPE_CHECKING:
    from compress.data import DataBundle

log = logging.getLogger(__name__)


@dataclass
class ModelState:
    """The model and everything the stages learned about it.

    Attributes:
        module: the model; its float weights are what PyTorch evaluates (for quantized
            parameters: the dequantized values, kept in sync by ``sync_quantized``).
        input_shape: the example input's shape, batch dimension first.
        quant: per-parameter quantization, keyed by parameter name (``"fc1.weight"``).
        masks: per-parameter pruning masks (bool, True = kept), keyed by parameter name.
        lineage: one entry per stage that ran: ``{"stage", "config", "config_hash"}``.
        extras: JSON-able facts a stage wants to hand on (e.g. lottery tickets' densities).
        example: a few real input samples (from the recipe's data), for tracing and export.
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    quant: dict[str, QuantizedTensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    example: torch.Tensor | None = None

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """``batch`` real samples when the recipe has data (tracing and export see real
        inputs, e.g. valid token ids), else seeded random floats of the input shape."""
        if self.example is not None and len(self.example) >= batch:
            return self.example[:batch]
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape[1:]), generator=g)

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    def sync_quantized(self) -> None:
        """Write each quantized parameter's dequantized value into the module."""
        params = self.parameters_by_name()
        with torch.no_grad():
            for name, qt in self.quant.items():
                if name not in params:
                    raise KeyError(f"quantized tensor {name!r} matches no parameter of the model")
                params[name].copy_(qt.dequantize().to(params[name].device, params[name].dtype))

    @contextlib.contextmanager
    def computing_in_float32(self) -> Iterator[None]:
        """The model computes in float32 for the duration, as onnxruntime's CPU kernels do.

        Half-precision (bfloat16, float16) parameters and buffers are cast up, and each
        quantized parameter then takes its exact dequantized values: a bfloat16 parameter can
        only hold them rounded to 8 significant bits. On exit every tensor gets its own dtype
        back (the quantized ones rounded again), so the state is as it was.
        """
        tensors: dict[int, tuple[torch.Tensor, torch.dtype]] = {}
        for t in [*self.module.parameters(), *self.module.buffers()]:
            if t.is_floating_point() and t.dtype != torch.float32:
                tensors.setdefault(id(t), (t, t.dtype))
        if not tensors:
            yield
            return
        log.info("computing in float32: %d half-precision tensors cast up", len(tensors))
        with torch.no_grad():
            for t, _ in tensors.values():
                t.data = t.data.float()
            self.sync_quantized()
        try:
            yield
        finally:
            with torch.no_grad():
                for t, dtype in tensors.values():
                    t.data = t.data.to(dtype)
                self.sync_quantized()

    def apply_masks(self) -> None:
        """Zero every masked-out weight (masks are enforced after each optimizer step)."""
        params = self.parameters_by_name()
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].mul_(mask.to(params[name].device, params[name].dtype))


@dataclass
class StageOutputs:
    """Typed results a stage publishes for the runner, which reads them without knowing
    which stage wrote them (the latest stage that set a field wins).

    Attributes:
        latency_p50_ms: median latency of one sample on the deployment runtime; the
            ``max_latency_ms`` gate checks the latest one.
        latency_p90_ms: its 90th percentile.
        latency_vs_float: that latency as a multiple of the float model's, measured side by
            side (below 1: faster than float); ``latency_vs_float_b32`` the same at batch 32.
        bundle_limits: limits a device bundle carries for ``compress validate`` to check
            again (e.g. ``{"min_agreement": 0.99}``).
        runtime_session: runtime session settings the model was checked with, carried by
            the device bundle so the device builds the same session.
    """

    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_vs_float: float | None = None
    latency_vs_float_b32: float | None = None
    bundle_limits: dict[str, float] = field(default_factory=dict)
    runtime_session: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p90_ms": self.latency_p90_ms,
            "latency_vs_float": self.latency_vs_float,
            "latency_vs_float_b32": self.latency_vs_float_b32,
            "bundle_limits": dict(self.bundle_limits),
            "runtime_session": self.runtime_session,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> StageOutputs:
        d = d or {}
        return cls(
            latency_p50_ms=d.get("latency_p50_ms"),
            latency_p90_ms=d.get("latency_p90_ms"),
            latency_vs_float=d.get("latency_vs_float"),
            latency_vs_float_b32=d.get("latency_vs_float_b32"),
            bundle_limits=dict(d.get("bundle_limits") or {}),
            runtime_session=d.get("runtime_session"),
        )


@dataclass
class StageContext:
    """What the runner hands a stage besides the state and its config.

    Stages never load data themselves: ``data`` holds the recipe's splits. ``reference`` is
    the pipeline's input model (frozen, eval mode): the teacher for distillation and the
    reference for fidelity. A stage reports its own numbers by adding to ``metrics``,
    pass/fail checks (``{"gate", "measured", "limit", "passed"}``) to ``checks`` (a failed
    check fails the run like a gate), and files the run should surface at the top of the
    output folder to ``artifacts`` (name -> path inside ``out_dir``). Typed results the
    runner acts on (latency, device-bundle limits and session settings) go to ``outputs``.
    ``device`` is where the stage should compute: the runner moves the model there before
    the stage and back to the CPU after it; the shared training loop and ``predict`` move
    batches to the model's device.

    The runner does not hold a second full model for the whole run: it passes
    ``reference_loader``, and the reference is built (from the model file, on ``device``,
    frozen) the first time a stage reads ``ctx.reference``, and dropped with the context
    after the stage. A stage that never reads it never pays for it.
    """

    data: DataBundle
    out_dir: Path
    device: torch.device
    # A property after the class body: built on first read, so not in repr or ==.
    reference: nn.Module | None = field(repr=False, compare=False)
    seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    outputs: StageOutputs = field(default_factory=StageOutputs)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("compress.stage"))
    reference_loader: Callable[[], nn.Module] | None = field(default=None, repr=False)

    @property
    def reference_loaded(self) -> bool:
        """Whether the reference model exists now (given, or built by a read of ``reference``)."""
        return self.__dict__.get("_reference") is not None

    def release_reference(self) -> None:
        """Drop a reference built from ``reference_loader`` (it is built again if read again)."""
        if self.reference_loader is not None:
            self.__dict__["_reference"] = None


def _get_reference(ctx: StageContext) -> nn.Module | None:
    module = ctx.__dict__.get("_reference")
    if module is None and ctx.reference_loader is not None:
        module = ctx.reference_loader()
        module.eval().to(ctx.device)
        for p in module.parameters():
            p.requires_grad_(False)
        ctx.__dict__["_reference"] = module
    return module


def _set_reference(ctx: StageContext, module: nn.Module | None) -> None:
    ctx.__dict__["_reference"] = module


# The dataclass __init__ assigns ``reference`` through this property, so ``StageContext(...,
# reference=model)`` keeps working while the runner passes ``reference=None`` and a loader.
StageContext.reference = property(_get_reference, _set_reference)  # type: ignore[assignment]
