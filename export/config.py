"""Typed config of the export stage (kept free of heavy imports)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from compress.registry import register_stage


class ExportConfig(BaseModel):
    """Export to ONNX and check the file on onnxruntime CPU, the way an edge device runs it."""

    model_config = ConfigDict(extra="forbid")

    opset: int = Field(21, ge=18, le=23, description="ONNX opset (>= 18; int4 weights need 21).")
    exporter: Literal["dynamo", "legacy"] = Field(
        "dynamo",
        description="torch.onnx exporter: 'dynamo' (torch.export based) or the deprecated TorchScript-based 'legacy'.",
    )
    dynamic_batch: bool = Field(True, description="Make the batch axis dynamic.")
    atol: float = Field(
        1e-4, ge=0, description="Max absolute output difference allowed between onnxruntime and PyTorch."
    )
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance, applied as atol + rtol * |reference|.")
    min_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="Minimum top-1 agreement between onnxruntime and PyTorch on the eval split (integer kernels "
        "round activations, so a near-tie may flip: 1.0 is right only with exact_quantized_kernels).",
    )
    min_cosine: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Minimum cosine similarity between onnxruntime's and PyTorch's output of every eval sample (null: not checked).",
    )
    latency_runs: int = Field(100, ge=1, description="Timed single-sample runs for the latency percentiles.")
    latency_warmup: int = Field(10, ge=0, description="Untimed runs before timing.")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (1 = a small edge CPU core).")
    exact_quantized_kernels: bool = Field(
        False,
        description="Quantized models: true runs onnxruntime's fused N-bit MatMul in fp32 (parity with the PyTorch "
        "model to float rounding; slower). false (default) takes onnxruntime's fast path, which rounds activations to "
        "8 bits, as do the integer kernels of activations: dynamic/static; parity is then judged by cosine "
        "(fast_kernel_min_cosine) and top-1 agreement instead of atol/rtol. The device bundle carries the choice.",
    )
    weight_only_kernel: Literal["folded", "matmul_nbits"] = Field(
        "folded",
        description="Quantized weights without integer activations: folded (default) stores the integer codes and "
        "a Cast + Mul onnxruntime folds into a float weight at load (float speed, never slower); matmul_nbits lets "
        "onnxruntime fuse Linears into MatMulNBits (4/8-bit weights in memory too; slower than float on CPUs "
        "without int8 dot-product instructions).",
    )
    fast_kernel_min_cosine: float = Field(
        0.99,
        ge=-1,
        le=1,
        description="With fast (integer-activation) kernels: the minimum per-sample cosine between onnxruntime's and "
        "PyTorch's outputs for the parity check (atol/rtol hold only for exact kernels and float models).",
    )
    fuse_attention: bool = Field(
        True,
        description="Rewrite each attention subgraph torch exports (q·kᵀ, scale, additive mask, softmax, ·v and the "
        "heads' reshapes and transposes, about a dozen nodes) into one onnxruntime com.microsoft MultiHeadAttention "
        "kernel. Same math; only subgraphs whose shapes the rewrite can prove are fused (the count is in the "
        "metrics as fused_attention). false keeps standard ONNX operators only, for runtimes other than onnxruntime.",
    )
    ort_disabled_fusions: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]] = Field(
        ["SkipLayerNormFusion"],
        description="onnxruntime graph transformers switched off in the session the model is checked and timed with "
        "(the float twin too); the device bundle carries the list. Default: SkipLayerNormFusion, whose fused "
        "Add + LayerNormalization kernel ran 5x slower than the two nodes it replaces on onnxruntime 1.32 x86-64 "
        "(all-MiniLM-L6-v2 int8, batch 32: 16.3 ms against 3.2 ms; the whole model 12% faster without it). [] keeps "
        "onnxruntime's defaults. onnxruntime ignores names it does not know.",
    )
    compare_float: bool = Field(
        True,
        description="Quantized models: also time the same model exported in float, and report the latency ratio "
        "(latency_vs_float; below 1 is faster than float).",
    )
    ort_format: bool = Field(
        False,
        description="Also write model.ort, onnxruntime's ORT format for minimal/mobile builds, and check its parity too.",
    )


register_stage(
    "export",
    ExportConfig,
    apply="compress.export.stage:apply",
    summary="ONNX export checked on onnxruntime CPU: parity with PyTorch, latency, size",
    needs=("eval",),
    order=60,
    provides=("latency",),
    describes_model=True,
    changes_model=False,
)
