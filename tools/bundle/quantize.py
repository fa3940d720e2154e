"""Dynamic INT8 quantization of the FP32 ONNX masked-LM (and, opt-in, ONNX
Runtime's BERT graph fusions before it); ``quantize`` picks between it, static
INT8 (``quantize_static.py``) and int4 weight-only (``quantize_int4.py``).

Weights are QInt8, per output channel, symmetric; activations are quantized on the
fly to QUInt8 (the only activation type of ONNX Runtime's dynamic quantization; its
u8×s8 kernels are the fast path on ARM64 and x86 alike. On x86 CPUs without VNNI the
u8×s8 AVX2 kernel can saturate; ``--reduce-range`` (7-bit weights) avoids that at a
precision cost everywhere, so it is off: the bundle is for ARM boards). The MatMuls
(encoder, MLM transform, decoder) and the embedding Gathers are quantized, and the
tied word embedding reads the decoder's INT8 weight instead of keeping a second copy
(:mod:`tools.bundle.tied_embedding`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tools import ToolError

log = logging.getLogger(__name__)

OP_TYPES = ("MatMul", "Gather", "Attention")
QUANTIZATION_METHODS = ("dynamic", "static", "int4")
# The bundle name's suffix and the work file's stem for each method.
QUANTIZED_NAME = {"dynamic": "int8", "static": "int8-static", "int4": "int4"}
# Static calibration: this many masked lines in batches of 8 (measured: more moves
# the ranges by <1% on the default model).
CALIBRATION_LINES = 256


def optimize_model(fp32_path: str | Path, out_path: str | Path, config, embed_layer_norm: bool = False,
                   ) -> dict[str, Any]:
    """Apply ONNX Runtime's BERT graph fusions (attention, layer norm, GELU, ...) to
    an FP32 model; return what was fused (``applied`` False when nothing was).

    EmbedLayerNormalization fusion is off by default: it would swallow the word
    embedding Gather (which is then not quantized) and replace our inputs' handling.
    The optimized graph keeps the three bundle inputs; that is checked here.
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model as ort_optimize

    from edge.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, MASK_POSITIONS

    options = FusionOptions("bert")
    options.enable_embed_layer_norm = embed_layer_norm
    logging.disable(logging.WARNING)  # the optimizer logs every fusion attempt
    try:
        model = ort_optimize(str(fp32_path), model_type="bert", num_heads=config.num_attention_heads,
                             hidden_size=config.hidden_size, optimization_options=options, opt_level=0)
    finally:
        logging.disable(logging.NOTSET)
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    inputs = [i.name for i in model.model.graph.input]
    outputs = [o.name for o in model.model.graph.output]
    if inputs != [INPUT_IDS, ATTENTION_MASK, MASK_POSITIONS] or outputs != [LOGITS]:
        log.warning("optimized graph changed its inputs/outputs (%s -> %s); not using it", inputs, outputs)
        return {"applied": False, "reason": f"inputs became {inputs}"}
    if not fused:
        return {"applied": False, "reason": "nothing fused"}
    model.save_model_to_file(str(out_path))
    onnx.checker.check_model(str(out_path))
    log.info("fused operators: %s", ", ".join(f"{k} x{v}" for k, v in sorted(fused.items())))
    return {"applied": True, "fused": fused, "method": "onnxruntime.transformers.optimizer (bert, opt_level 0)"}


def quantization_settings(per_channel: bool = True, reduce_range: bool = False,
                          op_types: tuple[str, ...] = OP_TYPES) -> dict[str, Any]:
    """The manifest ``quantization`` entry for these settings."""
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "activation_type": "QUInt8 (dynamic, per tensor)",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "op_types": list(op_types),
        "word_embedding": "QUInt8 per tensor (onnxruntime Gather quantization)",
    }


def quantize_model(fp32_path: str | Path, int8_path: str | Path, per_channel: bool = True,
                   reduce_range: bool = False, op_types: tuple[str, ...] = OP_TYPES) -> dict[str, Any]:
    """Quantize ``fp32_path`` into ``int8_path``; return the settings used."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tools.bundle.tied_embedding import share_tied_embedding_in_file

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if not fp32_path.is_file():
        raise ToolError(f"{fp32_path}: ONNX model not found")
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    # quantize_dynamic logs a "consider pre-processing" warning at WARNING level on the
    # root logger; shape-inference pre-processing does not change a BERT graph.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            fp32_path, int8_path,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            # Fused contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape
            # inference; their outputs are float32.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)
    settings = quantization_settings(per_channel, reduce_range, op_types)
    settings["onnxruntime"] = onnxruntime.__version__
    if "Gather" in op_types and per_channel:
        share_tied_embedding_in_file(fp32_path, int8_path, settings)
    log.info("quantized %s (%.1f MB) -> %s (%.1f MB)", fp32_path.name, fp32_path.stat().st_size / 1e6,
             int8_path.name, int8_path.stat().st_size / 1e6)
    return settings


def add_arguments(parser) -> None:
    """Options of ``python -m tools quantize``."""
    parser.add_argument("--in", dest="input", required=True, type=Path, help="FP32 ONNX model")
    parser.add_argument("--out", required=True, type=Path, help="quantized ONNX model to write")
    parser.add_argument("--method", choices=("dynamic", "int4"), default="dynamic",
                        help="dynamic INT8 or int4 weight-only (static INT8 needs calibration text: "
                             "tools build --quantization static)")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit weights (older x86 without VNNI)")


def run(args) -> int:
    """Quantize one model file."""
    if args.method == "int4":
        from tools.bundle.quantize_int4 import quantize_int4_model

        quantize_int4_model(args.input, args.out)
        return 0
    quantize_model(args.input, args.out, per_channel=not args.per_tensor, reduce_range=args.reduce_range)
    return 0


def calibration_batches(tokenizer, stats, special_ids: dict[str, int], vocab_size: int, max_length: int,
                        seed: int = 0) -> tuple[list, str]:
    """Masked lines for static calibration and a description of them: lines of the
    corpus's training split when a corpus was given (never the held-apart lines the
    build compares on), else seeded random token sequences."""
    from tools.bundle.verify import ClozeBatch, cloze_batches, seeded_inputs

    texts = stats.calibration_texts if stats is not None else []
    if texts:
        batches = cloze_batches(tokenizer, texts, special_ids, n_samples=CALIBRATION_LINES,
                                max_length=max_length, seed=seed + 1)
        if batches:
            return batches, f"masked lines of {len(texts)} training-split documents of {stats.source}"
    batches = [ClozeBatch(*seeded_inputs(vocab_size, special_ids, 8, 24, 2, seed + 500 + k),
                          answers=np.full((8, 2), -1, dtype=np.int64)) for k in range(8)]
    return batches, "seeded random token sequences (no corpus given)"


def quantize(method: str, fp32_path: str | Path, out_path: str | Path, tokenizer=None, stats=None,
             special_ids: dict[str, int] | None = None, vocab_size: int = 0, max_length: int = 64,
             seed: int = 0, calibration: str = "minmax") -> dict[str, Any]:
    """Quantize ``fp32_path`` into ``out_path`` by ``method`` (one of
    ``QUANTIZATION_METHODS``); return the manifest ``quantization`` entry."""
    if method == "dynamic":
        return quantize_model(fp32_path, out_path)
    if method == "static":
        from tools.bundle.quantize_static import quantize_static_model

        if special_ids is None:
            raise ToolError("static quantization needs the special token ids for its calibration inputs")
        batches, source = calibration_batches(tokenizer, stats, special_ids, vocab_size, max_length, seed)
        return quantize_static_model(fp32_path, out_path, batches, source, method=calibration)
    if method == "int4":
        from tools.bundle.quantize_int4 import quantize_int4_model

        return quantize_int4_model(fp32_path, out_path)
    raise ToolError(f"unknown quantization {method!r} (choose from {', '.join(QUANTIZATION_METHODS)})")
