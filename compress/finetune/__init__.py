"""The `finetune` stage: train the current model with the shared loop (labels or distillation)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from compress.config import TrainConfig, TrainingLoss
from compress.registry import register_stage


class FinetuneConfig(TrainingLoss):
    """Train the model entering the stage; pruning masks stay enforced, quantized weights stay on their grid."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5), description="Training hyper-parameters.")


register_stage(
    "finetune",
    FinetuneConfig,
    apply="compress.finetune.stage:apply",
    summary="Fine-tune the current model with the shared training loop (multi-process with --nproc)",
    needs=("train",),
    order=30,
)
