"""Typed configuration of the ``quantize`` stage (no torch import: the recipe schema is built from it).

One model per method, joined in ``QuantizeConfig``, a union discriminated on ``method``.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.config import TrainConfig, TrainingLoss

GRANULARITIES = ("per_tensor", "per_channel", "per_group")


class LayerSelection(BaseModel):
    """Options every method shares: which layers, at how many bits."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, description="Bits per weight (2..8) for every quantized layer without an override.")
    layers: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Globs over layer names (e.g. 'head.*') or parameter names selecting the Linear/Conv layers to quantize.",
    )
    skip: list[str] = Field(
        default_factory=list,
        description="Globs over layer or parameter names kept in float (e.g. ['net.0', 'head.2']); default: none.",
    )
    layer_bits: dict[str, int] = Field(
        default_factory=dict,
        description="Per-layer bit widths: {glob: bits}; the first glob (in order) that matches a layer wins.",
    )

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {v}")
        return v

    @field_validator("layer_bits")
    @classmethod
    def _check_layer_bits(cls, v: dict[str, int]) -> dict[str, int]:
        for glob, bits in v.items():
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"layer_bits[{glob!r}] must be between 2 and 8, got {bits!r}")
        return v

    def bits_for(self, layer: str, param: str | None = None) -> int:
        """The bit width of ``layer`` (its module name) or of its weight ``param``."""
        override = self.layer_bits_override(layer, param)
        return self.bits if override is None else override

    def layer_bits_override(self, layer: str, param: str | None = None) -> int | None:
        """The bit width the first matching ``layer_bits`` glob gives ``layer``, or None."""
        for glob, bits in self.layer_bits.items():
            if _matches(layer, glob, param):
                return bits
        return None

    def selects(self, layer: str, param: str | None = None) -> bool:
        """Whether ``layer`` (its module name), or its weight ``param`` (a full parameter
        name such as ``rnn.weight_hh_l0``), is quantized rather than kept in float."""
        return any(_matches(layer, g, param) for g in self.layers) and not any(
            _matches(layer, g, param) for g in self.skip
        )


def _matches(layer: str, glob: str, param: str | None = None) -> bool:
    return fnmatch.fnmatchcase(layer, glob) or fnmatch.fnmatchcase(param or f"{layer}.weight", glob)


class _UniformOptions(LayerSelection):
    """Options of the uniform (integer-grid) methods."""

    granularity: Literal["per_tensor", "per_channel", "per_group"] = Field(
        "per_channel",
        description="Scale granularity: one scale per tensor, per output channel, or per group of input columns.",
    )
    group_size: int = Field(
        32,
        description="Input columns sharing one scale when granularity is per_group (a power of two >= 16 lets "
        "onnxruntime fuse 4-bit weights into MatMulNBits). Layers it does not divide fall back to per_channel.",
    )
    symmetric: bool = Field(
        True, description="Symmetric grid around zero (no zero point); false adds an integer zero point per scale."
    )

    activations: Literal["none", "dynamic", "static"] = Field(
        "none",
        description="8-bit activation quantization of the quantized layers' inputs: 'dynamic' (range measured at run "
        "time, for transformers; exported as onnxruntime's DynamicQuantizeMatMul over our integer weights), "
        "'static' (ranges calibrated on the calibration split, for CNNs/MLPs; exported as QDQ that onnxruntime runs "
        "as QLinearConv/QLinearMatMul) or 'none' (float activations). GPFQ sees the quantized activations in X~.",
    )
    activation_calibration: Literal["minmax", "percentile"] = Field(
        "percentile",
        description="static: how a layer's input/output range is set from the calibration data: min/max, or the "
        "activation_percentile-th percentile at both ends (clips rare outliers for a finer grid).",
    )
    activation_percentile: float = Field(
        99.99, description="static, percentile calibration: the upper percentile (the lower one is 100 minus it)."
    )
    smoothing: float | Literal["auto"] | dict[str, float | Literal["auto"] | None] | None = Field(
        None,
        description="SmoothQuant migration strength alpha in [0, 1] (needs activations dynamic or static): each "
        "quantized Linear's input channel j is divided by s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) (measured on "
        "the calibration split) and its weight column multiplied by it, so outlier channels stop setting the 8-bit "
        "activation step. Exported as a Mul before the integer MatMul. 0.7 suits BERT-style encoders. A mapping "
        "{glob over layer names: alpha or null} sets it per layer (the first matching glob wins; layers no glob "
        "matches, or matched to null, are not smoothed), e.g. {'*attention.output.dense': null, '*': 0.7}. "
        "'auto' (globally or per glob): each group of layers reading one tensor takes the alpha among 0.5..0.9 or "
        "none whose scales, fitted on 75% of the calibration split, give the lowest simulated 8-bit output error on "
        "the other 25% (compress.quantize.smooth.AUTO_ALPHAS). null: off.",
    )
    smoothing_skew: float | Literal["auto"] = Field(
        1.0,
        description="With smoothing: how the per-channel magnitude s_j divides out treats the two sides of the "
        "asymmetric (uint8, zero point) activation grid. 1: max|x_j| (SmoothQuant). kappa < 1: max(hi_j, -lo_j / "
        "kappa) when the tensor's negative side is the narrow one (else the mirror), so small channels' narrow tails "
        "(a GELU's -0.17, grown by 1/s_j) cannot stretch the grid. 'auto': each group of layers reading one tensor "
        "takes the kappa among 1, 0.5, 0.25, 0.125 whose scales, fitted on 75% of the calibration split, give the "
        "lowest simulated 8-bit output error on the other 25% (with the alpha when that is 'auto' too).",
    )
    smoothing_min_bits: int = Field(
        2,
        description="Smooth only the layers quantized at this many bits or more (e.g. 8 in a 4/8-bit mix): a "
        "4-bit per-channel grid cannot absorb the outliers smoothing moves into the weights (measured on MiniLM 4/8-bit "
        "mixes: smoothing every layer took the mean cosine 0.965 -> 0.962, only the 8-bit ones 0.971 -> 0.974).",
    )
    embedding_bits: Literal[4, 8] | None = Field(
        None,
        description="Also quantize nn.Embedding tables (round-to-nearest, one scale per row) to 4 or 8 bits; "
        "exported as an integer Gather (the table is often the largest tensor of a transformer). A layer_bits glob "
        "matching a table's name (e.g. '*position_embeddings': 8) overrides it for that table. null: float.",
    )
    embedding_range: Literal["max", "mse"] = Field(
        "max",
        description="How each embedding row's scale is set: 'max' (max |w| of the row, nothing clipped) or 'mse' "
        "(the clipped range, down to half of it, with the lowest squared error of the row; better at 4 bits).",
    )

    @field_validator("activation_percentile")
    @classmethod
    def _check_percentile(cls, v: float) -> float:
        if not 90.0 <= v <= 100.0:
            raise ValueError(f"activation_percentile must be in [90, 100], got {v}")
        return v

    @field_validator("smoothing_skew")
    @classmethod
    def _check_smoothing_skew(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 < float(v) <= 1.0:
            raise ValueError(f"smoothing_skew must be in (0, 1] or 'auto', got {v}")
        return v

    @field_validator("smoothing_min_bits")
    @classmethod
    def _check_smoothing_min_bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"smoothing_min_bits must be between 2 and 8, got {v}")
        return v

    @field_validator("smoothing")
    @classmethod
    def _check_smoothing(cls, v: float | str | dict[str, float | str | None] | None):
        alphas = v.items() if isinstance(v, dict) else [("", v)]
        for glob, alpha in alphas:
            if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
                where = f"[{glob!r}]" if glob else ""
                raise ValueError(f"smoothing{where} (SmoothQuant's alpha) must be in [0, 1], got {alpha}")
        return v

    def smoothing_for(self, layer: str) -> float | str | None:
        """SmoothQuant's alpha for ``layer`` (its module name), ``"auto"``, or None: not smoothed."""
        if not isinstance(self.smoothing, dict):
            return self.smoothing
        return next((a for glob, a in self.smoothing.items() if fnmatch.fnmatchcase(layer, glob)), None)

    @model_validator(mode="after")
    def _smoothing_needs_quantized_activations(self):
        if self.smoothing is not None and self.activations == "none":
            raise ValueError(
                "smoothing moves activation outliers into the weights and only helps quantized activations: "
                "set activations: dynamic (transformers) or static, or remove smoothing"
            )
        return self

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"group_size must be at least 2, got {v}")
        return v


class RTNConfig(_UniformOptions):
    """Round-to-nearest: the baseline; scale from the weight range, no data needed."""

    method: Literal["rtn"] = Field("rtn", description="Round-to-nearest weight quantization.")


class GPFQConfig(_UniformOptions):
    """GPFQ (Zhang, Zhou, Saab 2023): greedy path-following quantization, layer by layer."""

    method: Literal["gpfq"] = Field("gpfq", description="Greedy path-following quantization on calibration data.")
    scale_factor: float | Literal["auto"] = Field(
        "auto",
        description="C in the step size delta = C * R / K (R: the neuron's weight range, K = 2**(bits-1)); "
        "'auto' tries C in 0.8, 0.9, 1.0, 1.16 (the paper's default), 1.3 per layer and keeps the one with the "
        "lowest output error on the calibration data.",
    )
    range_quantile: float = Field(1.0, description="R is this quantile of |w| per neuron (or group); 1.0 uses max |w|.")
    auto_holdout: float = Field(
        0.25,
        description="scale_factor 'auto': the fraction of the calibration samples held out to choose C on (the codes "
        "are fit on the rest, then refit on all samples with the chosen C), so C is not chosen on the data it was fit "
        "to. 0 chooses on the fitting data.",
    )
    sparsity: Literal["none", "l1", "l0"] = Field(
        "none", description="Sparsity-promoting variant: soft (l1) or hard (l0) threshold before rounding."
    )
    sparsity_lambda: float = Field(
        0.1, description="Threshold lambda of the sparsity variant, in units of the step size delta."
    )
    bias_correction: bool = Field(
        False,
        description="Shift each quantized layer's bias so its mean output on calibration data matches the float network's.",
    )
    calibration_samples: int | None = Field(
        None, description="Use at most this many calibration samples (default: the whole calibration split)."
    )
    batch_size: int = Field(256, description="Calibration batch size when capturing layer inputs.")
    max_patches: int = Field(
        16384,
        description="Convolutions: keep at most this many randomly chosen input patches per layer (bounds memory and time).",
    )
    block_size: int = Field(
        128, description="Input columns processed per block of the vectorised greedy loop (speed only; same result)."
    )

    @field_validator("scale_factor", "sparsity_lambda")
    @classmethod
    def _check_positive(cls, v: float, info) -> float:
        if v == "auto":
            return v
        if not v > 0 and not (info.field_name == "sparsity_lambda" and v == 0):
            raise ValueError(f"{info.field_name} must be positive, got {v}")
        return v

    @field_validator("auto_holdout")
    @classmethod
    def _check_holdout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"auto_holdout must be in [0, 1), got {v}")
        return v

    @field_validator("range_quantile")
    @classmethod
    def _check_quantile(cls, v: float) -> float:
        if not 0.5 <= v <= 1.0:
            raise ValueError(f"range_quantile must be in [0.5, 1.0], got {v}")
        return v

    @field_validator("calibration_samples", "batch_size", "max_patches", "block_size")
    @classmethod
    def _check_count(cls, v: int | None, info) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be at least 1, got {v}")
        return v


class CodebookConfig(LayerSelection):
    """Weight sharing (Han et al. 2016): 1-D k-means codebooks of 2**bits values, optional centroid fine-tuning."""

    method: Literal["codebook"] = Field(
        "codebook", description="k-means weight sharing with a codebook per layer or neuron group."
    )
    codebooks_per_layer: int = Field(
        1,
        description="Codebooks per layer: output neurons are grouped by their weight spread and each group gets its own codebook.",
    )
    iterations: int = Field(50, description="Maximum Lloyd iterations of the 1-D k-means.")
    init: Literal["linear", "quantile"] = Field(
        "linear", description="Centroid initialisation: evenly over [min, max] (linear) or at evenly spaced quantiles."
    )
    finetune: TrainConfig | None = Field(
        None,
        description="Fine-tune the centroids (assignments fixed, pruned weights kept zero) on the train split; "
        "null skips fine-tuning.",
    )
    finetune_loss: TrainingLoss | None = Field(
        None,
        description="Loss of the centroid fine-tuning: {loss: ce} or {loss: kd, temperature, alpha} (distillation from "
        "the pipeline's input model). null: cross-entropy when the train split has labels, else distillation.",
    )

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, v: int) -> int:  # codebooks may be as small as 2 entries
        if not 1 <= v <= 8:
            raise ValueError(f"bits must be between 1 and 8 for codebooks, got {v}")
        return v

    @field_validator("layer_bits")
    @classmethod
    def _check_layer_bits(cls, v: dict[str, int]) -> dict[str, int]:
        for glob, bits in v.items():
            if not isinstance(bits, int) or not 1 <= bits <= 8:
                raise ValueError(f"layer_bits[{glob!r}] must be between 1 and 8, got {bits!r}")
        return v

    @field_validator("codebooks_per_layer", "iterations")
    @classmethod
    def _check_count(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be at least 1, got {v}")
        return v
