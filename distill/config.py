"""Typed configs of the distill stage (no torch imports: the recipe schema is built from them).

The stage config is a union discriminated on ``method``:

* ``kd``: Hinton et al.'s knowledge distillation into a (usually smaller) student.
* ``quantized``: Polino et al.'s quantized distillation (bucketed linear quantizer in the
  forward pass, full-precision shadow weights receive the gradient).
* ``differentiable_quantization``: Polino et al.'s learned quantization points (a codebook
  per layer) trained by distillation from the float teacher.
* ``born_again``: Furlanello et al.'s Born-Again Networks (same architecture, generations).

In every method the teacher is a frozen copy of the model *entering* the stage, so the stage
also works after other stages (for a pipeline that starts with distill it is the input model).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.config import DistillationLoss, TrainConfig

STUDENT_KEYWORDS = ("same", "input")
ROUNDINGS = ("deterministic", "stochastic")
POINT_INITS = ("quantiles", "uniform")
BAN_VARIANTS = ("ban", "ban_l", "cwtm", "dkpp")

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _check_student(value: str, allowed: tuple[str, ...]) -> str:
    if value in allowed or (_FACTORY.match(value) and value not in STUDENT_KEYWORDS):
        return value
    raise ValueError(
        f"student {value!r} is not one of {', '.join(repr(a) for a in allowed)} "
        "nor a factory reference 'package.module:function'"
    )


def _check_bits(value: int, what: str = "bits") -> int:
    if not 2 <= value <= 8:
        raise ValueError(f"{what} must be between 2 and 8, got {value}")
    return value


class _Student(BaseModel):
    """Which network is trained."""

    model_config = ConfigDict(extra="forbid")

    student: str = Field(
        "same",
        description=(
            "The student: 'same' = a fresh, seeded initialisation of the teacher's architecture; "
            "'input' = a copy of the model entering the stage, weights kept; or a factory "
            "'package.module:function' called with student_kwargs (e.g. 'compress.zoo:mnist1d_cnn')."
        ),
    )
    student_kwargs: dict = Field(
        default_factory=dict, description="Keyword arguments of the student factory (e.g. {channels: 16, hidden: 64})."
    )

    @field_validator("student")
    @classmethod
    def _student(cls, v: str) -> str:
        return _check_student(v, STUDENT_KEYWORDS)

    @model_validator(mode="after")
    def _kwargs_need_factory(self):
        if self.student_kwargs and self.student in STUDENT_KEYWORDS:
            raise ValueError(f"student_kwargs are only used with a factory student, not student {self.student!r}")
        return self


class _KDLoss(DistillationLoss):
    mixup: int = Field(
        0,
        ge=0,
        description=(
            "Extra copies of the training inputs made by mixup (lambda*x_i + (1-lambda)*x_j, lambda ~ U(0,1)) whose "
            "only target is the teacher's output; an epoch covers (1 + mixup) x the train split. 0 = none. "
            "Needs alpha > 0."
        ),
    )

    @model_validator(mode="after")
    def _mixup_needs_teacher(self):
        if self.mixup and self.alpha == 0:
            raise ValueError(
                f"mixup {self.mixup} makes unlabelled inputs: they need the teacher (alpha > 0), got alpha 0"
            )
        return self


class KDConfig(_Student, _KDLoss):
    """Knowledge distillation (Hinton et al. 2015) into a student."""

    method: Literal["kd"] = Field(description="Distillation method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="How the student is trained.")


class QuantizedDistillConfig(_Student, _KDLoss):
    """Quantized distillation (Polino et al. 2018): quantized forward pass, float shadow weights."""

    method: Literal["quantized"] = Field(description="Distillation method.")
    bits: int = Field(4, description="Bits per weight (2..8) of every quantized Linear/Conv weight.")
    bucket: int = Field(
        256,
        ge=1,
        description=(
            "Bucket size d: values sharing one min/max scaling. Buckets are groups of consecutive input "
            "columns of a row (the largest power-of-two divisor >= 16 of the row length that is <= d, else "
            "its largest divisor <= d; a whole row when the row is no longer than d)."
        ),
    )
    rounding: Literal["deterministic", "stochastic"] = Field(
        "deterministic",
        description="Rounding in the training forward pass; the stored weights always use deterministic rounding.",
    )
    keep_first_last_float: bool = Field(
        False, description="Keep the first and the last Linear/Conv layer in float (the paper's higher-precision ends)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="How the student is trained.")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        return _check_bits(v)


class DiffQuantConfig(_Student, _KDLoss):
    """Differentiable quantization (Polino et al. 2018): learn each layer's quantization points."""

    method: Literal["differentiable_quantization"] = Field(description="Distillation method.")
    student: str = Field(
        "input",
        description=(
            "Whose weights get learned points: 'input' (default) = the model entering the stage; 'same' = a fresh "
            "initialisation of its architecture; or a factory 'package.module:function'. 'same' and factories "
            "are first trained in float by distillation ('pretrain')."
        ),
    )
    bits: int = Field(3, description="Bits per weight (2..8): 2**bits points per quantized layer.")
    points_init: Literal["quantiles", "uniform"] = Field(
        "quantiles", description="Initial points: quantiles of the layer's weights, or evenly spaced on [min, max]."
    )
    learn_points: bool = Field(
        True, description="Train the points (false = keep the initial points: the uniform/quantile baseline)."
    )
    keep_first_last_float: bool = Field(False, description="Keep the first and the last Linear/Conv layer in float.")
    bit_budget: float | None = Field(
        None,
        description=(
            "Average bits per quantized weight to allocate across layers in proportion to each layer's gradient "
            "norm (between min_bits and max_bits); null = every layer gets 'bits'."
        ),
    )
    min_bits: int = Field(2, description="Bit allocation: fewest bits a layer gets.")
    max_bits: int = Field(8, description="Bit allocation: most bits a layer gets.")
    pretrain: TrainConfig | None = Field(
        None,
        description="Float distillation of the student before the points are learned (required unless student is 'input').",
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=5, lr=1e-3),
        description="Training of the points (only the points are updated; a small learning rate).",
    )

    @field_validator("student")
    @classmethod
    def _student(cls, v: str) -> str:
        return _check_student(v, STUDENT_KEYWORDS)

    @field_validator("bits", "min_bits", "max_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        return _check_bits(v)

    @model_validator(mode="after")
    def _consistent(self) -> DiffQuantConfig:
        if self.student != "input" and (self.pretrain is None or self.pretrain.epochs == 0):
            raise ValueError(
                f"student {self.student!r} starts untrained: set 'pretrain' (float distillation) or use student 'input'"
            )
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits {self.min_bits} exceeds max_bits {self.max_bits}")
        if self.bit_budget is not None and not self.min_bits <= self.bit_budget <= self.max_bits:
            raise ValueError(
                f"bit_budget {self.bit_budget} must lie between min_bits {self.min_bits} and max_bits {self.max_bits}"
            )
        return self


class BornAgainConfig(BaseModel):
    """Born-Again Networks (Furlanello et al. 2018): generations of the same architecture."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["born_again"] = Field(description="Distillation method.")
    generations: int = Field(
        2,
        ge=1,
        description="Born-again generations trained after the teacher (generation 0 = the model entering the stage).",
    )
    variant: Literal["ban", "ban_l", "cwtm", "dkpp"] = Field(
        "ban",
        description=(
            "'ban': cross-entropy to the previous generation's softmax only; 'ban_l': plus the label term; "
            "'cwtm': label cross-entropy weighted per sample by the teacher's confidence; 'dkpp': distil against "
            "the teacher's probabilities with the non-argmax ones randomly permuted."
        ),
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the teacher/student outputs (paper: 1).")
    ensemble: bool = Field(
        True,
        description=(
            "Also measure the ensemble (mean softmax) of generations 1..k; an ensemble is not one ONNX model, so "
            "only its accuracy is recorded and a single generation goes down the pipeline."
        ),
    )
    select: Literal["last", "best"] = Field(
        "last",
        description=(
            "Which generation goes down the pipeline: the last, or the best on the eval split (selecting on the "
            "split the report measures is optimistic)."
        ),
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="How every generation is trained (the same each generation)."
    )


__all__ = [
    "BAN_VARIANTS",
    "POINT_INITS",
    "ROUNDINGS",
    "BornAgainConfig",
    "DiffQuantConfig",
    "KDConfig",
    "QuantizedDistillConfig",
]
