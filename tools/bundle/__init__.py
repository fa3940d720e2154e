"""Checkpoint → verified bundle and back: load a Hugging Face checkpoint, trim its vocabulary, export
the ONNX graph with the vocabulary projection at the blanks only, quantize, verify against
PyTorch, assemble and ship the bundle, read a bundle back into a checkpoint.
"""
