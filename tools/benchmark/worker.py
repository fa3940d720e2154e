"""``python -m tools.benchmark.worker``: one system of ``python -m tools bench``, timed in
a fresh process of its own, so its resident memory and cold start are its own.

It imports only what its system needs (the ``ort-fp32`` and ``ours`` workers never
import torch). ``--system agree`` compares the INT8 bundle with the plain FP32 model
instead of timing. The result goes to ``--result`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

from tools.benchmark.inputs import MASK, SETS
from tools.benchmark.loadtest import percentile

SYSTEMS = ("pipeline", "ort-fp32", "ours")
# This runtime on the other quantizations of the same model (the "ours" worker on a
# sibling bundle built with tools build --quantization METHOD).
QUANTIZED_VARIANTS = {"ours-static": "static", "ours-int4": "int4"}
ALL_SYSTEMS = SYSTEMS + tuple(QUANTIZED_VARIANTS)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss over exec, so a worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PipelineRunner:
    """The transformers fill-mask pipeline, as a user would call it."""

    def __init__(self, checkpoint: str, threads: int):
        import torch
        from transformers import pipeline

        torch.set_num_threads(threads)
        self.pipe = pipeline("fill-mask", model=checkpoint, tokenizer=checkpoint, device="cpu", top_k=5)
        self.max_positions = _max_positions(Path(checkpoint) / "config.json")

    def answer(self, text: str) -> Any:
        """Top-5 per mask (disjoint per-mask results for several masks). A text longer
        than the model's positions is cut to a window around its first mask, as the
        other systems do (the pipeline itself fails on it: the default model has 64
        positions, the long inputs 128 tokens)."""
        tokenizer = self.pipe.tokenizer
        if self.max_positions is not None:
            ids = tokenizer(text)["input_ids"]
            if len(ids) > self.max_positions:
                window = _window(ids, tokenizer.mask_token_id, self.max_positions)
                text = tokenizer.decode(window[1:-1])
        return self.pipe(text)


def _max_positions(config_path: Path) -> int | None:
    """The model's position-table size from the checkpoint's config.json, if it is there."""
    try:
        return int(json.loads(config_path.read_text(encoding="utf-8"))["max_position_embeddings"])
    except (OSError, ValueError, KeyError):
        return None


def _window(ids: list[int], mask_id: int, size: int | None) -> list[int]:
    """``ids`` ([CLS] … [SEP]) cut to ``size`` tokens around the first [MASK], as the
    engine windows a text longer than the model's positions (the 64-position default
    would fail on 128-token inputs otherwise)."""
    if size is None or len(ids) <= size:
        return ids
    from edge.blanks import window_start  # pure Python: plain ORT stays plain

    inner, keep = ids[1:-1], size - 2
    start = window_start(inner.index(mask_id) if mask_id in inner else 0, 1, len(inner), keep)
    return [ids[0], *inner[start:start + keep], ids[-1]]


class OrtFp32Runner:
    """Plain ONNX Runtime on the full-logits FP32 export: tokenize, run, softmax, top-5."""

    def __init__(self, onnx_path: str, tokenizer_path: str, threads: int):
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.np = np
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.tokenizer.no_padding()
        self.mask_id = self.tokenizer.token_to_id(MASK)
        self.max_positions = _max_positions(Path(tokenizer_path).parent / "config.json")
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.id_to_token = [""] * (max(vocab.values()) + 1)
        for token, index in vocab.items():
            self.id_to_token[index] = token

    def mask_logits(self, text: str):
        """Logits ``[n_masks, vocab]`` at the [MASK] positions."""
        np = self.np
        enc = self.tokenizer.encode(text)
        ids = np.array([_window(enc.ids, self.mask_id, self.max_positions)], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        logits = self.session.run(None, feed)[0][0]
        return logits[ids[0] == self.mask_id]

    def answer(self, text: str) -> list[list[tuple[str, float]]]:
        """Top-5 (token, probability) per mask."""
        np = self.np
        out = []
        for row in self.mask_logits(text):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            best = np.argpartition(-probs, 5)[:5]
            best = best[np.argsort(-probs[best])]
            out.append([(self.id_to_token[i], float(probs[i])) for i in best])
        return out


class OursRunner:
    """This runtime's engine on an INT8 bundle."""

    def __init__(self, bundle: str, threads: int, batch_window_ms: float, fusion: bool = True):
        from edge.engine import Engine

        self.engine = Engine.from_bundle(bundle, threads=threads, batch_window_ms=batch_window_ms, cache_size=0)
        self.fusion = fusion

    def answer(self, text: str) -> dict:
        """The engine's answer (top-5; a multi-character blank gets joint beam search)."""
        return self.engine.predict(text, top_k=5, fusion=self.fusion)


def _pin(threads: int) -> list[int]:
    """Restrict this process to ``threads`` cores, so no system can use more."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def worker_main(argv: list[str]) -> int:
    """``python -m tools.benchmark.worker``: time one system in this fresh process."""
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark.worker")
    parser.add_argument("--system", required=True, choices=(*SYSTEMS, "agree"))
    parser.add_argument("--checkpoint", help="HF checkpoint folder (pipeline)")
    parser.add_argument("--onnx", help="full-logits FP32 ONNX (ort-fp32, agree)")
    parser.add_argument("--tokenizer", help="tokenizer.json for the FP32 ONNX")
    parser.add_argument("--bundle", help="INT8 bundle (ours, agree)")
    parser.add_argument("--inputs", required=True, type=Path)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-window-ms", type=float, default=0.0)
    parser.add_argument("--launched-at", type=float, required=True, help="time.time() when the parent launched us")
    parser.add_argument("--cold-only", action="store_true", help="load, answer once, exit")
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"system": args.system, "cores": _pin(args.threads), "threads": args.threads}
    inputs = json.loads(args.inputs.read_text(encoding="utf-8"))
    result["rss_start_mb"] = _rss_mb()
    if args.system == "agree":
        result.update(_agreement(args, inputs))
        args.result.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
        return 0
    started = time.time()
    if args.system == "pipeline":
        runner: Any = PipelineRunner(args.checkpoint, args.threads)
    elif args.system == "ort-fp32":
        runner = OrtFp32Runner(args.onnx, args.tokenizer, args.threads)
    else:
        runner = OursRunner(args.bundle, args.threads, args.batch_window_ms)
    result["load_s"] = time.time() - started
    result["rss_loaded_mb"] = _rss_mb()
    runner.answer(inputs["short"][0]["text"])
    result["cold_start_s"] = time.time() - args.launched_at
    result["rss_first_answer_mb"] = _rss_mb()
    if not args.cold_only:
        result["sets"] = {}
        for name in args.sets.split(","):
            items = inputs[name]
            for i in range(args.warmup):
                runner.answer(items[i % len(items)]["text"])
            latencies, tokens = [], []
            for i in range(args.iterations):
                item = items[(args.warmup + i) % len(items)]
                began = time.perf_counter()
                runner.answer(item["text"])
                latencies.append((time.perf_counter() - began) * 1000)
                tokens.append(item["tokens"])
            result["sets"][name] = {
                "latencies_ms": latencies,
                "median_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "mean_tokens": sum(tokens) / len(tokens),
                "distinct_texts": min(len(items), args.iterations),
            }
        result["rss_after_run_mb"] = _rss_mb()
    result["peak_rss_mb"] = _peak_rss_mb()
    if args.system == "ours":
        result["engine_stats"] = runner.engine.stats()
        runner.engine.close()
    args.result.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def _agreement(args, inputs: dict[str, Any]) -> dict[str, Any]:
    """INT8 bundle (the engine, as a user gets it) vs the plain FP32 model on held-apart
    single-blank text: top-1 agreement and top-5 overlap of the candidate lists.

    The FP32 list is taken over the tokens a user can be shown (no special tokens,
    ``##`` pieces or ``[unusedN]``, as the engine does). ``*_kept_vocab`` figures
    restrict FP32 to the bundle's kept vocabulary too, isolating the effect of INT8
    (plus graph optimization) from that of vocabulary trimming.
    """
    import numpy as np

    fp32 = OrtFp32Runner(args.onnx, args.tokenizer, args.threads)
    # The model alone: a bundle with a word LM and a phrase memory answers differently
    # by design (measured on the fused default: 49% top-1 "agreement"), which is not
    # what quantization did.
    ours = OursRunner(args.bundle, args.threads, 0.0, fusion=False)
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    tokens = fp32.id_to_token
    invalid = np.array([t in special or t.startswith("##") or bool(re.match(r"^\[unused\d+\]$", t)) or not t.strip()
                        for t in tokens])
    kept = set(ours.engine.id_to_token)
    outside = np.array([t not in kept for t in tokens])
    fp32_top1: dict[str, int] = {}
    n = agree = agree_kept = 0
    overlap = overlap_kept = 0.0
    fp32_hits = ours_hits = 0
    for item in inputs["agree"]:
        row = fp32.mask_logits(item["text"])[0].astype(np.float64)
        row[invalid] = -np.inf
        ref5 = [tokens[i] for i in np.argsort(-row)[:5]]
        row[outside] = -np.inf
        ref5_kept = [tokens[i] for i in np.argsort(-row)[:5]]
        got5 = [c["text"] for c in ours.answer(item["text"])["blanks"][0]["candidates"]]
        fp32_top1[ref5[0]] = fp32_top1.get(ref5[0], 0) + 1
        n += 1
        agree += ref5[0] == got5[0]
        agree_kept += ref5_kept[0] == got5[0]
        overlap += len(set(ref5) & set(got5)) / 5
        overlap_kept += len(set(ref5_kept) & set(got5)) / 5
        fp32_hits += ref5[0] == item["answer"]
        ours_hits += got5[0] == item["answer"]
    ours.engine.close()
    if not n:
        return {"masked_positions": 0}
    return {
        "masked_positions": n,
        "top1_agreement": agree / n,
        "top5_overlap": overlap / n,
        "top1_agreement_kept_vocab": agree_kept / n,
        "top5_overlap_kept_vocab": overlap_kept / n,
        "fp32_top1_accuracy": fp32_hits / n,
        "ours_top1_accuracy": ours_hits / n,
        "fp32_vocab": len(tokens),
        "bundle_vocab": len(kept),
        # A weak model answering the same few tokens everywhere agrees with itself
        # trivially: how concentrated the FP32 answers are says how much agreement means.
        "fp32_top1_distinct": len(fp32_top1),
        "fp32_top1_most_common": sorted(fp32_top1.items(), key=lambda kv: -kv[1])[:5],
    }



if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
