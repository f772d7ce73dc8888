"""Deployment: runtimes files, ONNX, INT8, TFLite, export, prediction, benchmarks."""
