"""Typed configs shared by several stages, kept free of heavy imports (the recipe
validator and `compress schema` load them without torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """How to train: shared by every stage that trains."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0, description="Passes over the training split.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (L2; decoupled for adamw).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule over all steps.")
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for initialisation-independent randomness (shuffling).")


class DistillationLoss(BaseModel):
    """Hinton et al.'s distillation loss, alpha*T^2*KL(teacher || student) + (1 - alpha)*CE(labels):
    the one definition every training stage uses (``compress.train.kd_loss``)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(
        2.0,
        gt=0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("temperature", "kd_temperature"),
        description="Distillation temperature T.",
    )
    alpha: float = Field(
        0.7,
        ge=0,
        le=1,
        validation_alias=AliasChoices("alpha", "kd_alpha"),
        description=(
            "Weight of the distillation term, alpha*T^2*KL; (1 - alpha) weighs cross-entropy on the labels. "
            "1 = teacher only (unlabelled data), 0 = labels only (no teacher)."
        ),
    )


class TrainingLoss(DistillationLoss):
    """Loss options shared by the stages that train a model against the one entering them."""

    loss: Literal["ce", "kd"] = Field(
        "kd",
        description=(
            "Training loss: 'kd' distils from the model as it entered the stage "
            "(for prune: the pipeline's float input model; temperature and alpha apply), "
            "'ce' is cross-entropy on the train split's labels."
        ),
    )
