"""ONNX export, onnxruntime parity, latency and size checks (the stage registers in export.config)."""
