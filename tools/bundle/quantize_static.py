"""Static INT8 (``tools build --quantization static``): activation scales fixed at
build time from calibration text, so a row's scores never depend on its batch mates.

Dynamic INT8 (``quantize.py``) measures each activation's range per call, over the
whole batch: a question asked beside a longer or odder one gets slightly different
percentages. Here ONNX Runtime's calibrator runs the FP32 model over masked lines of
the corpus's *training* split (never the held-apart lines the build compares on),
records each activation's range, and writes a QDQ graph (QuantizeLinear /
DequantizeLinear around every weight MatMul) that ONNX Runtime turns into integer
kernels at session start, with those ranges as constants.

Choices, each for a reason:
- weights QInt8 symmetric per output channel, activations QUInt8 (u8 x s8 is the
  integer fast path on ARM64 and x86, as for dynamic);
- only MatMuls with a constant weight: the two attention
  MatMuls multiply activations by activations, and softmax probabilities in 256
  steps cost more accuracy than they save time;
- the residual stream stays FP32 (``DedicatedQDQPair``): only the MatMuls read the
  quantized copy of a tensor;
- MatMul outputs stay FP32 (``OpTypesToExcludeOutputQuantization``): the decoder's
  output is the logits, and a uint8 logit would round scores to ~0.1;
- the word embedding reads the tied decoder's INT8 weight (:mod:`tools.bundle.tied_embedding`),
  as in the dynamic bundle, so the vocabulary matrix is stored once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from tools import ToolError

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile")


def calibration_reader(batches: Iterable):
    """An ONNX Runtime ``CalibrationDataReader`` over ``ClozeBatch`` objects."""
    from onnxruntime.quantization import CalibrationDataReader

    from edge.manifest import ATTENTION_MASK, INPUT_IDS, MASK_POSITIONS

    class ClozeReader(CalibrationDataReader):
        def __init__(self, items):
            self._items = iter(items)

        def get_next(self):
            batch = next(self._items, None)
            if batch is None:
                return None
            return {INPUT_IDS: batch.input_ids, ATTENTION_MASK: batch.attention_mask,
                    MASK_POSITIONS: batch.mask_positions}

    return ClozeReader(list(batches))


def static_settings(method: str, batches: int, rows: int, source: str) -> dict[str, Any]:
    """The manifest ``quantization`` entry of a static INT8 model."""
    return {
        "method": "onnxruntime.quantization.quantize_static (QDQ)",
        "weight_type": "QInt8 symmetric, per output channel",
        "activation_type": "QUInt8, per tensor, scales fixed at build time",
        "per_channel": True,
        "op_types": ["MatMul (constant weight only; attention MatMuls stay FP32)"],
        "calibration": {"method": method, "batches": batches, "rows": rows, "text": source},
        "batch_independent": True,
        "word_embedding": "FP32 (not shared)",
    }


def quantize_static_model(fp32_path: str | Path, out_path: str | Path, batches: list, source: str,
                          method: str = "minmax") -> dict[str, Any]:
    """Calibrate on ``batches`` (``ClozeBatch``), write the static INT8 model to
    ``out_path`` and return its manifest settings."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from tools.bundle.tied_embedding import share_tied_embedding_in_file

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise ToolError(f"{fp32_path}: ONNX model not found")
    if method not in CALIBRATION_METHODS:
        raise ToolError(f"unknown calibration method {method!r} (choose from {', '.join(CALIBRATION_METHODS)})")
    if not batches:
        raise ToolError("static quantization needs calibration batches; none were given")
    # The attention MatMuls (activation x activation) by name: MatMulConstBOnly is a
    # dynamic-quantization option that quantize_static does not honour.
    model = onnx.load(str(fp32_path))
    weights = {i.name for i in model.graph.initializer}
    attention = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = sum(len(b.input_ids) for b in batches)
    log.info("calibrating activation ranges (%s) on %d batches, %d rows", method, len(batches), rows)
    calibrate = CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile
    logging.disable(logging.WARNING)  # the "consider pre-processing" warning, as for dynamic
    try:
        quantize_static(
            fp32_path, out_path, calibration_reader(batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            nodes_to_exclude=attention,
            extra_options={
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
                "WeightSymmetric": True,
                # One Q/DQ pair per quantized consumer, so the other readers of a
                # tensor (the residual Adds) keep its FP32 value; measured on bert-base
                # it also lets ONNX Runtime fuse every pair (37.6 vs 47–58 ms shared).
                "DedicatedQDQPair": True,
                "DefaultTensorType": onnx.TensorProto.FLOAT,
                # 99.999th percentile: BERT activations have a few huge outliers that a
                # min/max range spends most of its 256 steps on.
                "CalibPercentile": 99.999,
            },
        )
    finally:
        logging.disable(logging.NOTSET)
    settings = static_settings(method, len(batches), rows, source)
    settings["onnxruntime"] = onnxruntime.__version__
    share_tied_embedding_in_file(fp32_path, out_path, settings)
    log.info("static INT8 %s (%.1f MB) -> %s (%.1f MB)", fp32_path.name, fp32_path.stat().st_size / 1e6,
             out_path.name, out_path.stat().st_size / 1e6)
    return settings
