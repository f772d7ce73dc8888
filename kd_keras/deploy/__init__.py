"""Deployment: ONNX, INT8, TFLite, export, prediction, benchmarks."""
