"""Distillation: knowledge distillation, quantized distillation, differentiable
quantization (learned points) and Born-Again Networks.

Kept light: registering the stage imports no torch; ``distill.stage:apply`` is resolved
only when the stage runs.
"""

from compress.registry import register_stage
from distill.config import (
    BornAgainConfig,
    DiffQuantConfig,
    DistillConfig,
    KDConfig,
    QuantizedDistillConfig,
)

register_stage(
    "distill",
    DistillConfig,
    apply="distill.stage:apply",
    summary=(
        "Distillation from the model entering the stage: KD into a student, quantized distillation, "
        "differentiable quantization (learned points), Born-Again Networks"
    ),
    needs=("train",),
)

__all__ = ["BornAgainConfig", "DiffQuantConfig", "DistillConfig", "KDConfig", "QuantizedDistillConfig"]
