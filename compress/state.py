"""What flows between stages: the model plus what a plain ``nn.Module`` cannot hold."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.qtensor import QuantizedTensor

if TYPE_CHECKING:
    from compress.data import DataBundle


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
                params[name].copy_(qt.dequantize().to(params[name].dtype))

    def apply_masks(self) -> None:
        """Zero every masked-out weight (masks are enforced after each optimizer step)."""
        params = self.parameters_by_name()
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].mul_(mask.to(params[name].dtype))


@dataclass
class StageContext:
    """What the runner hands a stage besides the state and its config.

    Stages never load data themselves: ``data`` holds the recipe's splits. ``reference`` is
    the pipeline's input model (frozen, eval mode): the teacher for distillation and the
    reference for fidelity. A stage reports its own numbers by adding to ``metrics``,
    pass/fail checks (``{"gate", "measured", "limit", "passed"}``) to ``checks`` (a failed
    check fails the run like a gate), and files the run should surface at the top of the
    output folder to ``artifacts`` (name -> path inside ``out_dir``).
    """

    data: "DataBundle"
    out_dir: Path
    device: torch.device
    reference: nn.Module
    seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("compress.stage"))
