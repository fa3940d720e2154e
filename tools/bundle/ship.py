"""``python -m tools ship``: install a built bundle as the embedded default model.

Copies ``model.onnx`` and ``tokenizer.json`` of an INT8 bundle into
``edge/default_bundle/`` (or ``--dest``) and writes its manifest with the accuracy
measured by ``tools evaluate --report`` (the INT8 row and, when present, the FP32
row), the training hardware and a note. The result is loaded back through
``edge.bundle.load_bundle`` (sizes and sha256 checked) before the command reports
success; on any error the destination is left as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from tools import ToolError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DEST = REPO / "edge" / "default_bundle"
FIGURES = ("cloze_top1", "cloze_top5", "chid_acc", "chid_acc_pmi", "n_cloze", "n_chid", "latency_ms_median",
           "latency_ms_p90", "latency_threads", "everyday_top1", "everyday_top5", "n_everyday", "top1_sources",
           "top1_not_model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``ship``."""
    parser.add_argument("--bundle", type=Path, required=True, help="the INT8 bundle to ship")
    parser.add_argument("--evaluation", type=Path, required=True,
                        help="evaluation.json written by 'tools evaluate --report' for this bundle (+ its FP32 twin)")
    parser.add_argument("--command", default="", help="the evaluate command line, recorded in the manifest")
    parser.add_argument("--hardware", default="", help="where the model was trained, recorded in the manifest")
    parser.add_argument("--train-command", default="", help="the command that trained it")
    parser.add_argument("--notes", default="", help="note shown by 'edge info' and /api/info")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where the embedded default lives")


def accuracy_block(evaluation: dict, bundle: Path) -> dict:
    """``{"int8": {...}, "fp32": {...}, "chid_chance": …}`` from an evaluation.json."""
    rows = evaluation.get("results") or []
    if not rows:
        raise ToolError("the evaluation file has no results")
    block: dict = {}
    for row in rows:
        # A fused row (model + word LM + memory: what ships) is kept apart from the
        # model-only rows of the same bundle.
        kind = "fp32" if (row.get("quantization") or "fp32") == "fp32" else "int8"
        if row.get("fusion"):
            kind = "fused"
        if kind in block:
            continue
        block[kind] = {k: row[k] for k in FIGURES if row.get(k) is not None}
        if row.get("chid_chance"):
            block["chid_chance"] = row["chid_chance"]
    if "int8" not in block:
        raise ToolError("the evaluation file has no INT8 row of the model alone (evaluate the bundle being shipped)")
    first = Path(str(rows[0].get("bundle", "")))
    if first.resolve() != bundle.resolve():
        log.warning("the evaluation's first bundle is %s, not %s", first, bundle)
    return block


def run(args: argparse.Namespace) -> int:
    """Copy, annotate, reload."""
    from edge.bundle import BundleError, load_bundle
    from edge.manifest import MODEL_FILE, TOKENIZER_FILE

    try:
        source = load_bundle(args.bundle)
    except (BundleError, OSError, ValueError) as exc:
        raise ToolError(f"{args.bundle}: not a valid bundle: {exc}") from exc
    manifest = source.manifest
    if manifest.random_init:
        raise ToolError(f"{args.bundle}: has random weights; the embedded default must be a trained model")
    try:
        evaluation = json.loads(args.evaluation.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolError(f"{args.evaluation}: cannot read the evaluation ({exc})") from exc
    accuracy = accuracy_block(evaluation, args.bundle)
    if args.command:
        accuracy["command"] = args.command
    # Rows not measured again (e.g. the FP32 twin when only the INT8 bundle was
    # evaluated) keep their earlier figures.
    previous = (manifest.evaluation or {}).get("accuracy") or {}
    kept = {k: v for k, v in previous.items() if k not in accuracy and k in ("fp32", "int8", "chid_chance")}
    manifest.evaluation = dict(manifest.evaluation or {}, accuracy=dict(kept, **accuracy))
    training = dict(manifest.training or {})
    if args.hardware:
        training["hardware"] = args.hardware
    if args.train_command:
        training["command"] = args.train_command
    manifest.training = training or None
    manifest.notes = args.notes

    dest: Path = args.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        # Every file the manifest lists: the model and tokenizer, and the word LM and
        # phrase memory with their licenses when the bundle has them.
        for name in dict.fromkeys([MODEL_FILE, TOKENIZER_FILE, *manifest.files]):
            shutil.copy2(args.bundle / name, staged / name)
        manifest.save(staged)
        load_bundle(staged)  # sizes + sha256 against the manifest, before replacing anything
        old = Path(tmp) / "old"
        if dest.exists():
            dest.rename(old)
        staged.rename(dest)
    int8 = accuracy.get("fused", accuracy["int8"])
    log.info("shipped %s → %s: cloze top-1 %.1f%%, top-5 %.1f%%, ChID %s, %.1f MB", args.bundle, dest,
             100 * int8.get("cloze_top1", 0), 100 * int8.get("cloze_top5", 0),
             f"{100 * int8['chid_acc']:.1f}%" if "chid_acc" in int8 else "–",
             sum(e.size for e in manifest.files.values()) / 1e6)
    return 0
