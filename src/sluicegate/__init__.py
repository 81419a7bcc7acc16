"""Sluicegate: a gated MLOps pipeline from raw batch to served ONNX model."""

__version__ = "0.1.0"
