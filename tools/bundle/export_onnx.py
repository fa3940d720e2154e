"""Export a Hugging Face masked-LM to ONNX with the vocabulary projection computed
only at the masked positions (see the bundle contract in ``edge/manifest.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edge.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, MASK_POSITIONS
from tools.bundle.masked_lm import MaskedPositionsLM

log = logging.getLogger(__name__)
OPSET = 17


def example_inputs(vocab_size: int, batch: int = 2, seq: int = 16, n_masks: int = 2, seed: int = 0):
    """Seeded example inputs (ids avoid the special ids 0..4 region only loosely)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, seq - 3:] = 0  # some padding
    mask_positions = torch.randint(1, seq - 3, (batch, n_masks), generator=gen)
    return input_ids, attention_mask, mask_positions


def export_onnx(mlm: torch.nn.Module, out_path: str | Path, opset: int = OPSET,
                last_layer_at_masks: bool = True) -> Path:
    """Export ``mlm`` (in eval mode) to ``out_path`` with dynamic batch/seq/n_masks
    (``last_layer_at_masks=False``: the graph of bundles built before the last layer
    ran only at the masked rows, which ``tools unbundle`` still reads)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = MaskedPositionsLM(mlm, last_layer_at_masks=last_layer_at_masks).eval()
    inputs = example_inputs(mlm.config.vocab_size)
    log.info("exporting ONNX (opset %d) to %s", opset, out_path)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            inputs,
            str(out_path),
            input_names=[INPUT_IDS, ATTENTION_MASK, MASK_POSITIONS],
            output_names=[LOGITS],
            dynamic_axes={
                INPUT_IDS: {0: "batch", 1: "seq"},
                ATTENTION_MASK: {0: "batch", 1: "seq"},
                MASK_POSITIONS: {0: "batch", 1: "n_masks"},
                LOGITS: {0: "batch", 1: "n_masks"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return out_path


def add_arguments(parser) -> None:
    """Options of ``python -m tools export``."""
    from tools.bundle.checkpoint import add_source_arguments

    add_source_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    parser.add_argument("--optimize", action="store_true",
                        help="also apply ONNX Runtime's BERT fusions (written to OUT, the plain export to OUT.plain.onnx)")


def run(args) -> int:
    """Export a checkpoint (full vocabulary) to FP32 ONNX and check parity with PyTorch."""
    from tools import ToolError
    from tools.bundle.checkpoint import load_checkpoint
    from tools.bundle.quantize import optimize_model
    from tools.bundle.verify import check_parity, ort_session

    ckpt = load_checkpoint(args.source, random_init=args.random_init, seed=args.seed, revision=args.revision)
    out = Path(args.out)
    target = out.with_suffix(".plain.onnx") if args.optimize else out
    export_onnx(ckpt.model, target)
    if args.optimize:
        info = optimize_model(target, out, ckpt.model.config)
        if not info["applied"]:
            target.replace(out)
    parity = check_parity(ckpt.model, ort_session(out), ckpt.special_ids(), seed=args.seed)
    log.info("FP32 parity: max|diff| %.3g (tolerance %.3g)", parity.max_abs_diff, parity.tolerance)
    if not parity.passed:
        raise ToolError(f"{out}: export does not match PyTorch (max|diff| {parity.max_abs_diff:.3g})")
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return 0
