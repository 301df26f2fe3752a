"""Camera object detectors: ultralytics YOLO weights (.pt), ONNX and TensorRT engines.

Heavy packages (ultralytics, onnxruntime, tensorrt) are imported lazily by the loaders.
"""
