"""ONNX export, onnxruntime parity, latency and size checks."""

from compress.registry import register_stage
from export.config import ExportConfig

register_stage(
    "export",
    ExportConfig,
    apply="export.stage:apply",
    summary="ONNX export checked on onnxruntime CPU: parity with PyTorch, latency, size",
    needs=("eval",),
)
