"""The `finetune` stage: train the current model with the shared loop (labels or distillation)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compress.config import TrainConfig
from compress.registry import register_stage


class FinetuneConfig(BaseModel):
    """Train the model entering the stage; pruning masks stay enforced, quantized weights stay on their grid."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5), description="Training hyper-parameters.")
    distill: bool = Field(
        True, description="Distil from the stage's input model (Hinton KD) instead of training on labels alone."
    )
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T.")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the distillation term; 1 - alpha weighs the label loss.")


register_stage(
    "finetune",
    FinetuneConfig,
    apply="compress.finetune.stage:apply",
    summary="Fine-tune the current model with the shared training loop (multi-process with --nproc)",
    needs=("train",),
)
