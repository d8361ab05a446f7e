"""Quantization stage: round-to-nearest, GPFQ and codebook (weight-sharing) quantization.

Light on purpose: importing this package registers the stage without importing torch.
"""

from compress.registry import register_stage
from quantize.config import CodebookConfig, GPFQConfig, QuantizeConfig, RTNConfig

register_stage(
    "quantize",
    QuantizeConfig,
    apply="quantize.stage:apply",
    summary="Quantize Linear/Conv weights: round-to-nearest, GPFQ (data-driven) or k-means codebooks.",
    needs=("calibration",),
)

__all__ = ["CodebookConfig", "GPFQConfig", "QuantizeConfig", "RTNConfig"]
