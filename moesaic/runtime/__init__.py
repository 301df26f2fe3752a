"""Engines (ONNX Runtime, TensorRT, PyTorch), devices, energy meters and the profiler."""
