"""Pruning: unstructured magnitude (one-shot or gradual), structured variance-based
pruning of MLP blocks, and lottery tickets with rewinding.

Kept light: registering the stage imports no torch; ``prune.stage:apply`` is resolved
only when the stage runs.
"""

from compress.registry import register_stage
from prune.config import LotteryConfig, MagnitudeConfig, PruneConfig, VarianceConfig

register_stage(
    "prune",
    PruneConfig,
    apply="prune.stage:apply",
    summary="Pruning: magnitude (one-shot/gradual masks), variance-based structured MLP pruning, lottery tickets",
    needs=("train", "calibration"),
)

__all__ = ["LotteryConfig", "MagnitudeConfig", "PruneConfig", "VarianceConfig"]
