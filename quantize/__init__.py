"""Quantization stage: round-to-nearest, GPFQ and codebook (weight-sharing) quantization.

Light on purpose: importing this package registers the stage without importing torch.
"""

from compress.quantize.config import CodebookConfig, GPFQConfig, RTNConfig
from compress.registry import register_method, register_stage

register_stage(
    "quantize",
    apply="compress.quantize.stage:apply",
    summary="Quantize Linear/Conv weights: round-to-nearest, GPFQ (data-driven) or k-means codebooks.",
    needs=("calibration",),
    order=40,
)
# A method: fn(state, config, ctx, chosen: {param: (WeightTarget, bits)}, masks: {param: mask | None})
#   -> ({param: UniformTensor | CodebookTensor}, {target.key: report row}); see compress.quantize.stage.
register_method("quantize", RTNConfig, apply="compress.quantize.rtn:quantize_method")
register_method("quantize", GPFQConfig, apply="compress.quantize.gpfq:quantize_method")
register_method("quantize", CodebookConfig, apply="compress.quantize.codebook:quantize_method")

__all__ = ["CodebookConfig", "GPFQConfig", "RTNConfig"]
