"""Lossless ZipNN-style packing of weights, integer codes and masks (the ``compress`` stage).

Kept light on purpose: importing this package registers the stage without importing
numpy or torch; the codec is loaded when the stage runs or a file is packed.
"""

from compress.lossless.config import CompressStageConfig
from compress.registry import register_stage

register_stage(
    "compress",
    CompressStageConfig,
    apply="compress.lossless.stage:apply",
    summary="Lossless ZipNN-style coding of the weights, integer codes and masks",
)
