"""4-bit weight-only quantization (``tools build --quantization int4``): for boards
where memory (size and bandwidth) is the limit rather than arithmetic.

Every MatMul with a constant weight becomes ONNX Runtime's ``MatMulNBits`` (int4
weights in blocks of ``block_size`` along the input dimension, one FP32 scale a
block, symmetric), and the word-embedding lookup becomes ``GatherBlockQuantized``
(int4 rows, blocks along the hidden dimension). Position and token-type embeddings,
layer norms and biases stay FP32: they are small, and position embeddings in 16
steps would blur word order.

``accuracy_level`` 4 lets ONNX Runtime multiply in int8 (activations quantized per
row and block on the fly, which keeps a row's result independent of its batch
mates); 0 dequantizes the weights to FP32 first. The output model uses opset 21 /
IR 10, the first that know the int4 type (ONNX Runtime >= 1.20 reads it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tools import ToolError

log = logging.getLogger(__name__)

# 64: bert-base at 56.9 MB (32: 63.0 MB, 128: 53.8 MB); see the README for fidelity.
BLOCK_SIZE = 64
ACCURACY_LEVEL = 4


def int4_settings(block_size: int, accuracy_level: int, matmuls: int) -> dict[str, Any]:
    """The manifest ``quantization`` entry of an int4 model."""
    return {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer (MatMulNBits, weight-only)",
        "weight_type": f"int4 symmetric, blocks of {block_size} along the input dimension, FP32 scale per block",
        "activation_type": f"FP32 (accuracy_level {accuracy_level}: int8 per row and block inside the kernel)"
        if accuracy_level == 4 else "FP32",
        "op_types": ["MatMul (constant weight)", "Gather (word embedding: GatherBlockQuantized)"],
        "quantized_matmuls": matmuls,
        "batch_independent": True,
        "word_embedding": f"int4 per block of {block_size} (GatherBlockQuantized)",
    }


def quantize_int4_model(fp32_path: str | Path, out_path: str | Path, block_size: int = BLOCK_SIZE,
                        accuracy_level: int = ACCURACY_LEVEL) -> dict[str, Any]:
    """Write the int4 weight-only model of ``fp32_path`` to ``out_path``; return its
    manifest settings."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edge.manifest import INPUT_IDS

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise ToolError(f"{fp32_path}: ONNX model not found")
    model = onnx.load(str(fp32_path))
    inits = {i.name for i in model.graph.initializer}
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    # Of the Gathers, only the word-embedding lookup (the one indexed by input_ids).
    # (nodes_to_include only adds to op_types_to_quantize, so the others are excluded.)
    other_gathers = [n.name for n in model.graph.node
                     if n.op_type == "Gather" and n.input[0] in inits and n.input[1] != INPUT_IDS]
    if not matmuls:
        raise ToolError(f"{fp32_path}: no MatMul with a constant weight to quantize")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quant_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_log.level
    quant_log.setLevel(logging.ERROR)  # it logs every node it visits, and the opset bump
    try:
        quantizer = MatMulNBitsQuantizer(
            model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
            nodes_to_exclude=other_gathers, op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)))
        quantizer.process()
    finally:
        quant_log.setLevel(level)
    quantized = quantizer.model.model
    ops = [n.op_type for n in quantized.graph.node]
    if ops.count("MatMulNBits") != len(matmuls):
        raise ToolError(f"{fp32_path}: {ops.count('MatMulNBits')} of {len(matmuls)} MatMuls became MatMulNBits")
    onnx.checker.check_model(quantized)
    onnx.save(quantized, str(out_path))
    settings = int4_settings(block_size, accuracy_level, len(matmuls))
    if "GatherBlockQuantized" not in ops:
        settings["word_embedding"] = "FP32"
    settings["onnxruntime"] = onnxruntime.__version__
    log.info("int4 %s (%.1f MB) -> %s (%.1f MB), %d MatMulNBits", fp32_path.name, fp32_path.stat().st_size / 1e6,
             out_path.name, out_path.stat().st_size / 1e6, len(matmuls))
    return settings
