"""Speed and memory: the side-by-side benchmark (PyTorch pipeline / plain ONNX Runtime / this
runtime), its inputs, worker processes and report, the HTTP load test, hub presets and
paper estimates for a Raspberry Pi.
"""
