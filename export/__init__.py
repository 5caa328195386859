"""ONNX export and TensorRT engine build (installed as `ldm_rt.export`).

Nothing here imports onnx or tensorrt at package import.
"""
