"""The fill-in-the-blank engine: bundle → ONNX Runtime session → top-k answers.

- One-character blank: one forward pass, the distribution at the mask.
- n-character blank: left-to-right beam search over the blank's positions; a
  candidate's score is its joint probability by the chain rule
  p(c1 | ctx) · p(c2 | ctx, c1) · …, so whole words (idioms) are ranked as wholes,
  not as independent per-position guesses.
- Several blanks: easy-first. All blanks are first answered with the others still
  masked; then, most confident first, each blank is answered again with the blanks
  already decided filled in with their best answer, so the top answers fit together.
- ``blank_length="auto"``: a single-``[MASK]`` blank is tried with 1–4 characters
  and the candidates of all lengths are ranked together by per-character
  probability (the geometric mean, which is what ``score`` then reports).

All forward passes go through the MicroBatcher, so concurrent requests share
batches; an LRU cache answers repeated queries.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge import __version__
from edge.affinity import ort_thread_affinities, thread_count, usable_cores
from edge.batcher import DEFAULT_BUCKETS, MicroBatcher, Row
from edge.blanks import find_blanks
from edge.bundle import Bundle, BundleError, load_bundle
from edge.cache import LRUCache
from edge.manifest import ATTENTION_MASK, INPUT_IDS, MASK_POSITIONS
from edge.memory import limit_malloc_retention

log = logging.getLogger(__name__)

LOW_CONFIDENCE_HINT = "上下文信息不足，建议补充更多背景"
RANDOM_INIT_WARNING = (
    "This bundle has RANDOM weights (built for speed/size benchmarks): its answers are meaningless."
)
AUTO_LENGTHS = (1, 2, 3, 4)
UNUSED_RE = re.compile(r"^\[unused\d+\]$")
# Log-probability given to a filler character outside the vocabulary in score_fillers.
OOV_LOGP = -20.0


def _round_sig(value: float, digits: int = 4) -> float:
    """Round to significant digits (joint probabilities of long blanks are tiny)."""
    return float(f"{value:.{digits}g}")


class InputError(ValueError):
    """A query the engine cannot answer; ``code`` is machine-readable, ``message`` says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class EngineConfig:
    """Runtime settings (all have defaults suited to a 4-core board)."""

    threads: int | None = None  # None/0: one per core in the affinity mask
    spin: bool = False
    batch_window_ms: float = 2.0
    max_batch: int = 16  # rows per session run
    cache_size: int = 1024
    max_text_chars: int = 2000
    max_blanks: int = 8
    max_blank_chars: int = 8
    max_top_k: int = 20
    beam_width: int = 0  # 0: max(top_k, 5)
    low_confidence: float = 0.6
    max_seq: int = 512  # cap on the model window (also bounded by the bundle's max_length)
    memory_arena: bool = False  # ORT's CPU arena: no faster here, ~45 MB more resident (bert-base)
    buckets: Sequence[int] = field(default=DEFAULT_BUCKETS)


@dataclass
class _Query:
    """A parsed query: token ids of the text between blanks, and the blanks."""

    text: str
    seg_ids: list[list[int]]
    starts: list[int]
    lengths: list[tuple[int, ...]]  # candidate lengths per blank (several when auto)


def _log_softmax(logits: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """Log-probabilities over the valid tokens only (invalid ones get -inf)."""
    x = np.where(invalid, -np.inf, logits.astype(np.float64))
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


class Engine:
    """Answers fill-in-the-blank queries from one bundle; thread-safe."""

    def __init__(self, bundle: Bundle, config: EngineConfig | None = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.config = config or EngineConfig()
        cfg = self.config
        self.tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        if size != self.manifest.vocab_size:
            raise BundleError(
                f"{bundle.tokenizer_path}: tokenizer has {size} tokens, manifest says vocab_size "
                f"{self.manifest.vocab_size}"
            )
        self.id_to_token = [""] * size
        for token, index in vocab.items():
            self.id_to_token[index] = token
        special = set(self.manifest.special_ids.values())
        self.invalid = np.array(
            [
                i in special or tok.startswith("##") or bool(UNUSED_RE.match(tok)) or not tok.strip()
                for i, tok in enumerate(self.id_to_token)
            ]
        )
        ids = self.manifest.special_ids
        self.cls_id, self.sep_id = ids["[CLS]"], ids["[SEP]"]
        self.mask_id, self.pad_id, self.unk_id = ids["[MASK]"], ids["[PAD]"], ids["[UNK]"]
        self.window = min(self.manifest.max_length, cfg.max_seq)

        self.cores = usable_cores()
        self.threads = thread_count(cfg.threads)
        limit_malloc_retention()  # before ONNX Runtime parses the model (see edge/memory.py)
        self.session = self._make_session()
        self.cache = LRUCache(cfg.cache_size)
        self.batcher = MicroBatcher(
            self._run_session,
            pad_id=self.pad_id,
            window_ms=cfg.batch_window_ms,
            max_rows=cfg.max_batch,
            buckets=[b for b in cfg.buckets if b <= self.window] + [self.window],
            on_thread_start=self._pin_worker,
        )
        self._closed = False
        self._lock = threading.Lock()
        if self.manifest.random_init:
            log.warning("%s: %s", bundle.path, RANDOM_INIT_WARNING)
        log.info(
            "engine ready: %s (%s), vocab %d, window %d, %d threads on cores %s, spinning %s",
            self.manifest.name, bundle.path, size, self.window, self.threads, self.cores,
            "on" if cfg.spin else "off",
        )

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, **settings) -> "Engine":
        """Load and verify the bundle at ``path`` (None: the embedded default) and start."""
        return cls(load_bundle(path), EngineConfig(**settings))

    # -- session ---------------------------------------------------------------
    def _make_session(self) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # One graph branch at a time: BERT is a chain, parallel branches only add threads.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The arena keeps every buffer it ever grew to; without it a bert-base-sized
        # INT8 bundle measured 185 MB resident instead of 228 MB, at the same latency.
        options.enable_cpu_mem_arena = self.config.memory_arena
        # Spinning keeps idle worker threads busy-waiting for the next op: a little
        # lower latency, but a Pi would sit at 100% CPU (and heat up) between queries.
        spin = "1" if self.config.spin else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        affinities = ort_thread_affinities(self.threads, self.cores)
        if affinities:
            options.add_session_config_entry("session.intra_op_thread_affinities", affinities)
        try:
            return ort.InferenceSession(
                str(self.bundle.model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{self.bundle.model_path}: ONNX Runtime cannot load it: {exc}") from exc

    def _pin_worker(self) -> None:
        """Pin the worker (ONNX Runtime's first intra-op thread) to the first usable core."""
        if ort_thread_affinities(self.threads, self.cores) and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {self.cores[0]})

    def _run_session(self, input_ids, attention_mask, mask_positions) -> np.ndarray:
        return self.session.run(
            None,
            {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, MASK_POSITIONS: mask_positions},
        )[0]

    # -- parsing ---------------------------------------------------------------
    def _parse(self, text, top_k, blank_length) -> _Query:
        cfg = self.config
        if not isinstance(text, str):
            raise InputError("bad_text", "text must be a string")
        if not text.strip():
            raise InputError("empty_text", "请输入句子 / the text is empty: type a sentence with [MASK] where the blank is")
        if len(text) > cfg.max_text_chars:
            raise InputError(
                "text_too_long",
                f"文本过长 / the text has {len(text)} characters; the limit is {cfg.max_text_chars}",
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= cfg.max_top_k:
            raise InputError("bad_top_k", f"top_k must be an integer from 1 to {cfg.max_top_k}, got {top_k!r}")
        if blank_length is not None and blank_length != "auto" and (
            isinstance(blank_length, bool) or not isinstance(blank_length, int)
            or not 1 <= blank_length <= cfg.max_blank_chars
        ):
            raise InputError(
                "bad_blank_length",
                f'blank_length must be "auto" or an integer from 1 to {cfg.max_blank_chars}, got {blank_length!r}',
            )
        segments, blanks = find_blanks(text)
        if not blanks:
            raise InputError("no_blank", "没有空格 / no blank found: write [MASK] where the missing character goes")
        if len(blanks) > cfg.max_blanks:
            raise InputError(
                "too_many_blanks", f"空格太多 / {len(blanks)} blanks; at most {cfg.max_blanks} per text"
            )
        lengths = []
        for blank in blanks:
            if blank.n_masks > cfg.max_blank_chars:
                raise InputError(
                    "bad_blank_length",
                    f"a blank of {blank.n_masks} characters is too long; at most {cfg.max_blank_chars}",
                )
            if blank.n_masks == 1 and blank_length == "auto":
                lengths.append(AUTO_LENGTHS)
            elif blank.n_masks == 1 and isinstance(blank_length, int):
                lengths.append((blank_length,))
            else:
                lengths.append((blank.n_masks,))
        seg_ids = [e.ids for e in self.tokenizer.encode_batch(segments, add_special_tokens=False)]
        return _Query(text=text, seg_ids=seg_ids, starts=[b.start for b in blanks], lengths=lengths)

    def _build(self, query: _Query, fills: list[tuple[int, ...]]) -> tuple[list[int], list[list[int]], bool]:
        """Token ids with each blank written as its fill; positions of each blank.

        Longer than the window: keep a window of context centred on the blanks.
        """
        ids = [self.cls_id]
        positions = []
        for seg, fill in zip(query.seg_ids, fills):
            ids.extend(seg)
            positions.append(list(range(len(ids), len(ids) + len(fill))))
            ids.extend(fill)
        ids.extend(query.seg_ids[-1])
        ids.append(self.sep_id)
        if len(ids) <= self.window:
            return ids, positions, False
        avail = self.window - 2
        lo, hi = positions[0][0] - 1, positions[-1][-1] - 1  # in ids[1:-1]
        span = hi - lo + 1
        if span > avail:
            raise InputError(
                "text_too_long",
                f"the blanks are {span} tokens apart; the model sees at most {avail}: split the text",
            )
        content = ids[1:-1]
        start = max(0, min(lo - (avail - span) // 2, len(content) - avail))
        ids = [self.cls_id] + content[start : start + avail] + [self.sep_id]
        positions = [[p - start for p in blank] for blank in positions]
        return ids, positions, True

    # -- search ----------------------------------------------------------------
    def _beam(self, query, fills, index, length, beam_width) -> list[tuple[tuple[int, ...], float]]:
        """Left-to-right beam search for blank ``index`` written with ``length`` masks."""
        beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        for step in range(length):
            rows = []
            for prefix, _ in beams:
                trial = list(fills)
                trial[index] = prefix + (self.mask_id,) * (length - len(prefix))
                ids, positions, _ = self._build(query, trial)
                rows.append(Row(ids, [positions[index][step]]))
            outputs = self.batcher.submit(rows)
            pool = []
            for (prefix, score), logits in zip(beams, outputs):
                logp = _log_softmax(logits[0], self.invalid)
                width = min(beam_width, int((~self.invalid).sum()))
                best = np.argpartition(-logp, width - 1)[:width]
                pool.extend((prefix + (int(t),), score + float(logp[t])) for t in best)
            pool.sort(key=lambda item: -item[1])
            beams = pool[:beam_width]
        return beams

    def _answer_blank(self, query, fills, index, top_k) -> list[tuple[tuple[int, ...], float, float]]:
        """Candidates for one blank: (tokens, joint log-prob, ranking score)."""
        beam_width = self.config.beam_width or max(top_k, 5)
        found = []
        for length in query.lengths[index]:
            trial = list(fills)
            for tokens, logp in self._beam(query, trial, index, length, beam_width):
                found.append((tokens, logp, logp / length if len(query.lengths[index]) > 1 else logp))
        found.sort(key=lambda item: -item[2])
        return found[:top_k]

    def _solve(self, query: _Query, top_k: int) -> list[list[tuple[tuple[int, ...], float, float]]]:
        n = len(query.lengths)
        masked = [(self.mask_id,) * lengths[0] for lengths in query.lengths]
        single = all(lengths == (1,) for lengths in query.lengths)
        if single:
            # Every blank one character: one pass answers them all.
            ids, positions, _ = self._build(query, masked)
            logits = self.batcher.submit([Row(ids, [p[0] for p in positions])])[0]
            first = []
            for i in range(n):
                logp = _log_softmax(logits[i], self.invalid)
                best = np.argsort(-logp)[:top_k]
                first.append([((int(t),), float(logp[t]), float(logp[t])) for t in best])
        else:
            first = [self._answer_blank(query, masked, i, top_k) for i in range(n)]
        if n == 1:
            return first
        # Easy-first: most confident blank keeps its answers; each next blank is
        # answered again given the decided blanks' best fills.
        order = sorted(range(n), key=lambda i: -first[i][0][2])
        fills = list(masked)
        final: list = [None] * n
        for rank, i in enumerate(order):
            final[i] = first[i] if rank == 0 else self._answer_blank(query, fills, i, top_k)
            fills[i] = final[i][0][0]
        return final

    # -- public API ------------------------------------------------------------
    def predict(self, text: str, top_k: int = 5, blank_length: int | str | None = None) -> dict:
        """Answer one query; returns the HTTP API's JSON shape (see design.md)."""
        began = time.perf_counter()
        # Only answered (valid) queries are cached, so a hit needs no parsing.
        key = (text, top_k, blank_length)
        try:
            cached = self.cache.get(key)
        except TypeError:  # an unhashable parameter (a list from JSON): _parse rejects it
            cached = None
        if cached is not None:
            result = copy.deepcopy(cached)
            result["cached"] = True
            result["elapsed_ms"] = round((time.perf_counter() - began) * 1000, 2)
            return result
        query = self._parse(text, top_k, blank_length)
        # Built once here for the truncation flag; the search builds its own variants.
        _, _, truncated = self._build(query, [(self.mask_id,) * lengths[0] for lengths in query.lengths])
        answers = self._solve(query, top_k)
        blanks = []
        auto = [len(lengths) > 1 for lengths in query.lengths]
        for i, candidates in enumerate(answers):
            items = [
                {
                    "text": self._detokenize(tokens),
                    "score": _round_sig(math.exp(rank_score if auto[i] else logp)),
                }
                for tokens, logp, rank_score in candidates
            ]
            blank = {
                "start": query.starts[i],
                "length": len(candidates[0][0]),
                "candidates": items,
                "low_confidence": items[0]["score"] < self.config.low_confidence,
            }
            if blank["low_confidence"]:
                blank["hint"] = LOW_CONFIDENCE_HINT
            blanks.append(blank)
        result = {
            "blanks": blanks,
            "truncated": truncated,
            "cached": False,
            "elapsed_ms": 0.0,
            "model": {"name": self.manifest.name, "random_init": self.manifest.random_init},
        }
        self.cache.put(key, copy.deepcopy(result))
        result["elapsed_ms"] = round((time.perf_counter() - began) * 1000, 2)
        return result

    def score_fillers(self, text: str, fillers: list[str]) -> list[float]:
        """Joint log-probability of each filler in the text's single blank (chain rule, left to right)."""
        segments, blanks = find_blanks(text)
        if len(blanks) != 1:
            raise InputError("no_blank" if not blanks else "too_many_blanks", "score_fillers needs exactly one blank")
        if not fillers:
            return []
        query = _Query(
            text=text,
            seg_ids=[e.ids for e in self.tokenizer.encode_batch(segments, add_special_tokens=False)],
            starts=[blanks[0].start],
            lengths=[(1,)],
        )
        rows, targets = [], []
        for filler in fillers:
            tokens = tuple(self.tokenizer.encode(filler, add_special_tokens=False).ids)
            if not tokens:
                raise InputError("bad_filler", f"filler {filler!r} has no tokens")
            for step in range(len(tokens)):
                fill = tokens[:step] + (self.mask_id,) * (len(tokens) - step)
                ids, positions, _ = self._build(query, [fill])
                rows.append(Row(ids, [positions[0][step]]))
            targets.append(tokens)
        outputs = iter(self.batcher.submit(rows))
        scores = []
        for tokens in targets:
            total = 0.0
            for token in tokens:
                logp = _log_softmax(next(outputs)[0], self.invalid)
                total += float(logp[token]) if np.isfinite(logp[token]) else OOV_LOGP
            scores.append(total)
        return scores

    def _detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(self.id_to_token[t] for t in tokens)

    def info(self) -> dict:
        """A summary of the bundle and the runtime settings, for /api/info and the CLI."""
        m = self.manifest
        info = {
            "name": m.name,
            "source": m.source,
            "source_revision": m.source_revision,
            "random_init": m.random_init,
            "vocab_size": m.vocab_size,
            "max_length": m.max_length,
            "window": self.window,
            "architecture": vars(m.architecture).copy(),
            "quantization": m.quantization,
            "evaluation": m.evaluation,
            "training": m.training,
            "notes": m.notes,
            "files": {name: {"size": e.size, "sha256": e.sha256} for name, e in m.files.items()},
            "bundle": str(self.bundle.path),
            "threads": self.threads,
            "cores": self.cores,
            "spin": self.config.spin,
            "batch_window_ms": self.config.batch_window_ms,
            "max_batch": self.config.max_batch,
            "cache_size": self.config.cache_size,
            "version": __version__,
        }
        if m.random_init:
            info["warning"] = RANDOM_INIT_WARNING
        return info

    def stats(self) -> dict:
        """Counters for /metrics: cache hits/misses, batches, batch sizes, rows run."""
        stats = self.batcher.stats()
        stats.update(cache_hits=self.cache.hits, cache_misses=self.cache.misses)
        return stats

    def close(self) -> None:
        """Stop the inference worker (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.batcher.close()
