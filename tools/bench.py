"""``python -m tools bench``: side-by-side latency / memory / load benchmark.

On the same inputs and thread count it runs, each system in a fresh subprocess of
its own (so resident memory and cold start are per system):

1. ``pipeline``: the transformers PyTorch ``fill-mask`` pipeline (what a user would
   pick instead), ``torch.set_num_threads(threads)``;
2. ``ort-fp32``: a plain ONNX Runtime FP32 export made here (standard
   ``BertForMaskedLM`` logits at every position, full vocabulary, no trimming, no
   quantization, no fusion beyond ONNX Runtime's defaults);
3. ``ours``: this runtime, ``edge.engine.Engine`` on the INT8 trimmed bundle;

for a bert-base-chinese-architecture model with random weights and for the
shipped default model. Inputs are real held-apart sentences (<=32 tokens and ~128
tokens) with one blank, and short ones with a 4-character blank. Then it measures
INT8-vs-FP32 agreement, runs an open-loop HTTP load test against the real service
(``python -m edge serve``), and estimates Pi 4 / Pi 5 latency on paper.

Results go to ``--out``: ``results.md`` (tables), ``results.json`` (raw numbers),
``bench.png`` (chart), plus server logs; exported models are cached in
``--out/work``.

The worker half of this module runs as ``python -m tools.bench worker ...``; it
imports only what its system needs (the ``ort-fp32`` and ``ours`` workers never
import torch), so the memory it reports is that system's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import platform
import random
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools import ToolError
from tools.loadtest import percentile

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BERT_SOURCE = SHARED / "models" / "bert-base-chinese"
DEFAULT_BUNDLE = REPO / "edge" / "default_bundle"
DEFAULT_CHECKPOINT = REPO / "runs" / "default" / "checkpoint"
SYSTEMS = ("pipeline", "ort-fp32", "ours")
SYSTEM_LABELS = {
    "pipeline": "PyTorch fill-mask pipeline (FP32)",
    "ort-fp32": "plain ONNX Runtime FP32 (full logits)",
    "ours": "this runtime (INT8, trimmed, mask-only head)",
}
SETS = ("short", "long", "short_4")
SET_LABELS = {"short": "<=32 tokens, 1 blank", "long": "~128 tokens, 1 blank", "short_4": "<=32 tokens, 4-char blank"}
MASK = "[MASK]"
CJK_RE = re.compile(r"[\u4e00-\u9fff]")
# Inputs are kept free of ASCII letters/digits/whitespace, so that every character is
# one token under any of the compared tokenizers (full or trimmed vocabulary) and the
# token counts (32 / 128) hold for all systems.
UNWANTED_RE = re.compile(r"[A-Za-z0-9\s\u2028\u2029\u0085]")
SENTENCE_END_RE = re.compile(r"(?<=[。！？；!?;])")
FULL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ============================================================================ inputs

def _held_apart_documents(data: Path, per_file: int, seed: int, test_fraction: float = 0.02) -> list[str]:
    """Texts of the held-apart (test split) documents under ``data``, corpora mixed.

    The split is :func:`tools.corpus.is_test_document`, the one the toolchain and
    the training run use. At most ``per_file`` documents per file; the documents of
    each top-level folder (FewCLUE's modern text, chinese-poetry's classical text)
    are shuffled and then interleaved, so both kinds of text are represented. Files
    that are not corpora (FewCLUE's label_distribution.json) are skipped by
    :func:`tools.wwm.read_documents`.
    """
    from tools.corpus import CorpusError, corpus_files, is_test_document
    from tools.wwm import read_documents

    try:
        files = corpus_files(data)
    except CorpusError as exc:
        raise ToolError(str(exc)) from exc
    groups: dict[str, list[str]] = {}
    for file in files:
        try:
            docs = read_documents(file)
        except ToolError as exc:
            log.debug("skipping %s: %s", file, exc)
            continue
        parts = file.relative_to(data).parts if data.is_dir() else (file.name,)
        held = [d.text for d in docs if is_test_document(d.text, test_fraction)]
        groups.setdefault(parts[0], []).extend(held[:per_file])
    rng = random.Random(seed)
    for texts in groups.values():
        rng.shuffle(texts)
    mixed = [text for batch in itertools.zip_longest(*groups.values()) for text in batch if text is not None]
    if not mixed:
        raise ToolError(f"{data}: no held-apart documents found")
    log.info("held-apart documents: %s", ", ".join(f"{k} {len(v)}" for k, v in groups.items()))
    return mixed


def _clean_pieces(text: str) -> list[str]:
    """Sentence-sized pieces of a document with no ASCII alphanumerics or spaces."""
    pieces = []
    for line in text.split("\n"):
        for sentence in SENTENCE_END_RE.split(line.strip()):
            sentence = sentence.strip()
            if sentence and not UNWANTED_RE.search(sentence):
                pieces.append(sentence)
    return pieces


def mask_one(text: str, rng: random.Random) -> tuple[str, str] | None:
    """Replace one random CJK character with [MASK]; return (masked, answer)."""
    spots = [i for i, ch in enumerate(text) if CJK_RE.match(ch)]
    if not spots:
        return None
    i = rng.choice(spots)
    return text[:i] + MASK + text[i + 1:], text[i]


def mask_run(text: str, rng: random.Random, length: int = 4) -> tuple[str, str] | None:
    """Replace ``length`` consecutive CJK characters with [MASK] x length."""
    spots = [i for i in range(len(text) - length + 1) if all(CJK_RE.match(c) for c in text[i:i + length])]
    if not spots:
        return None
    i = rng.choice(spots)
    return text[:i] + MASK * length + text[i + length:], text[i:i + length]


def build_inputs(data: Path, tokenizer_path: Path, n_per_set: int, n_agree: int, n_load: int,
                 long_tokens: int = 128, seed: int = 0) -> dict[str, Any]:
    """Pick the benchmark inputs from held-apart corpus text.

    - ``short``: one sentence of 12..32 tokens (with [CLS]/[SEP]), one CJK char masked;
    - ``long``: a passage cut to exactly ``long_tokens`` tokens, one char masked;
    - ``short_4``: short sentences with 4 consecutive CJK chars masked;
    - ``agree``: single-blank short sentences and long passages for INT8 vs FP32;
    - ``load_pool``: short unmasked sentences the load test masks at varying places.
    Token counts are taken with the bert-base-chinese tokenizer.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    rng = random.Random(seed)
    docs = _held_apart_documents(data, per_file=400, seed=seed)

    def n_tokens(text: str) -> int:
        return len(tokenizer.encode(text).ids)  # with [CLS] and [SEP]

    shorts, longs = [], []
    seen = set()
    for doc in docs:
        # At most two sentences per document, so no one document dominates.
        pieces = [p for p in _clean_pieces(doc) if p not in seen and len(CJK_RE.findall(p)) >= 8
                  and 12 <= n_tokens(p) <= 32]
        for piece in rng.sample(pieces, min(2, len(pieces))):
            seen.add(piece)
            shorts.append(piece)
        flat = "".join(p for p in _clean_pieces(doc))
        if len(flat) >= long_tokens and flat not in seen:
            enc = tokenizer.encode(flat, add_special_tokens=False)
            if len(enc.ids) >= long_tokens - 2:
                cut = enc.offsets[long_tokens - 3][1]
                passage = flat[:cut]
                if n_tokens(passage) == long_tokens:
                    seen.add(flat)
                    longs.append(passage)
    n_long_agree = n_agree // 3
    need_short = 2 * n_per_set + (n_agree - n_long_agree) + n_load
    if len(shorts) < need_short or len(longs) < n_per_set + n_long_agree:
        log.warning("held-apart text gave %d short sentences (wanted %d) and %d long passages (wanted %d)",
                    len(shorts), need_short, len(longs), n_per_set + n_long_agree)
    if not shorts or not longs:
        raise ToolError(f"{data}: not enough held-apart text for the benchmark inputs")

    def items(texts: list[str], masker) -> list[dict[str, Any]]:
        out = []
        for text in texts:
            masked = masker(text, rng)
            if masked:
                out.append({"text": masked[0], "answer": masked[1], "tokens": n_tokens(masked[0])})
        return out

    take = iter(shorts)
    short_set = [next(take) for _ in range(min(n_per_set, len(shorts)))]
    four_set = [t for t in take if len(t) >= 10][:n_per_set]
    rest = shorts[len(short_set) + n_per_set:]
    agree_short = rest[: n_agree - n_long_agree]
    load_pool = rest[len(agree_short):][:n_load]
    inputs = {
        "source": f"held-apart documents (tools.corpus.is_test_document, 2%) of {data}",
        "tokenizer": str(tokenizer_path),
        "seed": seed,
        "short": items(short_set, mask_one),
        "long": items(longs[:n_per_set], mask_one),
        "short_4": items(four_set, mask_run),
        "agree": items(agree_short, mask_one) + items(longs[n_per_set:n_per_set + n_long_agree], mask_one),
        "load_pool": load_pool or short_set,
    }
    for name in ("short", "long", "short_4", "agree"):
        counts = [item["tokens"] for item in inputs[name]]
        log.info("inputs %-8s %3d texts, %d..%d tokens", name, len(counts), min(counts, default=0),
                 max(counts, default=0))
    return inputs


def load_text(pool: list[str], i: int, seed: int = 0) -> str:
    """The i-th load-test text: sentence ``i % n`` masked at its ``i // n``-th CJK
    character (in a seeded order), so texts stay distinct across a whole test."""
    sentence = pool[i % len(pool)]
    spots = [k for k, ch in enumerate(sentence) if CJK_RE.match(ch)]
    random.Random(f"{seed}:{i % len(pool)}").shuffle(spots)
    k = spots[(i // len(pool)) % len(spots)]
    return sentence[:k] + MASK + sentence[k + 1:]


# ============================================================================ models

@dataclass
class ModelSpec:
    """One model benchmarked three ways: its HF checkpoint and its INT8 bundle."""

    key: str
    label: str
    checkpoint: Path | None
    bundle: Path | None
    random_init: bool
    note: str = ""


class FullLogits:
    """Factory for the plain export: ``BertForMaskedLM`` -> logits at every position."""

    @staticmethod
    def wrap(mlm):
        """Return a module with a plain tensor output (``logits [batch, seq, vocab]``)."""
        import torch

        class _Full(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).logits

        return _Full(mlm).eval()


def export_full_fp32(model, out_path: Path) -> dict[str, Any]:
    """Export the standard masked-LM (logits at every position, full vocabulary) to
    FP32 ONNX with the legacy exporter, opset 17; check it against PyTorch."""
    import numpy as np
    import torch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = FullLogits.wrap(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    types = torch.zeros_like(ids)
    tmp = out_path.with_suffix(".tmp.onnx")
    started = time.monotonic()
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (ids, mask, types), str(tmp),
            input_names=list(FULL_INPUTS), output_names=["logits"],
            dynamic_axes={name: {0: "batch", 1: "seq"} for name in FULL_INPUTS} | {"logits": {0: "batch", 1: "seq"}},
            opset_version=17, do_constant_folding=True, dynamo=False,
        )
        reference = wrapper(ids, mask, types).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                             "token_type_ids": types.numpy()})[0]
    diff = float(np.max(np.abs(got - reference)))
    del session
    os.replace(tmp, out_path)
    info = {"path": str(out_path), "bytes": out_path.stat().st_size, "max_abs_diff_vs_torch": diff,
            "export_s": round(time.monotonic() - started, 1)}
    log.info("FP32 full-logits export %s: %.1f MB, max|onnx-torch| %.2g", out_path.name, info["bytes"] / 1e6, diff)
    return info


def prepare_bert_random(source: Path, work: Path, seed: int, bundle: Path | None, rebuild: bool,
                        python: str) -> tuple[ModelSpec, dict[str, Any]]:
    """bert-base-chinese architecture with seeded random weights: an HF checkpoint
    folder (for the pipeline), the plain FP32 export, and the INT8 bundle built by
    ``python -m tools build --random-init`` with the same seed (same weights)."""
    notes: dict[str, Any] = {}
    ckpt_dir = work / "bert-base-chinese-random"
    fp32 = work / "bert-base-chinese-random-fp32-full.onnx"
    if rebuild or not (ckpt_dir / "model.safetensors").is_file() or not fp32.is_file():
        from tools.checkpoint import load_checkpoint

        log.info("== bert-base-chinese with random weights (seed %d): checkpoint + FP32 export", seed)
        ckpt = load_checkpoint(str(source), random_init=True, seed=seed)
        ckpt.model.save_pretrained(str(ckpt_dir))
        ckpt.tokenizer.save_pretrained(str(ckpt_dir))
        notes["fp32_export"] = export_full_fp32(ckpt.model, fp32)
        (work / "bert-base-chinese-random-fp32-full.json").write_text(json.dumps(notes["fp32_export"]))
        del ckpt
    else:
        meta = work / "bert-base-chinese-random-fp32-full.json"
        notes["fp32_export"] = json.loads(meta.read_text()) if meta.is_file() else {"path": str(fp32)}
    if bundle is None:
        bundle = work / "bert-base-chinese-random-int8"
        if rebuild or not (bundle / "manifest.json").is_file():
            command = [python, "-m", "tools", "build", "--source", str(source), "--random-init",
                       "--seed", str(seed), "--out", str(bundle)]
            log.info("== building the INT8 bundle: %s", shlex.join(command))
            started = time.monotonic()
            proc = subprocess.run(command, cwd=REPO, env=_child_env(), capture_output=True, text=True)
            (work / "build-bert-base-random.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
            if proc.returncode != 0:
                tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                raise ToolError(f"`{shlex.join(command)}` failed with status {proc.returncode}: {tail} "
                                f"(full log: {work / 'build-bert-base-random.log'})")
            notes["bundle_build_s"] = round(time.monotonic() - started, 1)
        notes["bundle_build_command"] = shlex.join([
            "python", "-m", "tools", "build", "--source", str(source), "--random-init", "--seed", str(seed),
            "--out", str(bundle)])
    spec = ModelSpec("bert-base-random", "bert-base-chinese architecture, RANDOM weights", ckpt_dir, bundle,
                     random_init=True, note="random weights: speed/memory/size only; answers are meaningless")
    notes["fp32_onnx"] = str(fp32)
    return spec, notes


def prepare_checkpoint_model(key: str, label: str, checkpoint: Path | None, bundle: Path, work: Path,
                             rebuild: bool) -> tuple[ModelSpec, dict[str, Any]]:
    """A model given as (HF checkpoint, INT8 bundle): export the plain FP32 model."""
    from edge.manifest import Manifest

    manifest = Manifest.load(bundle)
    notes: dict[str, Any] = {"bundle_manifest": {"name": manifest.name, "created": manifest.created,
                                                 "vocab_size": manifest.vocab_size,
                                                 "architecture": vars(manifest.architecture),
                                                 "training": manifest.training,
                                                 "int8_vs_fp32_at_build": manifest.evaluation.get("int8_vs_fp32")}}
    if checkpoint is None:
        source = Path(manifest.source)
        checkpoint = source if (source / "config.json").is_file() else None
    spec = ModelSpec(key, label, checkpoint, bundle, random_init=manifest.random_init)
    if checkpoint is None or not (checkpoint / "config.json").is_file():
        spec.checkpoint = None
        spec.note = f"no HF checkpoint found for {bundle} (manifest source {manifest.source!r}): only 'ours' runs"
        return spec, notes
    from tools.checkpoint import read_training_record

    training = read_training_record(checkpoint)
    if training is not None:
        notes["checkpoint_training"] = training
    fp32 = work / f"{key}-fp32-full.onnx"
    meta = work / f"{key}-fp32-full.json"
    stamp = (checkpoint / "model.safetensors").stat().st_mtime if (checkpoint / "model.safetensors").is_file() else 0
    if rebuild or not fp32.is_file() or fp32.stat().st_mtime < stamp:
        from tools.checkpoint import load_checkpoint

        log.info("== %s: FP32 export of %s", key, checkpoint)
        ckpt = load_checkpoint(str(checkpoint))
        notes["fp32_export"] = export_full_fp32(ckpt.model, fp32)
        meta.write_text(json.dumps(notes["fp32_export"]))
    else:
        notes["fp32_export"] = json.loads(meta.read_text()) if meta.is_file() else {"path": str(fp32)}
    notes["fp32_onnx"] = str(fp32)
    return spec, notes


# ============================================================================ workers

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

    def answer(self, text: str) -> Any:
        """Top-5 per mask (disjoint per-mask results for several masks)."""
        return self.pipe(text)


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
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.id_to_token = [""] * (max(vocab.values()) + 1)
        for token, index in vocab.items():
            self.id_to_token[index] = token

    def mask_logits(self, text: str):
        """Logits ``[n_masks, vocab]`` at the [MASK] positions."""
        np = self.np
        enc = self.tokenizer.encode(text)
        ids = np.array([enc.ids], dtype=np.int64)
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

    def __init__(self, bundle: str, threads: int, batch_window_ms: float):
        from edge.engine import Engine

        self.engine = Engine.from_bundle(bundle, threads=threads, batch_window_ms=batch_window_ms, cache_size=0)

    def answer(self, text: str) -> dict:
        """The engine's answer (top-5; a multi-character blank gets joint beam search)."""
        return self.engine.predict(text, top_k=5)


def _pin(threads: int) -> list[int]:
    """Restrict this process to ``threads`` cores, so no system can use more."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def worker_main(argv: list[str]) -> int:
    """``python -m tools.bench worker``: time one system in this fresh process."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench worker")
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
    ours = OursRunner(args.bundle, args.threads, 0.0)
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


# ============================================================================ orchestration

def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONUNBUFFERED="1")
    return env


def run_worker(python: str, system: str, options: list[str], result_path: Path, timeout_s: float) -> dict[str, Any]:
    """Launch one worker subprocess and return its result (or ``{"error": ...}``)."""
    result_path.unlink(missing_ok=True)
    launched = time.time()
    command = [python, "-m", "tools.bench", "worker", "--system", system, "--launched-at", repr(launched),
               "--result", str(result_path), *options]
    try:
        proc = subprocess.run(command, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0 or not result_path.is_file():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        return {"error": f"status {proc.returncode}: {tail}"}
    return json.loads(result_path.read_text(encoding="utf-8"))


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, memory, load, versions: what the numbers depend on."""
    info: dict[str, Any] = {"threads": threads, "python": platform.python_version(), "platform": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        names = re.findall(r"^model name\s*:\s*(.+)$", text, re.M)
        info["cpu_model"] = names[0] if names else platform.processor()
        mhz = re.findall(r"^cpu MHz\s*:\s*(.+)$", text, re.M)
        info["cpu_mhz"] = float(mhz[0]) if mhz else None
        flags = (re.findall(r"^flags\s*:\s*(.+)$", text, re.M) or [""])[0].split()
        info["simd"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")) or "vnni" in f)
        info["hypervisor"] = "hypervisor" in flags
    except OSError:
        info["cpu_model"] = platform.processor()
    info["logical_cpus"] = os.cpu_count()
    info["usable_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for module in ("onnxruntime", "torch", "transformers", "tokenizers", "numpy"):
        try:
            info[f"{module}_version"] = __import__(module).__version__
        except ImportError:
            info[f"{module}_version"] = None
    return info


def contention(sample_s: float = 1.0) -> dict[str, Any]:
    """Load average and the other processes using CPU right now (a training run, say):
    any process outside this benchmark above 20% of a core over ``sample_s``."""
    busy = []
    try:
        import psutil

        mine = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.info["pid"] not in mine]
        for proc in procs:
            try:
                proc.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(sample_s)
        for proc in procs:
            try:
                cpu = proc.cpu_percent(None)
            except psutil.Error:
                continue
            if cpu > 20:
                cmd = " ".join(proc.info.get("cmdline") or []) or str(proc.info["pid"])
                busy.append(f"{cmd[:100]} ({cpu:.0f}% CPU)")
    except ImportError:
        pass
    return {"loadavg": list(os.getloadavg()), "other_heavy_processes": busy}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": percentile(values, 50), "min": min(values), "max": max(values)} if values else {}


def bench_model(python: str, spec: ModelSpec, notes: dict[str, Any], inputs_path: Path, args,
                work: Path) -> dict[str, Any]:
    """Time the three systems (each in its own subprocesses) and the INT8 agreement."""
    result: dict[str, Any] = {"label": spec.label, "random_init": spec.random_init, "note": spec.note,
                              "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
                              "bundle": str(spec.bundle), **notes, "systems": {}}
    fp32 = notes.get("fp32_onnx")
    tokenizer = str(spec.checkpoint / "tokenizer.json") if spec.checkpoint else None
    common = ["--inputs", str(inputs_path), "--threads", str(args.threads), "--iterations", str(args.iterations),
              "--warmup", str(args.warmup), "--sets", ",".join(args.sets)]
    per_system = {
        "pipeline": ["--checkpoint", str(spec.checkpoint)],
        "ort-fp32": ["--onnx", str(fp32), "--tokenizer", str(tokenizer)],
        "ours": ["--bundle", str(spec.bundle), "--batch-window-ms", str(args.ours_window_ms)],
    }
    sizes = {
        "pipeline": _weights_bytes(spec.checkpoint) if spec.checkpoint else None,
        "ort-fp32": Path(fp32).stat().st_size if fp32 and Path(fp32).is_file() else None,
        "ours": (spec.bundle / "model.onnx").stat().st_size,
    }
    for system in SYSTEMS:
        if system != "ours" and spec.checkpoint is None:
            result["systems"][system] = {"error": "skipped: " + spec.note}
            continue
        if system in args.skip:
            continue
        log.info("== %s / %s: timing (%d iterations x %s, %d threads)", spec.key, system, args.iterations,
                 ",".join(args.sets), args.threads)
        res = run_worker(python, system, common + per_system[system], work / f"{spec.key}-{system}.json",
                         args.worker_timeout)
        if "error" in res:
            log.error("%s / %s failed: %s", spec.key, system, res["error"])
        else:
            for name, data in res.get("sets", {}).items():
                log.info("   %-8s median %8.1f ms  p99 %8.1f ms", name, data["median_ms"], data["p99_ms"])
            log.info("   RSS loaded %.0f MB, after run %.0f MB; cold start %.2f s", res["rss_loaded_mb"],
                     res["rss_after_run_mb"], res["cold_start_s"])
        colds = []
        for k in range(args.cold_runs if "error" not in res else 0):
            cold = run_worker(python, system, common + per_system[system] + ["--cold-only"],
                              work / f"{spec.key}-{system}-cold{k}.json", args.worker_timeout)
            if "cold_start_s" in cold:
                colds.append(cold["cold_start_s"])
        if colds:
            res["cold_start"] = _summary(colds)
            res["cold_start"]["runs"] = colds
            log.info("   cold start (%d fresh launches): median %.2f s", len(colds), res["cold_start"]["median"])
        res["model_file_bytes"] = sizes[system]
        result["systems"][system] = res
    if spec.checkpoint is not None and "agree" not in args.skip:
        log.info("== %s: INT8 bundle vs FP32 agreement on %s held-apart blanks", spec.key, "agree")
        agree = run_worker(python, "agree", ["--inputs", str(inputs_path), "--threads", str(args.threads),
                                             "--onnx", str(fp32), "--tokenizer", str(tokenizer),
                                             "--bundle", str(spec.bundle)],
                           work / f"{spec.key}-agree.json", args.worker_timeout)
        result["agreement"] = agree
        if "top1_agreement" in agree:
            log.info("   top-1 agreement %.4f, top-5 overlap %.4f over %d blanks (kept vocab: %.4f / %.4f)",
                     agree["top1_agreement"], agree["top5_overlap"], agree["masked_positions"],
                     agree["top1_agreement_kept_vocab"], agree["top5_overlap_kept_vocab"])
        else:
            log.error("agreement failed: %s", agree.get("error"))
    return result


def _weights_bytes(checkpoint: Path) -> int:
    """Bytes of the weight files of an HF checkpoint folder."""
    return sum(p.stat().st_size for p in checkpoint.iterdir()
               if p.name.endswith((".safetensors", ".bin")) and p.is_file())


# ============================================================================ estimates & goals

def flop_table(results: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Per-query arithmetic of each system and input set, and the Pi estimates."""
    from edge.batcher import DEFAULT_BUCKETS
    from tools.pi_estimate import PI4, PI5, estimate, host_cpu, query_flops, shape_of_hf_config

    host, host_notes = host_cpu()
    out: dict[str, Any] = {"host": vars(host), "host_notes": host_notes, "models": {}}
    for key, model in results.items():
        ckpt = model.get("checkpoint")
        bundle_cfg = _bundle_shape(model["bundle"])
        if bundle_cfg is None:
            continue
        shape_trim = bundle_cfg
        shape_full = shape_of_hf_config(json.loads((Path(ckpt) / "config.json").read_text())) if ckpt else None
        entry: dict[str, Any] = {}
        for name in ("short", "long", "short_4"):
            items = inputs.get(name) or []
            if not items:
                continue
            lengths = [i["tokens"] for i in items]
            seq = sum(lengths) / len(lengths)
            # ours: one pass at the padded bucket length for a single blank; a 4-char
            # blank runs beam search: 1 + 3 x beam(5) rows, one head row each.
            rows = 1 + 3 * 5 if name == "short_4" else 1
            buckets = [next((b for b in DEFAULT_BUCKETS if b >= n), n) for n in lengths]
            per: dict[str, Any] = {"mean_tokens": seq, "mean_bucket": sum(buckets) / len(buckets)}
            per["ours_gflop"] = sum(rows * query_flops(shape_trim, b, 1) for b in buckets) / len(buckets) / 1e9
            if shape_full:
                # pipeline / plain ORT: exact length, head at every position, full vocabulary
                per["full_gflop"] = sum(query_flops(shape_full, n, n) for n in lengths) / len(lengths) / 1e9
            for system in SYSTEMS:
                data = model["systems"].get(system, {}).get("sets", {}).get(name)
                if not data:
                    continue
                flops = (per["ours_gflop"] if system == "ours" else per.get("full_gflop", 0)) * 1e9
                weights = model["systems"][system].get("model_file_bytes")
                est = estimate(flops, data["median_ms"], host, model["systems"][system].get("threads", 2),
                               int8=system == "ours", weight_bytes=weights, targets=(PI4, PI5))
                per[system] = est
            entry[name] = per
        out["models"][key] = entry
    return out


def _bundle_shape(bundle: str):
    from tools.pi_estimate import parse_arch

    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return parse_arch(manifest["architecture"], manifest["vocab_size"])


def goals(results: dict[str, Any], load: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and met / missed."""
    rows: list[dict[str, Any]] = []
    base = results.get("bert-base-random") or next(iter(results.values()), None)
    if base:
        systems = base["systems"]

        def med(system: str) -> float | None:
            return systems.get(system, {}).get("sets", {}).get("short", {}).get("median_ms")

        ours, pipe, ort_ = med("ours"), med("pipeline"), med("ort-fp32")
        if ours and pipe:
            rows.append({"goal": "ours >= 5x faster than the PyTorch pipeline (<=32 tokens, median)",
                         "measured": f"{pipe / ours:.1f}x ({pipe:.1f} ms vs {ours:.1f} ms)", "met": pipe / ours >= 5})
        if ours and ort_:
            rows.append({"goal": "ours >= 3x faster than plain ORT FP32 (<=32 tokens, median)",
                         "measured": f"{ort_ / ours:.1f}x ({ort_:.1f} ms vs {ours:.1f} ms)", "met": ort_ / ours >= 3})
        mem_ours = systems.get("ours", {}).get("rss_after_run_mb")
        mem_pipe = systems.get("pipeline", {}).get("rss_after_run_mb")
        if mem_ours and mem_pipe:
            rows.append({"goal": "ours RSS <= 1/2 of the PyTorch process's (after the run)",
                         "measured": f"{mem_ours:.0f} MB vs {mem_pipe:.0f} MB = {mem_ours / mem_pipe:.2f}",
                         "met": mem_ours / mem_pipe <= 0.5})
        for row in rows:
            row["model"] = base["label"]
    default = results.get("default")
    agree = (default or {}).get("agreement", {})
    if "top1_agreement" in agree:
        rows.append({"goal": "INT8 top-1 agreement with FP32 >= 98% on real text (trained default model)",
                     "measured": f"{100 * agree['top1_agreement']:.1f}% over {agree['masked_positions']} blanks "
                                 f"({100 * agree['top1_agreement_kept_vocab']:.1f}% within the kept vocabulary)",
                     "met": agree["top1_agreement"] >= 0.98, "model": default["label"]})
        common = agree.get("fp32_top1_most_common") or []
        if common and common[0][1] / agree["masked_positions"] > 0.3:
            rows[-1]["measured"] += (f"; caution: FP32 answers '{common[0][0]}' for "
                                     f"{100 * common[0][1] / agree['masked_positions']:.0f}% of blanks, so this "
                                     "agreement is inflated")
    else:
        rows.append({"goal": "INT8 top-1 agreement with FP32 >= 98% on real text (trained default model)",
                     "measured": "not measured (no default bundle + checkpoint)", "met": None, "model": "default"})
    if load:
        load = load.get("bert-base-random") or next(iter(load.values()))
        on = load.get("results", {}).get("batching-on", {})
        at50 = next((r for r in on.get("rates", []) if r["offered_rps"] == 50), None)
        if at50:
            rows.append({"goal": "p99 <= 100 ms at 50 requests/s, zero errors (HTTP, micro-batching on)",
                         "measured": f"p99 {at50['p99_ms']:.1f} ms, {at50['errors']} errors, "
                                     f"{at50['achieved_rps']:.1f} req/s achieved",
                         "met": at50["p99_ms"] <= 100 and at50["errors"] == 0, "model": load.get("model")})
    return rows


# ============================================================================ report

def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _mb(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 1e6:.1f} MB"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report (tables)."""
    m = report["machine"]
    lines = [
        "# Benchmark: PyTorch pipeline vs plain ONNX Runtime FP32 vs this runtime (INT8)",
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}`",
        f"- Machine: {m.get('cpu_model')} ({m.get('cpu_mhz')} MHz reported), {m.get('usable_cpus')} usable cores"
        f"{' (virtual machine)' if m.get('hypervisor') else ''}, {m.get('memory_gb')} GB RAM; SIMD: "
        f"{', '.join(m.get('simd', []))}",
        f"- Threads per system: {m['threads']} (each system in its own process, pinned to {m['threads']} core(s))",
        f"- Versions: onnxruntime {m.get('onnxruntime_version')}, torch {m.get('torch_version')}, "
        f"transformers {m.get('transformers_version')}, Python {m.get('python')}",
        f"- Load at start: {_fmt(report['contention_start']['loadavg'][0], 2)} (1-min average); other heavy "
        f"processes: {', '.join(report['contention_start']['other_heavy_processes']) or 'none'}",
        f"- Inputs: {report['inputs']['source']}; {report['settings']['iterations']} timed queries per system "
        f"and input set (distinct sentences), after {report['settings']['warmup']} warm-up queries.",
        "- `ours` runs with the response cache off and a batch window of "
        f"{report['settings']['ours_window_ms']} ms (a lone query has nothing to wait for; the served default "
        "is 2 ms, measured in the load test). Plain ORT uses ONNX Runtime's default session options "
        "(thread spinning on); ours keeps spinning off (a Pi would idle at 100% CPU).",
        "- 4-character blank: the pipeline and plain ORT make one pass and return disjoint per-position "
        "top-5 lists (what their users get); ours ranks whole 4-character candidates by joint probability "
        "(left-to-right beam search, beam 5: 4 session runs, 16 rows), so it does more work by design.",
        "",
    ]
    for key, model in report["models"].items():
        lines += [f"## {model['label']}", ""]
        if model.get("random_init"):
            lines += ["**Random weights**: speed, memory and size depend on the architecture only; the "
                      "answers (and the agreement figures) of this model are meaningless.", ""]
        if model.get("note"):
            lines += [f"Note: {model['note']}", ""]
        lines += ["| system | input | median ms | p99 ms | vs pipeline | vs ORT FP32 |",
                  "|---|---|---:|---:|---:|---:|"]
        systems = model["systems"]
        for name in SETS:
            for system in SYSTEMS:
                data = systems.get(system, {}).get("sets", {}).get(name)
                if not data:
                    continue
                pipe = systems.get("pipeline", {}).get("sets", {}).get(name, {}).get("median_ms")
                ort_ = systems.get("ort-fp32", {}).get("sets", {}).get(name, {}).get("median_ms")
                med = data["median_ms"]
                lines.append(
                    f"| {system} | {SET_LABELS[name]} (avg {data['mean_tokens']:.0f} tok) | {med:.1f} | "
                    f"{data['p99_ms']:.1f} | {_fmt(pipe / med if pipe else None, 1, 'x')} | "
                    f"{_fmt(ort_ / med if ort_ else None, 1, 'x')} |")
        lines += ["", "| system | RSS after load | RSS after run | peak RSS | model file | cold start (median of fresh launches) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for system in SYSTEMS:
            data = systems.get(system)
            if not data:
                continue
            if "error" in data:
                lines.append(f"| {system} | failed: {data['error'][:200]} | | | | |")
                continue
            cold = data.get("cold_start", {}).get("median", data.get("cold_start_s"))
            lines.append(f"| {system} | {_fmt(data.get('rss_loaded_mb'), 0, ' MB')} | "
                         f"{_fmt(data.get('rss_after_run_mb'), 0, ' MB')} | {_fmt(data.get('peak_rss_mb'), 0, ' MB')} | "
                         f"{_mb(data.get('model_file_bytes'))} | {_fmt(cold, 2, ' s')} |")
        agree = model.get("agreement")
        if agree and "top1_agreement" in agree:
            lines += ["", f"INT8 bundle (engine answers) vs plain FP32 model on {agree['masked_positions']} "
                          "held-apart single-character blanks:", "",
                      "| top-1 agreement | top-5 overlap | top-1 agr. within kept vocab | top-5 overlap within kept vocab "
                      "| FP32 top-1 accuracy | INT8 top-1 accuracy | vocab FP32 → bundle |",
                      "|---:|---:|---:|---:|---:|---:|---:|",
                      f"| {100 * agree['top1_agreement']:.1f}% | {100 * agree['top5_overlap']:.1f}% | "
                      f"{100 * agree['top1_agreement_kept_vocab']:.1f}% | {100 * agree['top5_overlap_kept_vocab']:.1f}% | "
                      f"{100 * agree['fp32_top1_accuracy']:.1f}% | {100 * agree['ours_top1_accuracy']:.1f}% | "
                      f"{agree['fp32_vocab']} → {agree['bundle_vocab']} |"]
            if model.get("random_init"):
                lines.append("\n(Random weights: near-uniform logits, so agreement here mostly measures noise, "
                             "not quantization quality.)")
            common = agree.get("fp32_top1_most_common") or []
            if common:
                share = common[0][1] / agree["masked_positions"]
                lines.append(f"\nFP32 top-1 answers: {agree['fp32_top1_distinct']} distinct; most common "
                             + ", ".join(f"'{t}' x{c}" for t, c in common) + ".")
                if share > 0.3:
                    lines.append(f"**Caution**: the FP32 model answers '{common[0][0]}' for {100 * share:.0f}% of "
                                 "the blanks; agreement between two copies of a model this undecided is inflated "
                                 "and says little about INT8 quality on a well-trained model.")
        elif agree:
            lines += ["", f"Agreement: failed: {agree.get('error')}"]
        lines.append("")
    for load in (report.get("load") or {}).values():
        lines += [f"## HTTP load test ({load['model']})", "",
                  f"`python -m edge serve` on loopback, cache off, distinct sentences (<=32 tokens, one blank), "
                  f"open-loop arrivals at fixed rates for {load['seconds']} s each; latency from the scheduled send "
                  f"time. The load generator runs on the same {m.get('usable_cpus')} cores as the server.", "",
                  "| config | offered req/s | achieved req/s | p50 ms | p99 ms | errors | server RSS before → after |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, entry in load["results"].items():
            if "error" in entry:
                lines.append(f"| {name} | failed: {entry['error'][:200]} | | | | | |")
                continue
            for r in entry["rates"]:
                lines.append(f"| {name} | {r['offered_rps']:g} | {r['achieved_rps']:.1f} | {r['p50_ms']:.1f} | "
                             f"{r['p99_ms']:.1f} | {r['errors']} | {_fmt(r['server_rss_before_mb'], 0)} → "
                             f"{_fmt(r['server_rss_after_mb'], 0)} MB |")
        for name, entry in load["results"].items():
            if "rss_before_mb" in entry:
                growth = (entry.get("rss_after_mb") or 0) - (entry.get("rss_before_mb") or 0)
                lines.append(f"\n- {name}: `python {shlex.join(entry['command'][1:])}`; server RSS after warm-up "
                             f"{_fmt(entry['rss_before_mb'], 0)} MB, after all rates {_fmt(entry.get('rss_after_mb'), 0)} MB "
                             f"(growth {growth:+.0f} MB)")
        lines.append("")
    flops = report.get("estimates")
    if flops:
        host = flops["host"]
        lines += ["## Paper estimate for Raspberry Pi 4 / Pi 5", "",
                  f"Host peak assumed: {host['ghz']} GHz x {host['fp32_flop_per_cycle']:g} FP32 FLOP/cycle/core, "
                  f"{host['int8_op_per_cycle']:g} INT8 op/cycle/core ({'; '.join(flops['host_notes'])}).", "",
                  "| model | system | input | GFLOP (GOP) per query | measured ms | achieved GFLOP/s | efficiency "
                  "| Pi 4 est. ms | Pi 5 est. ms |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for key, entry in flops["models"].items():
            for name, per in entry.items():
                for system in SYSTEMS:
                    est = per.get(system)
                    if not est:
                        continue
                    pis = list(est["targets"].values())
                    lines.append(f"| {key} | {system} | {name} | {est['gflop_per_query']:.2f} | "
                                 f"{est['measured_ms']:.1f} | {est['achieved_gops']:.1f} | "
                                 f"{100 * est['efficiency']:.1f}% | {pis[0]['estimate_ms']:.0f} | "
                                 f"{pis[1]['estimate_ms']:.0f} |")
        lines += ["", "Assumptions:", ""] + [f"- {a}" for a in flops["assumptions"]]
        lines.append("")
    lines += ["## Goals (this machine, bert-base-chinese architecture unless stated)", "",
              "| goal | model | measured | met |", "|---|---|---|---|"]
    for row in report["goals"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['goal']} | {row.get('model', '')} | {row['measured']} | {met} |")
    lines.append("")
    if report.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Bar chart of median latency per system/input (log scale) and load-test curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"].items())
    loads = list((report.get("load") or {}).values())
    panels = max(len(models) + len(loads), 1)
    ncols = min(panels, 2)
    nrows = (panels + ncols - 1) // ncols
    fig, grid = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.8 * nrows), squeeze=False)
    flat = list(grid.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    axes = [flat]  # panels in reading order: latency per model, then load tests
    colors = {"pipeline": "#d62728", "ort-fp32": "#1f77b4", "ours": "#2ca02c"}
    for ax, (key, model) in zip(axes[0], models):
        width = 0.27
        for k, system in enumerate(SYSTEMS):
            meds, p99s, xs = [], [], []
            for j, name in enumerate(SETS):
                data = model["systems"].get(system, {}).get("sets", {}).get(name)
                if data:
                    xs.append(j + (k - 1) * width)
                    meds.append(data["median_ms"])
                    p99s.append(data["p99_ms"] - data["median_ms"])
            if xs:
                ax.bar(xs, meds, width, yerr=[[0] * len(p99s), p99s], capsize=2, label=system, color=colors[system])
        ax.set_xticks(range(len(SETS)))
        long_label = f"{report['settings'].get('long_tokens', 128)} tok"
        ax.set_xticklabels(["≤32 tok" if s == "short" else long_label if s == "long" else "≤32, 4-char" for s in SETS])
        ax.set_yscale("log")
        ax.set_ylabel("latency per query, ms (bar: median, whisker: p99)")
        title = model["label"].replace("architecture, ", "arch.,\n")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3, which="both")
    for ax, load in zip(axes[0][len(models):], loads):
        for name, entry in load["results"].items():
            rates = entry.get("rates", [])
            if rates:
                ax.plot([r["offered_rps"] for r in rates], [r["p99_ms"] for r in rates], "o-", label=f"{name} p99")
                ax.plot([r["offered_rps"] for r in rates], [r["p50_ms"] for r in rates], "x--", label=f"{name} p50")
        ax.axhline(100, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("offered load, requests/s")
        ax.set_ylabel("latency, ms")
        ax.set_title(f"HTTP load test ({load['model']})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{report['machine'].get('cpu_model')}, {report['machine']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ command

QUICK = {"iterations": 5, "warmup": 1, "cold_runs": 1, "n_agree": 12, "rates": [5.0, 10.0], "load_seconds": 2.0,
         "n_per_set": 8, "n_load": 40}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m tools bench``."""
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench", help="results folder")
    parser.add_argument("--threads", type=int, default=2, help="threads for every system (and the server)")
    parser.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    parser.add_argument("--models", default="bert-base-random,default",
                        help="comma list of bert-base-random (bert-base-chinese config, random weights) and "
                             "default (the shipped bundle + its training checkpoint)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="benchmark this HF checkpoint + --bundle pair instead of --models")
    parser.add_argument("--bundle", type=Path, default=None, help="INT8 bundle built from --checkpoint")
    parser.add_argument("--bert-source", type=Path, default=BERT_SOURCE,
                        help="bert-base-chinese folder (config + tokenizer) for the random-weights model")
    parser.add_argument("--bert-bundle", type=Path, default=None,
                        help="prebuilt random-weights INT8 bundle (default: build one into OUT/work)")
    parser.add_argument("--seed", type=int, default=0, help="random-weights seed (same for checkpoint and bundle)")
    parser.add_argument("--default-bundle", type=Path, default=DEFAULT_BUNDLE, help="the shipped default bundle")
    parser.add_argument("--default-checkpoint", type=Path, default=None,
                        help=f"its HF checkpoint (default: the manifest's source, else {DEFAULT_CHECKPOINT})")
    parser.add_argument("--data", type=Path, default=SHARED / "data", help="corpus for held-apart inputs")
    parser.add_argument("--iterations", type=int, default=40, help="timed queries per system and input set")
    parser.add_argument("--warmup", type=int, default=5, help="untimed queries before timing")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh launches per system for cold start")
    parser.add_argument("--agree-samples", type=int, default=300, help="held-apart blanks for INT8 vs FP32")
    parser.add_argument("--long-tokens", type=int, default=128, help="length of the long inputs (with [CLS]/[SEP])")
    parser.add_argument("--ours-window-ms", type=float, default=0.0, help="engine batch window in the latency runs")
    parser.add_argument("--rates", default="10,25,50,100", help="offered loads for the HTTP test, requests/s")
    parser.add_argument("--load-seconds", type=float, default=12.0, help="duration of each offered rate")
    parser.add_argument("--load-model", default=None,
                        help="comma list of model keys whose bundles the HTTP test serves "
                             "(default: bert-base-random if run, else the first model)")
    parser.add_argument("--batch-window-ms", type=float, default=3.0, help="server batch window, batching-on config")
    parser.add_argument("--max-batch", type=int, default=16, help="server max batch, batching-on config")
    parser.add_argument("--http-threads", type=int, default=8, help="waitress threads in the load test")
    parser.add_argument("--skip", default="", help="comma list of pipeline,ort-fp32,ours,agree,load to leave out")
    parser.add_argument("--rebuild", action="store_true", help="re-export / rebuild the cached models in OUT/work")
    parser.add_argument("--worker-timeout", type=float, default=900.0, help="seconds before a worker is killed")


def run(args: argparse.Namespace) -> int:
    """Run the whole benchmark and write results.md / results.json / bench.png."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise ToolError("psutil is needed for memory readings: pip install psutil (it is in the tools extra)") from None
    command = shlex.join(["python", "-m", "tools", *sys.argv[1:]]) if sys.argv[0].endswith("__main__.py") \
        else shlex.join(sys.argv)
    rates = [float(r) for r in str(args.rates).split(",") if r.strip()]
    n_per_set, n_load = 60, 500
    if args.quick:
        args.iterations = min(args.iterations, QUICK["iterations"])
        args.warmup = min(args.warmup, QUICK["warmup"])
        args.cold_runs = min(args.cold_runs, QUICK["cold_runs"])
        args.agree_samples = min(args.agree_samples, QUICK["n_agree"])
        rates = rates if args.rates != "10,25,50,100" else QUICK["rates"]
        args.load_seconds = min(args.load_seconds, QUICK["load_seconds"])
        n_per_set, n_load = QUICK["n_per_set"], QUICK["n_load"]
    n_per_set = max(n_per_set, args.iterations + args.warmup)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.sets = list(SETS)
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    warnings: list[str] = []
    started = time.monotonic()
    busy = contention()
    if busy["other_heavy_processes"]:
        warnings.append("other CPU-heavy processes were running at the start: " + "; ".join(busy["other_heavy_processes"]))
        log.warning("%s", warnings[-1])

    # -- models
    specs: list[tuple[ModelSpec, dict[str, Any]]] = []
    if args.checkpoint or args.bundle:
        if not (args.checkpoint and args.bundle):
            raise ToolError("--checkpoint and --bundle go together (the bundle must be built from the checkpoint)")
        for path in (args.checkpoint, args.bundle):
            if not path.is_dir():
                raise ToolError(f"{path}: folder does not exist")
        specs.append(prepare_checkpoint_model("custom", f"{args.bundle.name} (from {args.checkpoint})",
                                              args.checkpoint, args.bundle, work, args.rebuild))
    else:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = set(wanted) - {"bert-base-random", "default"}
        if unknown:
            raise ToolError(f"--models: unknown {', '.join(sorted(unknown))} (use bert-base-random, default)")
        if "bert-base-random" in wanted:
            if not (args.bert_source / "config.json").is_file():
                raise ToolError(f"{args.bert_source}: no config.json (the bert-base-chinese config folder)")
            specs.append(prepare_bert_random(args.bert_source, work, args.seed, args.bert_bundle, args.rebuild, python))
        if "default" in wanted:
            if (args.default_bundle / "manifest.json").is_file():
                checkpoint = args.default_checkpoint or _default_checkpoint(args.default_bundle)
                specs.append(prepare_checkpoint_model("default", "shipped default model (edge/default_bundle)",
                                                      checkpoint, args.default_bundle, work, args.rebuild))
            else:
                warnings.append(f"no default bundle at {args.default_bundle}: the default model was not benchmarked")
                log.warning("%s", warnings[-1])
    if not specs:
        raise ToolError("nothing to benchmark (no model prepared)")

    # -- inputs
    if not args.data.exists():
        raise ToolError(f"{args.data}: corpus folder for the held-apart inputs does not exist")
    tokenizer_path = args.bert_source / "tokenizer.json"
    if not tokenizer_path.is_file():
        tokenizer_path = next(s.checkpoint for s, _ in specs if s.checkpoint) / "tokenizer.json"
    key = json.dumps([str(args.data.resolve()), str(tokenizer_path), n_per_set, args.agree_samples, n_load,
                      args.long_tokens, args.seed])
    cache = work / f"inputs-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    if args.rebuild or not cache.is_file():
        log.info("== picking inputs from held-apart text in %s", args.data)
        inputs = build_inputs(args.data, tokenizer_path, n_per_set, args.agree_samples, n_load,
                              long_tokens=args.long_tokens, seed=args.seed)
        cache.write_text(json.dumps(inputs, ensure_ascii=False, indent=1), encoding="utf-8")
    inputs = json.loads(cache.read_text(encoding="utf-8"))
    inputs_path = work / "inputs-used.json"
    inputs_path.write_text(json.dumps(inputs, ensure_ascii=False, indent=1), encoding="utf-8")

    # -- per-system timing
    results = {}
    for spec, notes in specs:
        results[spec.key] = bench_model(python, spec, notes, inputs_path, args, work)
        for system, res in results[spec.key]["systems"].items():
            if "error" in res:
                warnings.append(f"{spec.key} / {system}: {res['error']}")

    # -- HTTP load test
    load: dict[str, Any] = {}
    load_keys = [k.strip() for k in (args.load_model or "").split(",") if k.strip()] or \
        ["bert-base-random" if "bert-base-random" in results else specs[0][0].key]
    for load_key in load_keys if "load" not in args.skip else []:
        spec = next((s for s, _ in specs if s.key == load_key), None)
        if spec is None:
            warnings.append(f"--load-model {load_key}: not among the benchmarked models; no load test for it")
            log.warning("%s", warnings[-1])
            continue
        from tools.loadtest import load_test

        configs = {
            "batching-on": {"batch_window_ms": args.batch_window_ms, "max_batch": args.max_batch},
            "batching-off": {"batch_window_ms": 0.0, "max_batch": 1},
        }
        log.info("== HTTP load test on %s: rates %s req/s, %.0f s each", spec.bundle, rates, args.load_seconds)
        pool = inputs["load_pool"]
        load[load_key] = {
            "model": spec.label, "bundle": str(spec.bundle), "seconds": args.load_seconds, "rates": rates,
            "results": load_test(spec.bundle, lambda i: load_text(pool, i, args.seed), rates, args.load_seconds,
                                 args.threads, configs, http_threads=args.http_threads,
                                 log_dir=out / f"logs-{load_key}", cwd=REPO, progress=log.info)}
        for name, entry in load[load_key]["results"].items():
            if "error" in entry:
                warnings.append(f"load test {load_key} / {name}: {entry['error']}")

    # -- estimates, goals, report
    from tools.pi_estimate import ASSUMPTIONS, cpu_table

    estimates = flop_table(results, inputs)
    estimates["assumptions"] = ASSUMPTIONS
    estimates["targets"] = cpu_table()
    busy_end = contention()
    if busy_end["other_heavy_processes"] and not busy["other_heavy_processes"]:
        warnings.append("other CPU-heavy processes were running at the end: " + "; ".join(busy_end["other_heavy_processes"]))
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(args.threads),
        "contention_start": busy,
        "contention_end": busy_end,
        "settings": {"iterations": args.iterations, "warmup": args.warmup, "cold_runs": args.cold_runs,
                     "threads": args.threads, "quick": args.quick, "ours_window_ms": args.ours_window_ms,
                     "agree_samples": args.agree_samples, "long_tokens": args.long_tokens},
        "inputs": {"source": inputs["source"], "path": str(inputs_path),
                   "counts": {k: len(v) for k, v in inputs.items() if isinstance(v, list)}},
        "models": results,
        "load": load,
        "estimates": estimates,
        "warnings": warnings,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    report["goals"] = goals(results, load)
    (out / "results.json").write_text(json.dumps(report, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    (out / "results.md").write_text(render_markdown(report), encoding="utf-8")
    render_chart(report, out / "bench.png")
    log.info("results: %s, %s, %s (%.0f s)", out / "results.md", out / "results.json", out / "bench.png",
             report["elapsed_s"])
    return 0


def _default_checkpoint(bundle: Path) -> Path | None:
    """The default bundle's training checkpoint: the manifest's source folder, else runs/default."""
    try:
        source = Path(json.loads((bundle / "manifest.json").read_text(encoding="utf-8")).get("source", ""))
    except (OSError, json.JSONDecodeError):
        source = Path()
    for candidate in (source, REPO / source, DEFAULT_CHECKPOINT):
        if str(candidate) not in ("", ".") and (candidate / "config.json").is_file():
            return candidate
    return None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    print("usage: python -m tools bench --help  (python -m tools.bench worker ... is internal)", file=sys.stderr)
    sys.exit(2)
