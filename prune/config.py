"""Typed configs of the prune stage (kept free of heavy imports: no torch here).

The stage config is a discriminated union on ``method``; the recipe JSON Schema is
generated from the field descriptions below.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.config import TrainConfig, TrainingLoss


class MagnitudeConfig(TrainingLoss):
    """Unstructured magnitude pruning: zero the weights of smallest |w| (masks, same shapes)."""

    method: Literal["magnitude"] = Field(description="Pruning method.")
    amount: float = Field(
        ge=0,
        lt=1,
        description=(
            "Target sparsity: fraction of the prunable weights (conv/linear weights not skipped) set to zero."
        ),
    )
    scope: Literal["layer", "global"] = Field(
        "global",
        description="'global': one magnitude threshold over all prunable weights; 'layer': the same sparsity in every layer.",
    )
    skip: list[str] | None = Field(
        None,
        description=(
            "Glob patterns of module or parameter names kept dense (e.g. 'features.0', 'head.*'). "
            "Default (null): the first and the last prunable layer. An empty list prunes every layer."
        ),
    )
    max_layer_sparsity: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Cap on any single layer's sparsity under global scope, so no layer collapses; null = no cap.",
    )
    schedule: Literal["one_shot", "gradual"] = Field(
        "one_shot",
        description=(
            "'one_shot': prune once, then optionally fine-tune; 'gradual': Zhu & Gupta's cubic schedule "
            "s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 during fine-tuning (needs 'finetune')."
        ),
    )
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="Gradual schedule: sparsity s_i at step t0.")
    begin_step: int = Field(0, ge=0, description="Gradual schedule: fine-tuning step t0 at which pruning begins.")
    frequency: int = Field(10, ge=1, description="Gradual schedule: masks are updated every this many steps (dt).")
    ramp_fraction: float = Field(
        0.75,
        gt=0,
        le=1,
        description=(
            "Gradual schedule: the ramp n*dt ends at this fraction of the fine-tuning steps; the rest "
            "fine-tunes at the final sparsity."
        ),
    )
    finetune: TrainConfig | None = Field(
        None, description="Fine-tuning after (one-shot) or during (gradual) pruning, masks enforced; null = none."
    )

    @model_validator(mode="after")
    def _schedule_needs_training(self) -> MagnitudeConfig:
        if self.schedule == "gradual" and (self.finetune is None or self.finetune.epochs == 0):
            raise ValueError("schedule 'gradual' prunes during fine-tuning: set 'finetune' with epochs > 0")
        if self.schedule == "gradual" and self.initial_sparsity > self.amount:
            raise ValueError(
                f"initial_sparsity {self.initial_sparsity} exceeds the final sparsity amount {self.amount}"
            )
        return self


class VarianceConfig(TrainingLoss):
    """Structured variance-based pruning of MLP blocks (Berisha et al., ICCV 2025)."""

    method: Literal["variance"] = Field(description="Pruning method.")
    amount: float = Field(
        ge=0,
        lt=1,
        description="Fraction of all MLP blocks' hidden neurons removed, ranked globally by the statistic.",
    )
    blocks: list[tuple[str, str]] | None = Field(
        None,
        description=(
            "MLP blocks as [first_linear, second_linear] module-name pairs (the activation between them); "
            "null = find every Linear -> activation -> Linear block by tracing the model."
        ),
    )
    statistic: Literal["variance", "output_variance", "pre_activation_variance", "magnitude"] = Field(
        "variance",
        description=(
            "Neuron ranking: 'variance' of the activation after the nonlinearity (the method); "
            "'output_variance' weighs it by the squared norm of the neuron's column in the second layer "
            "(the exact output error of removing it with the mean fold); "
            "'pre_activation_variance' and 'magnitude' (L2 norm of the first layer's row) are ablations."
        ),
    )
    mean_fold: bool = Field(
        True, description="Fold removed neurons' mean activations into the next layer's bias (b2 += W2[:, pruned] mu)."
    )
    scope: Literal["global", "block"] = Field(
        "global",
        description=(
            "'global': rank all blocks' neurons together (the method); 'block': remove 'amount' of every "
            "block separately (for stacked MLPs whose blocks' activation scales differ)."
        ),
    )
    min_neurons: int = Field(1, ge=1, description="Neurons every block keeps at least.")
    calibration_batch_size: int | None = Field(
        None, ge=1, description="Batch size for gathering statistics; null = the calibration split's own."
    )
    finetune: TrainConfig | None = Field(
        None,
        description="Optional fine-tuning after pruning (distillation from the reference by default); null = none.",
    )


class LotteryConfig(TrainingLoss):
    """Iterative magnitude pruning with weight rewinding (Frankle et al. 2019/2020)."""

    method: Literal["lottery"] = Field(description="Pruning method.")
    rounds: int = Field(
        5, ge=1, le=50, description="Prune-rewind-retrain rounds; density after n rounds is (1 - rate)^n."
    )
    rate: float = Field(0.2, gt=0, lt=1, description="Fraction of the remaining prunable weights removed each round.")
    rewind_to: int = Field(
        0,
        ge=0,
        description="Rewinding step k: survivors are reset to their values after k training steps (0 = original ticket).",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Training of the dense network and of every round.",
    )
    skip: list[str] | None = Field(
        None,
        description=(
            "Glob patterns of module or parameter names kept dense. Default (null): the output layer "
            "(the last prunable layer). An empty list prunes every conv/linear weight."
        ),
    )
    control: Literal["none", "random_reinit"] = Field(
        "none",
        description="'random_reinit' also trains the final mask from a fresh random initialisation and reports its accuracy.",
    )
    init_seed: int | None = Field(
        None, description="Seed of the fresh initialisation theta_0; null = the pipeline seed."
    )
    loss: Literal["ce", "kd"] = Field(
        "ce", description="Training loss: 'ce' on the train split's labels, or 'kd' from the stage's reference model."
    )
