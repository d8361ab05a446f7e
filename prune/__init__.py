"""Pruning: unstructured magnitude (one-shot or gradual), structured variance-based
pruning of MLP blocks, and lottery tickets with rewinding.

Kept light: registering the stage imports no torch; ``compress.prune.stage:apply`` is resolved
only when the stage runs.
"""

from compress.prune.config import LotteryConfig, MagnitudeConfig, VarianceConfig
from compress.registry import register_method, register_stage

register_stage(
    "prune",
    apply="compress.prune.stage:apply",
    summary="Pruning: magnitude (one-shot/gradual masks), variance-based structured MLP pruning, lottery tickets",
    needs=("train", "calibration"),
    order=20,
)
# A method: fn(state, config, ctx) -> state (masks set, or modules physically smaller).
register_method("prune", MagnitudeConfig, apply="compress.prune.magnitude:magnitude_prune")
register_method("prune", VarianceConfig, apply="compress.prune.variance:apply_variance")
register_method("prune", LotteryConfig, apply="compress.prune.lottery:lottery_prune")

__all__ = ["LotteryConfig", "MagnitudeConfig", "VarianceConfig"]
