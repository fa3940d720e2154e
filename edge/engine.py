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
batches; an LRU cache answers repeated queries; each request has a budget of model
rows and time.

With the bundle's word LM and phrase memory the answers are fused (:mod:`edge.fusion`):
candidates from the model's one all-masked pass, the LM and the memory, scored with the
fitted weights. Why this file is longer than the others (~800 lines): both search paths,
model alone and fused, are methods of the one ``Engine``, because they share its
session, tokenizer, window building, cache and request budget; what they compute lives
elsewhere (the fusion arithmetic in :mod:`edge.fusion`, the LM in :mod:`edge.ngram_lm`,
the memory in :mod:`edge.phrase_memory`, blank parsing in :mod:`edge.blanks`).
"""

from __future__ import annotations

import contextlib
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
from edge.blanks import find_blanks, window_start
from edge.bundle import Bundle, BundleError, load_bundle
from edge.cache import LRUCache
from edge.fusion import LN10, MODEL_FLOOR, Candidate, Fusion
from edge.idiom_context import IdiomContext, IdiomContextError
from edge.manifest import ATTENTION_MASK, INPUT_IDS, MASK_POSITIONS
from edge.memory import limit_malloc_retention
from edge.ngram_lm import NgramLM, NgramLMError
from edge.phrase_memory import PhraseMemory, PhraseMemoryError

log = logging.getLogger(__name__)

LOW_CONFIDENCE_HINT = "上下文信息不足，建议补充更多背景"
RANDOM_INIT_WARNING = (
    "This bundle has RANDOM weights (built for speed/size benchmarks): its answers are meaningless."
)
AUTO_LENGTHS = (1, 2, 3, 4)
UNUSED_RE = re.compile(r"^\[unused\d+\]$")
# Log-probability given to a filler character outside the vocabulary in score_fillers.
OOV_LOGP = -20.0
LM_FILE = "lm.bin"
MEMORY_FILE = "memory.bin"
IDIOMS_FILE = "idioms.bin"
SOURCE_ORDER = ("model", "lm", "memory", "context")
# A memory hit is quoted under its answer when at least this much context matched
# (shorter matches are common phrases, not a line the text comes from).
MIN_QUOTE_CONTEXT = 4


def _round_sig(value: float, digits: int = 4) -> float:
    """Round to significant digits (joint probabilities of long blanks are tiny)."""
    return float(f"{value:.{digits}g}")


class InputError(ValueError):
    """A query the engine cannot answer; ``code`` is machine-readable, ``message`` says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Budget:
    """What one request may still spend: model rows, and time until its deadline."""

    def __init__(self, rows: int, seconds: float):
        self.rows_left = rows
        self.rows_limit = rows
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def spend(self, rows: int) -> None:
        """Account for ``rows`` about to run; InputError when over either bound."""
        if rows > self.rows_left:
            raise InputError(
                "too_much_work",
                f"这个请求需要超过 {self.rows_limit} 次模型运算：请减少空格数、top_k，或不用 \"auto\"。"
                f" / This request needs more than {self.rows_limit} model rows: use fewer blanks, a smaller "
                "top_k, or a fixed blank_length instead of \"auto\".")
        if time.monotonic() > self.deadline:
            raise InputError(
                "deadline_exceeded",
                f"这个请求超过了 {self.seconds:g} 秒的时限：请简化后重试。"
                f" / This request ran past its {self.seconds:g} s deadline: simplify it and retry.")
        self.rows_left -= rows


SPIN_MODES = ("off", "query", "always")
BATCH_BY_LENGTH_HIDDEN = 512  # models this wide are compute-bound: see EngineConfig.batch_by_length


def spin_mode(value: str | bool) -> str:
    """The spinning mode of a config value: one of :data:`SPIN_MODES` (``True`` is
    "always", ``False`` "off", as the flag used to be)."""
    if value is True or value is False:
        return "always" if value else "off"
    if value not in SPIN_MODES:
        raise ValueError(f"spin must be one of {', '.join(SPIN_MODES)}, got {value!r}")
    return value


@dataclass
class EngineConfig:
    """Runtime settings (all have defaults suited to a 4-core board)."""

    threads: int | None = None  # None/0: one per core in the affinity mask
    # ONNX Runtime's worker threads: "query" busy-wait for the next op only while a query
    # runs and sleep after it; "always" keep spinning a while after it too (True); "off"
    # sleep between ops as well (False). See Engine._make_session.
    spin: str | bool = "query"
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
    fusion: bool = True  # use the bundle's word LM and phrase memory when it has them
    buckets: Sequence[int] = field(default=DEFAULT_BUCKETS)
    # Bounds on one request's work: model rows (sequences run) and wall time. Without
    # them 8 "auto" blanks with top_k 20 ran 1,950 rows (5.7 s on the default model, ~15x
    # that on bert-base) while everyone else waited. Checked before each model run.
    max_request_rows: int = 400
    request_timeout_s: float = 5.0
    # ONNX Runtime sessions, each with threads // sessions intra-op threads on its own
    # cores and its own worker taking batches from the shared queue: 2 x 1 thread runs
    # two requests at once where 1 x 2 splits each one (README, "Limits under load").
    sessions: int = 1
    # Batch only requests that pad to the same length bucket. None: by the model's
    # shape, on for hidden size >= BATCH_BY_LENGTH_HIDDEN. Measured open loop on this
    # project's 2-core VM (README, "Limits under load"): the bert-base shape answered
    # 40-47 req/s batching mixed lengths against 52 not batching at all (a batch costs its
    # longest row times its rows); the 10x128 default, whose runs cost little, 108 against
    # 88 with mixed batching.
    batch_by_length: bool | None = None


@dataclass
class _Query:
    """A parsed query: token ids of the text between blanks, and the blanks."""

    text: str
    seg_ids: list[list[int]]
    starts: list[int]
    lengths: list[tuple[int, ...]]  # candidate lengths per blank (several when auto)
    seg_text: list[str] = field(default_factory=list)  # the text between blanks


def _log_softmax(logits: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """Log-probabilities over the valid tokens only (invalid ones get -inf)."""
    x = np.where(invalid, -np.inf, logits.astype(np.float64))
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


_TOP_BLOCK = 64  # values per block in _top_indices


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, largest first (ties by index, as a stable
    sort). A full argsort of bert-base's 8,000 logits took 0.3 ms of a 10 ms query, and
    NumPy's argpartition 0.07-0.1 ms; this takes ~0.01 ms: the k-th largest of the
    maxima of 64-value blocks is a lower bound on the k-th largest value (k blocks hold
    a value at least that large), so only the values at or above it are sorted."""
    n = len(values)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if k >= n:
        picked = np.arange(n)
    else:
        blocks = -(-n // _TOP_BLOCK)
        padded = np.full(blocks * _TOP_BLOCK, -np.inf)
        padded[:n] = values
        maxima = padded.reshape(blocks, _TOP_BLOCK).max(axis=1)
        bound = np.partition(maxima, blocks - k)[blocks - k] if k <= blocks else -np.inf
        picked = np.flatnonzero(values >= bound)
    return picked[np.lexsort((picked, -values[picked]))][:k]


def _best_combinations(position_logp: np.ndarray, width: int) -> list[tuple[int, ...]]:
    """The ``width`` best token sequences by the sum of per-position log-probabilities
    (a beam over the positions of one all-masked pass: no further model runs)."""
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    for row in position_logp:
        k = min(width, int(np.isfinite(row).sum()))
        top = _top_indices(row, k)
        pool = [(prefix + (int(t),), score + float(row[t])) for prefix, score in beams for t in top]
        pool.sort(key=lambda item: (-item[1], item[0]))
        beams = pool[:width]
    return [tokens for tokens, _ in beams]


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
        # Single-character tokens the model can produce: how fillers from the word LM
        # and the phrase memory are written in the model's vocabulary.
        self.char_token = {tok: i for i, tok in enumerate(self.id_to_token) if len(tok) == 1 and not self.invalid[i]}
        self.fusion = self._load_fusion()

        self.cores = usable_cores()
        self.threads = thread_count(cfg.threads)
        if not isinstance(cfg.sessions, int) or isinstance(cfg.sessions, bool) or cfg.sessions < 1:
            raise ValueError(f"sessions must be a positive integer, got {cfg.sessions!r}")
        self.spin = spin_mode(cfg.spin)  # a bad mode is refused before any session is made
        if cfg.sessions > self.threads:
            raise ValueError(f"{cfg.sessions} sessions need at least as many threads, got {self.threads}")
        limit_malloc_retention()  # before ONNX Runtime parses the model (see edge/memory.py)
        # Session k: threads_per_session threads on its own slice of the cores.
        self.threads_per_session = self.threads // cfg.sessions
        self.session_cores = [self.cores[k * self.threads_per_session:(k + 1) * self.threads_per_session]
                              or self.cores for k in range(cfg.sessions)]
        self.sessions = [self._make_session(cores) for cores in self.session_cores]
        self.cache = LRUCache(cfg.cache_size)
        self._in_flight = 0  # public calls at work now (the batcher waits for company only if > 1)
        arch = self.manifest.architecture
        self.batch_by_length = cfg.batch_by_length if cfg.batch_by_length is not None \
            else arch.hidden_size >= BATCH_BY_LENGTH_HIDDEN
        self.batcher = MicroBatcher(
            [self._session_runner(k) for k in range(cfg.sessions)],
            pad_id=self.pad_id,
            window_ms=cfg.batch_window_ms,
            max_rows=cfg.max_batch,
            buckets=[b for b in cfg.buckets if b <= self.window] + [self.window],
            on_thread_start=self._pin_worker,
            busy=lambda: self._in_flight > cfg.sessions,
            by_length=self.batch_by_length,
            pad_to_bucket=self._pad_to_bucket(),
        )
        self._closed = False
        self._lock = threading.Lock()
        self._local = threading.local()  # the request budget of the calling thread
        if self.manifest.random_init:
            log.warning("%s: %s", bundle.path, RANDOM_INIT_WARNING)
        log.info(
            "engine ready: %s (%s), vocab %d, window %d, %d session(s) x %d threads on cores %s, spinning %s",
            self.manifest.name, bundle.path, size, self.window, cfg.sessions, self.threads_per_session,
            self.session_cores, self.spin,
        )

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, **settings) -> "Engine":
        """Load and verify the bundle at ``path`` (None: the embedded default) and start."""
        return cls(load_bundle(path), EngineConfig(**settings))

    def _load_fusion(self) -> Fusion | None:
        """The bundle's word LM and phrase memory (None when it has neither)."""
        m = self.manifest
        lm = memory = idioms = None
        try:
            if m.lm is not None:
                lm = NgramLM(self.bundle.path / LM_FILE)
            if m.memory is not None:
                memory = PhraseMemory(self.bundle.path / MEMORY_FILE)
            if m.idioms is not None:
                idioms = IdiomContext(self.bundle.path / IDIOMS_FILE)
        except (NgramLMError, PhraseMemoryError, IdiomContextError) as exc:
            raise BundleError(str(exc)) from exc
        if lm is None and memory is None:
            return None
        fusion = Fusion(lm, memory, m.fusion, idioms)
        fusion.prepare_word_tables(self.char_token)
        log.info(
            "fusion: word LM %s, phrase memory %s, idiom contexts %s, weights %s",
            f"{len(lm.words)} words, order {lm.order}" if lm else "none",
            f"{memory.characters} characters" if memory else "none",
            f"{len(idioms)} idioms" if idioms else "none",
            "fitted" if fusion.settings.get("fitted") else "NOT fitted (defaults)",
        )
        return fusion

    # -- session ---------------------------------------------------------------
    def _make_session(self, cores: list[int]) -> ort.InferenceSession:
        threads = self.threads_per_session
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # One graph branch at a time: BERT is a chain, parallel branches only add threads.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The arena keeps every buffer it ever grew to; without it a bert-base-sized
        # INT8 bundle measured 185 MB resident instead of 228 MB, at the same latency.
        options.enable_cpu_mem_arena = self.config.memory_arena
        # Spinning keeps a worker thread busy-waiting for the next op instead of sleeping
        # on a futex and being woken for each of a pass's ~300 ops. "query" spins only
        # inside a run and stops at its end (session.force_spinning_stop), so nothing
        # burns CPU between queries: measured on a 2-core VM, bert-base static INT8 at 24
        # tokens took 13.8 ms back to back and 16.7 ms with 50 ms pauses, against 17.9 and
        # 21.9 ms not spinning, and 0 ms of CPU in the second after a query, against 44 ms
        # with spinning left on after the run ("always").
        allow = "0" if self.spin == "off" else "1"
        options.add_session_config_entry("session.intra_op.allow_spinning", allow)
        options.add_session_config_entry("session.inter_op.allow_spinning", allow)
        if self.spin == "query":
            options.add_session_config_entry("session.force_spinning_stop", "1")
        affinities = ort_thread_affinities(threads, cores)
        if affinities:
            options.add_session_config_entry("session.intra_op_thread_affinities", affinities)
        try:
            return ort.InferenceSession(
                str(self.bundle.model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{self.bundle.model_path}: ONNX Runtime cannot load it: {exc}") from exc

    def _pin_worker(self, index: int) -> None:
        """Pin worker ``index`` (its session's first intra-op thread) to the first core
        of its session's cores: always with several sessions (each owns its cores),
        with one only where ONNX Runtime pins the other threads."""
        cores = self.session_cores[index]
        several = len(self.sessions) > 1 and len(self.cores) >= len(self.sessions) * self.threads_per_session
        if (several or ort_thread_affinities(self.threads_per_session, cores)) and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cores[0]})

    def _session_runner(self, index: int):
        """The batcher's ``run_batch`` for session ``index``."""
        def run(input_ids, attention_mask, mask_positions) -> np.ndarray:
            return self._run_session(input_ids, attention_mask, mask_positions, index)
        return run

    def _run_session(self, input_ids, attention_mask, mask_positions, index: int = 0) -> np.ndarray:
        return self.sessions[index].run(
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
        seg_ids = self._encode_segments(segments)
        return _Query(text=text, seg_ids=seg_ids, starts=[b.start for b in blanks], lengths=lengths,
                      seg_text=segments)

    def _encode_segments(self, segments: list[str]) -> list[list[int]]:
        """Token ids of each text segment (no special tokens). One ``encode`` per segment,
        not ``encode_batch``: a query has a few short segments, and the batch call hands
        them to the tokenizer's own thread pool, which costs more than it saves and
        wakes threads beside ONNX Runtime's pinned ones (36 against 17 µs here)."""
        return [self.tokenizer.encode(segment, add_special_tokens=False).ids for segment in segments]

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
        start = window_start(lo, span, len(content), avail)
        ids = [self.cls_id] + content[start : start + avail] + [self.sep_id]
        positions = [[p - start for p in blank] for blank in positions]
        return ids, positions, True

    # -- search: the model alone -----------------------------------------------
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
            outputs = self._run_rows(rows)
            pool = []
            for (prefix, score), logits in zip(beams, outputs):
                logp = _log_softmax(logits[0], self.invalid)
                width = min(beam_width, int((~self.invalid).sum()))
                best = _top_indices(logp, width)
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
            logits = self._run_rows([Row(ids, [p[0] for p in positions])])[0]
            first = []
            for i in range(n):
                logp = _log_softmax(logits[i], self.invalid)
                best = _top_indices(logp, top_k)
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

    # -- search: fused with the word LM and the phrase memory --------------------
    def _context_text(self, query: _Query, fills, index: int) -> tuple[str, str]:
        """The text left and right of blank ``index``; a blank not yet decided (still
        masks) ends the context there, a decided one reads as its filler."""
        def piece(i):
            fill = fills[i]
            return None if all(t == self.mask_id for t in fill) else self._detokenize(fill)

        left = query.seg_text[index]
        for i in range(index - 1, -1, -1):
            filled = piece(i)
            if filled is None:
                break
            left = query.seg_text[i] + filled + left
        right = query.seg_text[index + 1]
        for i in range(index + 1, len(query.lengths)):
            filled = piece(i)
            if filled is None:
                break
            right = right + filled + query.seg_text[i + 1]
        return left, right

    def _tokens_of(self, text: str) -> tuple[int, ...] | None:
        """The model's tokens for a filler, one per character (None if it lacks one)."""
        tokens = tuple(self.char_token.get(ch, -1) for ch in text)
        return None if -1 in tokens else tokens

    def _fused_candidates(self, query: _Query, fills, index: int) -> list[Candidate]:
        """All candidates of blank ``index`` from the model, the word LM and the memory,
        scored and normalised (best first).

        The model's feature is the sum of its per-position log-probabilities with the
        blank all masked (one pass for every candidate of a length; for one character
        that is exactly its probability): measured on development blanks of 2-4
        characters and ChID as good as the chain rule (word cloze top-1 8.3 vs 8.7%,
        ChID 30.2 vs 28.2%, 2-fold cross-validated), for one pass instead of one per
        prefix. The best combinations of those distributions propose the model's own words.
        """
        fusion = self.fusion
        left_text, right_text = self._context_text(query, fills, index)
        left, right = fusion.contexts(left_text, right_text)
        lengths = query.lengths[index]
        auto = len(lengths) > 1
        # One model run for every length (the blank all masked), queued first: what
        # needs no model output is done while ONNX Runtime works.
        rows = []
        for n in lengths:
            trial = list(fills)
            trial[index] = (self.mask_id,) * n
            ids, positions, _ = self._build(query, trial)
            rows.append(Row(ids, positions[index]))
        pending = self._submit(rows)
        scorer = fusion.scorer(left, right)
        neighbours = {n: fusion.words_with_neighbours(left, right, n) for n in lengths}
        hits = {n: fusion.memory_hits(left_text, n, right_text) for n in lengths}
        z = fusion.register(left_text, right_text, [hit for found in hits.values() for hit in found])
        echoes = {n: fusion.echoes(left_text, n, right_text) for n in lengths}
        outputs = pending.result(timeout=60.0)
        pool: list[Candidate] = []
        for n, logits in zip(lengths, outputs):
            pool.extend(self._candidates_of_length(n, _log_softmax(logits, self.invalid), neighbours[n],
                                                   hits[n], echoes[n], scorer))
        texts = [c.text for c in pool]
        for c, score in zip(pool, fusion.lm_scores(left, right, texts, scorer)):
            c.lm = score
        fusion.add_text_cues(pool, left_text, right_text, echoes)
        return fusion.rank(pool, fusion.kind(lengths[0], auto), z=z)

    def _independent_logp(self, position_logp: np.ndarray, text: str) -> float | None:
        """The model's sum of per-position log-probabilities of ``text`` in an all-masked
        blank of its length; None when the model cannot write it whole."""
        value, missing = self._writable_logp(position_logp, text)
        return value if missing == 0 else None

    def _writable_logp(self, position_logp: np.ndarray, text: str) -> tuple[float | None, int]:
        """The model's sum of per-position log-probabilities over the characters of
        ``text`` it can write (None when it can write none), and how many it cannot.
        A filler with one character the model lacks (为君飡不: 飡) is scored on the other
        three, and the fit weighs each missing character; scoring it 0 instead (as the
        model's ln p of a whole filler it cannot write) let such fillers win 4-character
        blanks, where the model's ln p of an ordinary filler is around -16."""
        if len(text) != position_logp.shape[0]:
            return None, len(text)
        total, missing = 0.0, 0
        for k, ch in enumerate(text):
            t = self.char_token.get(ch)  # never an invalid token: their ln p is -inf
            if t is None:
                missing += 1
            else:
                total += float(position_logp[k, t])
        return (None if missing == len(text) else total), missing

    def _model_proposals(self, position_logp: np.ndarray) -> list[str]:
        """The model's own candidates: its top characters, or for a longer blank the best
        combinations of its per-position distributions."""
        limits = self.fusion.limits
        if position_logp.shape[0] > 1:
            return [self._detokenize(tokens) for tokens in _best_combinations(position_logp, int(limits["word_model"]))]
        logp = position_logp[0]
        top = int(limits["model"])
        return [self.id_to_token[int(t)] for t in _top_indices(logp, top) if np.isfinite(logp[t])]

    def _lm_proposals(self, position_logp: np.ndarray, neighbours: dict[str, float], scorer) -> list[str]:
        """Fillers from the LM's vocabulary: words with the neighbours, and for a longer
        blank the LM's words of that length that the model's per-position view ranks
        highest and those the LM has after the previous word; the short list keeps the
        best by the model's view plus the LM's prior (ln)."""
        fusion, n = self.fusion, position_logp.shape[0]
        proposals = neighbours
        if n > 1 and fusion.lm is not None:
            guesses = fusion.words_fitting_model(n, position_logp, int(fusion.limits["word_lm"]))
            if scorer is not None:
                for _, _, h1 in scorer.left_states(1):
                    guesses += fusion.words_following(h1, n, position_logp, int(fusion.limits["word_lm"]))
            for word in guesses:
                proposals.setdefault(word, fusion.lm.logp(-1, -1, fusion.lm.word_id(word)))
        # (None from the model: it cannot write the filler, which may still be right.)
        texts = list(proposals)
        values = [self._independent_logp(position_logp, t) for t in texts]
        keys = np.array([MODEL_FLOOR if v is None else v for v in values]) + LN10 * np.array(
            [proposals[t] for t in texts])
        keep = int(fusion.limits["lm"] if n == 1 else fusion.limits["word_lm"])
        return [texts[k] for k in sorted(range(len(texts)), key=lambda k: (-keys[k], texts[k]))[:keep]]

    def _candidates_of_length(self, n: int, position_logp: np.ndarray, neighbours: dict[str, float],
                              hits, echoes: dict[str, int], scorer) -> list[Candidate]:
        """The candidates of one blank length, each with its sources, the model's
        log-probability and the memory hit that proposed it (the LM score and the text
        cues come later)."""
        found: dict[str, Candidate] = {}

        def add(text: str, source: str) -> Candidate:
            cand = found.get(text)
            if cand is None:
                cand = found[text] = Candidate(text=text)
            cand.sources.add(source)
            return cand

        for text in self._model_proposals(position_logp):
            add(text, "model")
        for text in self._lm_proposals(position_logp, neighbours, scorer):
            add(text, "lm")
        for hit in hits:
            add(hit.filler, "memory").memory = hit
        for text in echoes:
            add(text, "context")
        for c in found.values():
            c.model, c.unwritten = self._writable_logp(position_logp, c.text)
        return list(found.values())

    def _solve_fused(self, query: _Query) -> list[list[Candidate]]:
        """Fused answers for every blank, easy-first as in :meth:`_solve`."""
        n = len(query.lengths)
        masked = [(self.mask_id,) * lengths[0] for lengths in query.lengths]
        first = [self._fused_candidates(query, masked, i) for i in range(n)]
        if n == 1:
            return first
        order = sorted(range(n), key=lambda i: -(first[i][0].probability if first[i] else 0.0))
        fills = list(masked)
        final: list = [None] * n
        for rank, i in enumerate(order):
            final[i] = first[i] if rank == 0 else self._fused_candidates(query, fills, i)
            best = final[i][0].text if final[i] else ""
            tokens = self._tokens_of(best) if best else None
            if tokens is not None:
                fills[i] = tokens
        return final

    # -- public API ------------------------------------------------------------
    def _pad_to_bucket(self) -> bool:
        """Whether batches are padded up to a length bucket rather than to their longest
        row. Dynamic INT8 scales activations over the whole batch, padding included, so
        its rows already move with their mates: running a lone query at its own length
        loses nothing there and saves the padding (bert-base, 17 tokens run as 24: 8%).
        FP32, static INT8 and int4 keep the bucket, so that a row's padded length, and
        with batching by length its logits, stay exactly the same whoever shares its
        batch; with ONNX Runtime's memory arena on, buckets also stop it growing a block
        per shape."""
        quantization = self.manifest.quantization
        dynamic = quantization is not None and not quantization.get("batch_independent")
        return self.config.memory_arena or not dynamic

    def predict(self, text: str, top_k: int = 5, blank_length: int | str | None = None,
                fusion: bool = True) -> dict:
        """Answer one query; returns the HTTP API's JSON shape (see design.md).

        ``fusion=False`` answers from the model alone even when the bundle has a word
        LM or a phrase memory (for comparison).
        """
        with self._request_budget():
            return self._predict(text, top_k, blank_length, fusion)

    @contextlib.contextmanager
    def _request_budget(self):
        """The row and time budget of one public call (nested calls share the outer one)."""
        if getattr(self._local, "budget", None) is not None:
            yield
            return
        self._local.budget = _Budget(self.config.max_request_rows, self.config.request_timeout_s)
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            self._local.budget = None
            with self._lock:
                self._in_flight -= 1

    def _submit(self, rows: list[Row]):
        """Queue rows for the model within the request's budget (a future of their logits)."""
        budget = getattr(self._local, "budget", None)
        if budget is not None:
            budget.spend(len(rows))
        return self.batcher.submit_async(rows)

    def _run_rows(self, rows: list[Row]) -> list[np.ndarray]:
        """Run rows through the model within the request's budget."""
        return self._submit(rows).result(timeout=60.0)

    def _predict(self, text: str, top_k: int, blank_length: int | str | None, fusion: bool) -> dict:
        began = time.perf_counter()
        fused = bool(fusion) and self.fusion is not None and self.config.fusion
        # Only answered (valid) queries are cached, so a hit needs no parsing.
        key = (text, top_k, blank_length, fused)
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
        blanks = []
        if fused:
            for i, candidates in enumerate(self._solve_fused(query)):
                blanks.append(self._blank_json(query.starts[i], [self._fused_item(c) for c in candidates[:top_k]]))
        else:
            auto = [len(lengths) > 1 for lengths in query.lengths]
            for i, candidates in enumerate(self._solve(query, top_k)):
                items = [
                    {"text": self._detokenize(tokens),
                     "score": _round_sig(math.exp(rank_score if auto[i] else logp)),
                     "sources": ["model"]}
                    for tokens, logp, rank_score in candidates
                ]
                blanks.append(self._blank_json(query.starts[i], items))
        result = {
            "blanks": blanks,
            "truncated": truncated,
            "cached": False,
            "elapsed_ms": 0.0,
            "fusion": fused,
            "model": {"name": self.manifest.name, "random_init": self.manifest.random_init},
        }
        if self.config.cache_size > 0:
            self.cache.put(key, copy.deepcopy(result))
        result["elapsed_ms"] = round((time.perf_counter() - began) * 1000, 2)
        return result

    def _blank_json(self, start: int, items: list[dict]) -> dict:
        blank = {
            "start": start,
            "length": len(items[0]["text"]) if items else 0,
            "candidates": items,
            "low_confidence": not items or items[0]["score"] < self.config.low_confidence,
        }
        if blank["low_confidence"]:
            blank["hint"] = LOW_CONFIDENCE_HINT
        return blank

    @staticmethod
    def _fused_item(candidate: Candidate) -> dict:
        item = {
            "text": candidate.text,
            "score": _round_sig(candidate.probability),
            "sources": [s for s in SOURCE_ORDER if s in candidate.sources],
        }
        hit = candidate.memory
        if hit is not None and hit.context >= MIN_QUOTE_CONTEXT and hit.source:
            item["quote"] = dict(hit.source)
        return item

    def score_fillers(self, text: str, fillers: list[str], fusion: bool = True) -> list[float]:
        """A score for each filler in the text's single blank.

        Model alone (``fusion=False`` or no LM/memory in the bundle): the joint
        log-probability, chain rule left to right. Fused: the log of the fused
        probability among the given fillers (the same features and weights as
        ``predict``, normalised over the fillers).
        """
        with self._request_budget():
            if not fillers or not (fusion and self.fusion is not None and self.config.fusion):
                return self._model_filler_scores(text, fillers)[1]
            return [math.log(max(c.probability, 1e-300)) for c in self.given_candidates(text, fillers)]

    def given_candidates(self, text: str, fillers: list[str]) -> list[Candidate]:
        """The given fillers of the text's single blank as fused candidates, in the given
        order (model, LM and memory inputs filled in); for fitting the weights."""
        if self.fusion is None:
            raise InputError("no_fusion", "this bundle has no word LM or phrase memory")
        segments, scores = self._independent_filler_scores(text, fillers)
        return self._fused_given(segments, fillers, scores)

    def fused_candidates(self, text: str, blank_length: int | str | None = None) -> list[list[Candidate]]:
        """Every fused candidate of every blank, ranked, with what each source said
        (not just the top k); for fitting the weights and for looking into an answer."""
        if self.fusion is None:
            raise InputError("no_fusion", "this bundle has no word LM or phrase memory")
        return self._solve_fused(self._parse(text, 1, blank_length))

    def _independent_filler_scores(self, text: str, fillers: list[str]) -> tuple[list[str], list[float | None]]:
        """Each filler's sum of per-position ln p with the blank all masked (one pass per
        filler length; None for a filler the model cannot write one token a character)."""
        segments, blanks = find_blanks(text)
        if len(blanks) != 1:
            raise InputError("no_blank" if not blanks else "too_many_blanks", "score_fillers needs exactly one blank")
        seg_ids = self._encode_segments(segments)
        scores: list[float | None] = [None] * len(fillers)
        lengths = sorted({len(f) for f in fillers})
        if any(n < 1 or n > self.config.max_blank_chars for n in lengths):
            raise InputError("bad_filler", f"fillers must have 1 to {self.config.max_blank_chars} characters")
        query = _Query(text=text, seg_ids=seg_ids, starts=[blanks[0].start], lengths=[tuple(lengths)],
                       seg_text=segments)
        rows = []
        for n in lengths:
            ids, positions, _ = self._build(query, [(self.mask_id,) * n])
            rows.append(Row(ids, positions[0]))
        outputs = self._run_rows(rows)
        for n, logits in zip(lengths, outputs):
            logp = _log_softmax(logits, self.invalid)
            for k, filler in enumerate(fillers):
                tokens = self._tokens_of(filler) if len(filler) == n else None
                if tokens is not None:
                    scores[k] = float(sum(logp[i, t] for i, t in enumerate(tokens)))
        return segments, scores

    def _model_filler_scores(self, text: str, fillers: list[str]) -> tuple[list[str], list[float]]:
        segments, blanks = find_blanks(text)
        if len(blanks) != 1:
            raise InputError("no_blank" if not blanks else "too_many_blanks", "score_fillers needs exactly one blank")
        if not fillers:
            return segments, []
        query = _Query(
            text=text,
            seg_ids=self._encode_segments(segments),
            starts=[blanks[0].start],
            lengths=[(1,)],
            seg_text=segments,
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
        outputs = iter(self._run_rows(rows))
        scores = []
        for tokens in targets:
            total = 0.0
            for token in tokens:
                logp = _log_softmax(next(outputs)[0], self.invalid)
                total += float(logp[token]) if np.isfinite(logp[token]) else OOV_LOGP
            scores.append(total)
        return segments, scores

    def _fused_given(self, segments: list[str], fillers: list[str], model_scores: list[float]) -> list[Candidate]:
        """The given fillers of a single blank as fused candidates (in the given order)."""
        fusion = self.fusion
        left, right = fusion.contexts(segments[0], segments[1])
        candidates = [Candidate(text=f, sources={"given"}, model=m) for f, m in zip(fillers, model_scores)]
        for c, lm in zip(candidates, fusion.lm_scores(left, right, fillers)):
            c.lm = lm
        hits: dict[tuple[int, str], object] = {}
        for n in sorted({len(f) for f in fillers}):
            for hit in fusion.memory_hits(segments[0], n, segments[1]):
                hits[(n, hit.filler)] = hit
        for c in candidates:
            c.memory = hits.get((len(c.text), c.text))
        fusion.add_text_cues(candidates, segments[0], segments[1])
        lengths = {len(f) for f in fillers}
        kind = fusion.given_kind(lengths.pop() if len(lengths) == 1 else 2)
        fusion.rank(candidates, kind, null=False, z=fusion.register(segments[0], segments[1], hits.values()))
        return candidates

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
            "sessions": len(self.sessions),
            "cores": self.cores,
            "spin": self.spin,
            "batch_by_length": self.batch_by_length,
            "batch_window_ms": self.config.batch_window_ms,
            "max_batch": self.config.max_batch,
            "cache_size": self.config.cache_size,
            "version": __version__,
        }
        if self.fusion is not None:
            info["fusion"] = {
                "enabled": self.config.fusion,
                "lm": m.lm,
                "memory": m.memory,
                "idioms": m.idioms,
                "fitted": bool(self.fusion.settings.get("fitted")),
                "weights": self.fusion.settings["weights"],
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
