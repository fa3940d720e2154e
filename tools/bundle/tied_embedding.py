"""The quantized model's word embedding reads the tied MLM decoder's INT8 weight.

BERT ties its word-embedding table to the MLM decoder weight, and the ONNX export
stores that matrix twice: once for the embedding Gather, once (transposed) for the
decoder MatMul. After quantization the embedding lookup is rewired to read the
decoder's per-channel INT8 weight, so the largest tensor after the encoder is stored
once. Used by dynamic INT8 (:mod:`tools.bundle.quantize`) and static INT8
(:mod:`tools.bundle.quantize_static`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def find_tied_embedding(fp32_model) -> tuple[str, str] | None:
    """Return (word-embedding table, decoder weight) initializer names when the
    decoder MatMul weight is exactly the transposed word-embedding table (a tied
    BERT head, which the exporter stores twice), else None."""
    from onnx import numpy_helper

    from edge.manifest import INPUT_IDS

    graph = fp32_model.graph
    inits = {i.name: i for i in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[1] == INPUT_IDS and n.input[0] in inits]
    if len(gathers) != 1:
        return None
    table_name = gathers[0].input[0]
    table = numpy_helper.to_array(inits[table_name])
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if tuple(weight.dims) == table.shape[::-1] and np.array_equal(numpy_helper.to_array(weight), table.T):
            return table_name, node.input[1]
    return None


def share_tied_embedding(int8_model, table_name: str, weight_name: str) -> bool:
    """Make the word-embedding lookup read the decoder's INT8 weight, so the tied
    ``vocab × hidden`` matrix is stored once (it is the largest single tensor after
    the encoder: 7.7 MB at 10,000 tokens × 768).

    The decoder weight ``W`` is ``[hidden, vocab]`` int8, symmetric, one scale per
    vocabulary entry (per-channel on the output axis). The embedding of token ``t``
    is ``W[:, t] * scale[t]``: Transpose(W) → Gather(axis=0) → Cast → Mul, replacing
    onnxruntime's per-tensor uint8 Gather + DequantizeLinear. The Transpose has only
    constant inputs, so ONNX Runtime folds it once when the session is made: the file
    keeps one copy, and each lookup reads whole rows. (Gathering columns of ``W``
    directly reads one byte per cache line: on bert-base, 24 tokens × 768 lines
    missed behind the encoder's 85 MB of weights, ~1 ms of a 13 ms query.) Returns
    False (model unchanged) when the expected initializers or nodes are not found.
    """
    from onnx import TensorProto, helper, numpy_helper

    from edge.manifest import INPUT_IDS

    graph = int8_model.graph
    inits = {i.name: i for i in graph.initializer}
    q_name, s_name, z_name = (f"{weight_name}_quantized", f"{weight_name}_scale", f"{weight_name}_zero_point")
    if not all(n in inits for n in (q_name, s_name, z_name)):
        return False
    q, scale, zero = inits[q_name], inits[s_name], inits[z_name]
    vocab = q.dims[1]
    if q.data_type != TensorProto.INT8 or list(scale.dims) != [vocab] or numpy_helper.to_array(zero).any():
        return False
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[1] == INPUT_IDS
                   and n.input[0] in (f"{table_name}_quantized", table_name)), None)
    if gather is None:
        return False
    dequant = next((n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == gather.output[0]), None)
    old_nodes = [gather] + ([dequant] if dequant is not None else [])
    out_name = (dequant or gather).output[0]
    prefix = "/shared_word_embedding"
    axes = helper.make_tensor(f"{prefix}/axes", TensorProto.INT64, [1], [-1])
    new_nodes = [
        helper.make_node("Transpose", [q_name], [f"{prefix}/table"], name=f"{prefix}/Transpose", perm=[1, 0]),
        helper.make_node("Gather", [f"{prefix}/table", INPUT_IDS], [f"{prefix}/rows"], name=f"{prefix}/Gather", axis=0),
        helper.make_node("Cast", [f"{prefix}/rows"], [f"{prefix}/rows_f"], name=f"{prefix}/Cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", [s_name, INPUT_IDS], [f"{prefix}/scale"], name=f"{prefix}/GatherScale", axis=0),
        helper.make_node("Unsqueeze", [f"{prefix}/scale", axes.name], [f"{prefix}/scale3"], name=f"{prefix}/Unsqueeze"),
        helper.make_node("Mul", [f"{prefix}/rows_f", f"{prefix}/scale3"], [out_name], name=f"{prefix}/Mul"),
    ]
    position = list(graph.node).index(gather)
    for node in old_nodes:
        graph.node.remove(node)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(position + offset, node)
    graph.initializer.append(axes)
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return True


def share_tied_embedding_in_file(fp32_path: str | Path, quantized_path: str | Path, settings: dict) -> None:
    """When the FP32 model ties its word embedding to the MLM decoder, make the quantized
    model's embedding read the decoder's INT8 weight (one copy), and say so in ``settings``."""
    import onnx

    tied = find_tied_embedding(onnx.load(str(fp32_path)))
    if not tied:
        return
    model = onnx.load(str(quantized_path))
    if share_tied_embedding(model, *tied):
        onnx.checker.check_model(model)
        onnx.save(model, str(quantized_path))
        settings["word_embedding"] = "QInt8 per row, shared with the tied MLM decoder weight"
        log.info("word embedding now shares the decoder's INT8 weight (%s)", tied[1])
