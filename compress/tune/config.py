"""The ``search:`` section of a recipe (typed, no torch import: the recipe schema is built from it).

The space is a product of *global variants* (a sparsity level of the prune stage, a quantize
method, and any other quantize option listed under ``options``) and, inside each variant, a
bit width per layer. New quantize options (activation quantization, ...) join the space by
being listed under ``options``; nothing here needs to know them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FLOAT = "float"


def _default_bits() -> list[int | Literal["float"]]:
    return [2, 3, 4, 8, "float"]


class SearchBudget(BaseModel):
    """How much the search may spend: end-to-end candidates and/or wall time."""

    model_config = ConfigDict(extra="forbid")

    candidates: int = Field(
        16,
        ge=1,
        description="End-to-end candidate runs (each one through every stage, ONNX export included), baselines included.",
    )
    seconds: float | None = Field(
        None,
        gt=0,
        description="Wall-time limit of the search in seconds; no new candidate starts after it (null: none).",
    )


class SearchSpec(BaseModel):
    """Goal-driven search (``compress tune``): the smallest or fastest model that passes the gates."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal["packed_size", "onnx_size", "latency"] | None = Field(
        None,
        description="What to minimise among the candidates that pass every gate: 'packed_size' (the lossless stage's "
        "packed weights, where low bits and sparsity pay off), 'onnx_size' (the exported ONNX file; onnx stores 2-4 bit "
        "weights in 4-bit containers), or 'latency' (onnxruntime p50 of one sample). Default: packed_size when the "
        "recipe has a compress stage, else onnx_size.",
    )
    bits: list[int | Literal["float"]] = Field(
        default_factory=_default_bits,
        min_length=1,
        description="Bit widths a layer may get; 'float' keeps the layer unquantized (listed under the quantize stage's skip).",
    )
    sparsity: list[float] | None = Field(
        None,
        description="Sparsity levels tried for the prune stage's 'amount' (null: the recipe's own amount only).",
    )
    methods: list[str] | None = Field(
        None, description="Quantize methods tried (e.g. [gpfq, rtn]); null: the recipe's own method."
    )
    options: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Further quantize-config keys to try, each with its values (e.g. {granularity: [per_channel, per_group]}); "
        "every combination is a variant of its own.",
    )
    layers: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Globs over the quantized layers whose bits are searched; the others keep the recipe's bits.",
    )
    sensitivity: Literal["auto", "kl", "cosine"] = Field(
        "auto",
        description="How a perturbed layer's effect on the output is measured on the calibration split: 'kl' (KL "
        "divergence of the softmax outputs, for classifiers), 'cosine' (1 - cosine similarity), 'auto' (kl when a gate "
        "concerns accuracy or agreement, else cosine).",
    )
    sensitivity_samples: int = Field(
        256, ge=1, description="Calibration samples on which each layer's sensitivity is measured."
    )
    baselines: bool = Field(
        True,
        description="Also run every uniform bit width (all searched layers at the same bits) as a candidate: the "
        "reference points of the trade-off, and anchors of the bisection.",
    )
    budget: SearchBudget = Field(
        default_factory=SearchBudget, description="Candidates and wall time the search may spend."
    )

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, v: list) -> list:
        for b in v:
            if b != FLOAT and not 1 <= b <= 8:
                raise ValueError(f"bits must be 1..8 or 'float', got {b!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"bits lists a width twice: {v}")
        return v

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if not v:
                raise ValueError("sparsity must list at least one level (or be null)")
            for s in v:
                if not 0 <= s < 1:
                    raise ValueError(f"sparsity levels must be in [0, 1), got {s}")
        return v

    @field_validator("options")
    @classmethod
    def _check_options(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if key in ("method", "bits", "layer_bits", "skip", "layers"):
                raise ValueError(f"options.{key}: the search sets {key} itself (use search.methods / search.bits)")
            if not isinstance(values, list) or not values:
                raise ValueError(f"options.{key} must be a non-empty list of values, got {values!r}")
        return v
