"""Distillation: knowledge distillation, quantized distillation, differentiable
quantization (learned points) and Born-Again Networks.

Kept light: registering the stage imports no torch; ``compress.distill.stage:apply`` is resolved
only when the stage runs.
"""

from compress.distill.config import BornAgainConfig, DiffQuantConfig, KDConfig, QuantizedDistillConfig
from compress.registry import register_method, register_stage

register_stage(
    "distill",
    apply="compress.distill.stage:apply",
    summary=(
        "Distillation from the model entering the stage: KD into a student, quantized distillation, "
        "differentiable quantization (learned points), Born-Again Networks"
    ),
    needs=("train",),
    order=10,
)
# A method: fn(state, teacher, config, ctx) -> (student, {"param": QuantizedTensor}, summary);
# see compress.distill.stage.
register_method("distill", KDConfig, apply="compress.distill.kd:distill_method")
register_method("distill", QuantizedDistillConfig, apply="compress.distill.quantized:distill_method")
register_method("distill", DiffQuantConfig, apply="compress.distill.diffquant:distill_method")
register_method("distill", BornAgainConfig, apply="compress.distill.born_again:distill_method")

__all__ = ["BornAgainConfig", "DiffQuantConfig", "KDConfig", "QuantizedDistillConfig"]
