"""Typed config of the export stage (kept free of heavy imports)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compress.registry import register_stage


class ExportConfig(BaseModel):
    """Export to ONNX and check the file on onnxruntime CPU, the way an edge device runs it."""

    model_config = ConfigDict(extra="forbid")

    opset: int = Field(21, ge=18, le=23, description="ONNX opset (>= 18; int4 weights need 21).")
    exporter: Literal["dynamo", "legacy"] = Field(
        "dynamo", description="torch.onnx exporter: 'dynamo' (torch.export based) or the deprecated TorchScript-based 'legacy'."
    )
    dynamic_batch: bool = Field(True, description="Make the batch axis dynamic.")
    atol: float = Field(1e-4, ge=0, description="Max absolute output difference allowed between onnxruntime and PyTorch.")
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance, applied as atol + rtol * |reference|.")
    min_agreement: float = Field(
        1.0, ge=0, le=1, description="Minimum top-1 agreement between onnxruntime and PyTorch on the eval split."
    )
    min_cosine: float | None = Field(
        None, ge=-1, le=1,
        description="Minimum cosine similarity between onnxruntime's and PyTorch's output of every eval sample (null: not checked).",
    )
    latency_runs: int = Field(100, ge=1, description="Timed single-sample runs for the latency percentiles.")
    latency_warmup: int = Field(10, ge=0, description="Untimed runs before timing.")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (1 = a small edge CPU core).")
    exact_quantized_kernels: bool = Field(
        True,
        description="Quantized models: run onnxruntime's fused N-bit MatMul in fp32 (parity with the PyTorch model "
        "to float rounding). false keeps onnxruntime's default, which quantizes activations to 8 bits: several times "
        "faster on large layers, outputs within about 0.5%; judge it with atol/rtol or min_cosine. The device bundle "
        "carries the choice.",
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
)
