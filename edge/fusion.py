"""Fusing the masked-LM with the bundle's word LM and phrase memory.

For one blank of ``n`` characters the engine collects candidates from four sources:

- ``model``: the masked-LM's best fillers (top-N characters; for a longer blank the
  best combinations of its per-position distributions, blank all masked);
- ``lm``: fillers that make LM words of up to 4 characters with their neighbours
  (地+上 = 地上, 公+园 = 公园; numpy tables of the LM's words by character), and for a
  blank of 2+ characters the LM words of that length that the model's per-position
  distributions rank highest and those the LM has after the previous word;
- ``memory``: fillers seen in the training corpus with the longest matching context;
- ``context``: fillers the query's own text repeats between the blank's neighbours
  (:func:`edge.text_cues.echoes`).

Each candidate gets features (:data:`FEATURES`) — the model's log-probability (or,
for a filler the model cannot write, an indicator of that), the LM's log-probability
of the window with the filler in it (best segmentation, both sides of the blank,
:class:`edge.ngram_lm.FillerScorer`; relative to the blank's best, floored), how much
context the memory matched and whether that is the blank's best match (by length
bucket) and what share of the query's context that is (a famous line typed whole
matches all of it; a random passage's blank rarely does), each of those times the
register ``z`` of the context, the two cues of :mod:`edge.text_cues` (how much of
the neighbourhood matched where the text repeats the filler; how many of its rare
characters the text already has), whether the memory matched the most context on both
sides and whether it matched all of the query, for an idiom how typical the text
near the blank is of it in the training corpus (:mod:`edge.idiom_context`), and for
``blank_length: "auto"`` the length —
and a score ``w · f``. ``score`` in the answer is the softmax of those scores over the
candidates and one "none of these" outcome with a fitted score, so that it stays a
probability when the right answer was not among the candidates (and
``low_confidence`` keeps its meaning). The weights are fitted by
``python -m tools fusion fit`` (maximum likelihood on development data) and stored in
the manifest; :data:`DEFAULT_SETTINGS` is only the starting point for bundles that
carry an LM or a memory but no fitted weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from edge.idiom_context import IdiomContext
from edge.ngram_lm import FillerScorer, NgramLM, han_context
from edge.phrase_memory import MemoryHit, PhraseMemory
from edge.text_cues import MAX_RARITY, cohesion, echoes

LN10 = math.log(10.0)
FEATURES = ("model", "lm", "mem_context", "mem_best", "mem_best5", "mem_best7", "mem_best11", "mem_cover",
            "model_z", "lm_z", "mem_z", "model_oov", "len2", "len3", "len4",
            "mem_two2", "mem_two3", "mem_whole", "echo", "cohesion", "assoc")
# The filler holding a blank's longest memory match gets one of these indicators by the
# length of that match: how far to trust it is far from linear in the length (held-apart
# development blanks: the memory's best filler was right 17% of the time with 3-4
# characters of context matched, 61% with 5-6, ~80% with 7-10 and every time with 13+).
MEM_BEST_BUCKETS = ((3, "mem_best"), (5, "mem_best5"), (7, "mem_best7"), (11, "mem_best11"))
# The filler whose memory hit matched the most context on *both* sides (the smaller of
# its left and right matches, when that is the blank's best) gets one of these: a match
# on both sides is far stronger evidence than as many characters on one side
# (development blanks: the memory's filler was right 70% of the time with 2 characters
# matched on each side, 90% with 3 or more).
MEM_TWO_BUCKETS = ((2, "mem_two2"), (3, "mem_two3"))
# A hit that matched all of the query's context, at least this many characters: the
# text is a line of the corpus, typed whole (a famous line).
MEM_WHOLE_CONTEXT = 6
ECHO_CAP = 8  # characters of matched neighbours beyond which an echo counts no more
NULL_FEATURES = ("null", "null_z")
MEM_CONTEXT_CAP = 16  # characters of matched context beyond which a memory hit counts no more
# The LM feature is ln p(window) relative to the blank's best candidate, floored here:
# a filler the LM finds 12 nats (e^-12) worse than the best is "very unlikely" however
# much worse; without the floor a few such answers (names, rare characters) dominate
# the likelihood fit and it learns to ignore the LM (measured: weight 0.03, cloze top-1
# 40.7% on 600 held-apart items, against 0.33 and 46.7% with it).
LM_FLOOR = -12.0
MODEL_FLOOR = -25.0  # the lowest ln p the model feature takes
# A filler the model cannot write (a character outside its trimmed vocabulary: 逑 of
# 君子好逑, many rare classical characters) gets model = 0 and model_oov = 1, whose weight
# is fitted: a fixed floor instead (ln p = -25 times the model's weight) ruled out such
# fillers even where the memory had them with the whole line matched. A longer filler
# gets the model's ln p of the characters it can write and model_oov = the number it
# cannot. A bundle fitted before this feature gets the old penalty as its default weight.
OOV_DEFAULT_WEIGHT = -15.0
# The register of a blank's context, z in [-1, 1]: how well the word LM knows it, from
# its log10 probability per character (measured on the held-apart passages: modern
# FewCLUE text -2.2 median, chinese-poetry -3.7; 5-95% ranges -2.9..-1.8 and
# -4.4..-3.0). z = +1 reads as modern, -1 as classical; the *_z features let the fit
# trust the modern-Chinese LM less on classical text (where it measured worse than
# no LM at all) and the memory more.
REGISTER_MIDPOINT, REGISTER_SCALE, REGISTER_CHARS = -2.95, 0.75, 16
# Hand-set starting weights (ln-probability units); `tools fusion fit` replaces them.
DEFAULT_SETTINGS: dict = {
    "weights": {
        "char": {"model": 1.0, "lm": 0.4, "mem_context": 1.0, "lm_z": 0.3, "model_oov": OOV_DEFAULT_WEIGHT,
                 "null": -3.0},
        "word": {"model": 0.5, "lm": 0.4, "mem_context": 1.0, "lm_z": 0.3, "model_oov": OOV_DEFAULT_WEIGHT,
                 "null": -3.0},
        "auto": {"model": 0.5, "lm": 0.4, "mem_context": 1.0, "lm_z": 0.3, "model_oov": OOV_DEFAULT_WEIGHT,
                 "null": -3.0},
    },
    "candidates": {"model": 30, "lm": 16, "memory": 8, "word_model": 5, "word_lm": 40, "echo": 8},
    "context_chars": 8,
    "fitted": False,
}


@dataclass
class Candidate:
    """One filler of one blank, with what each source says about it."""

    text: str
    sources: set = field(default_factory=set)
    model: float | None = None  # the masked-LM's ln p: the sum over positions, blank all masked
    unwritten: int = 0  # characters of a fused candidate the model cannot write (left out of ``model``)
    lm: float | None = None  # ln p of the window with this filler under the word LM
    memory: MemoryHit | None = None
    score: float = 0.0  # w · f
    probability: float = 0.0
    z: float = 0.0  # the register of the blank's context (see Fusion.register)
    echo: int = 0  # neighbour characters matched where the filler occurs elsewhere in the text
    cohesion: float = 0.0  # how much its characters echo the text (edge.text_cues.cohesion)
    assoc: float = 0.0  # how typical the text near the blank is of this idiom (edge.idiom_context)

    @property
    def length(self) -> int:
        """Characters of the filler."""
        return len(self.text)


def settings_of(manifest_fusion: dict | None) -> dict:
    """The fusion settings of a bundle: its manifest's, completed by the defaults."""
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_SETTINGS.items()}
    settings["weights"] = {k: dict(v) for k, v in DEFAULT_SETTINGS["weights"].items()}
    if manifest_fusion:
        for kind, weights in (manifest_fusion.get("weights") or {}).items():
            settings["weights"].setdefault(kind, {}).update(weights)
        settings["candidates"].update(manifest_fusion.get("candidates") or {})
        for key in ("context_chars", "fitted"):
            if key in manifest_fusion:
                settings[key] = manifest_fusion[key]
    return settings


def is_whole_line(hit: MemoryHit | None) -> bool:
    """Whether a memory hit matched all of the query's context, at least
    :data:`MEM_WHOLE_CONTEXT` characters: the text is a line of the corpus."""
    return hit is not None and hit.cover >= 0.999 and hit.context >= MEM_WHOLE_CONTEXT


class Fusion:
    """The word LM, the phrase memory and the idiom contexts of a bundle, and how to
    weigh them."""

    def __init__(self, lm: NgramLM | None, memory: PhraseMemory | None, settings: dict | None = None,
                 idioms: IdiomContext | None = None):
        self.lm = lm
        self.memory = memory
        self.idioms = idioms
        self.settings = settings_of(settings)
        self.context_chars = int(self.settings["context_chars"])
        self.limits = self.settings["candidates"]
        self._weights = {kind: self._weight_vector(kind) for kind in self.settings["weights"]}
        self._words_by_length: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._patterns: dict | None = None
        self._rarity: dict[str, float] = {}

    def _weight_vector(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        weights = self.settings["weights"][kind]
        return (np.array([float(weights.get(f, 0.0)) for f in FEATURES]),
                np.array([float(weights.get(f, 0.0)) for f in NULL_FEATURES]))

    @staticmethod
    def kind(n: int, auto: bool) -> str:
        """Which weight set a blank uses."""
        return "auto" if auto else ("char" if n == 1 else "word")

    def given_kind(self, n: int) -> str:
        """Which weight set scores a given list of fillers (``score_fillers``, ChID): its
        own, fitted on ChID, where the bundle has one; else that of an open blank of ``n``
        characters. Choosing among given idioms is another task than proposing
        fillers: no "none of these", and the LM's word prior counts for more."""
        return "given" if "given" in self._weights else self.kind(n, auto=False)

    # -- candidates from the LM vocabulary -----------------------------------
    def prepare_word_tables(self, char_to_token: dict[str, int], lengths: Iterable[int] = (2, 3, 4)) -> None:
        """Index the LM words of each length by the model's token ids (for ranking
        them with the model's per-position distributions); words with a character
        the model lacks are left out. Built with numpy from the pattern tables, so
        that start-up leaves no millions of small Python objects behind."""
        if self.lm is None:
            return
        tables = self._pattern_tables()
        known = np.array(sorted(ord(ch) for ch in char_to_token if len(ch) == 1), dtype=np.int32)
        token_of = np.array([char_to_token[chr(c)] for c in known], dtype=np.int32)
        for n in lengths:
            if n not in tables:
                continue
            chars, _, _, _, ids = tables[n]
            at = np.minimum(np.searchsorted(known, chars), len(known) - 1)
            ok = (known[at] == chars).all(axis=1)
            if ok.any():
                self._words_by_length[n] = (ids[ok], token_of[at[ok]].astype(np.int64))

    def words_fitting_model(self, n: int, position_logp: np.ndarray, limit: int) -> list[str]:
        """The ``limit`` LM words of ``n`` characters with the highest sum of the
        model's per-position log-probabilities (``position_logp``: [n, vocab])."""
        table = self._words_by_length.get(n)
        if table is None or limit <= 0:
            return []
        ids, tokens = table
        scores = np.take(position_logp[0], tokens[:, 0])
        for k in range(1, n):
            scores = scores + np.take(position_logp[k], tokens[:, k])
        limit = min(limit, len(ids))
        best = np.argpartition(-scores, limit - 1)[:limit]
        best = best[np.lexsort((ids[best], -scores[best]))]
        return [self.lm.words[int(ids[k])] for k in best if np.isfinite(scores[k])]

    def words_following(self, h1: int, n: int, position_logp: np.ndarray, limit: int) -> list[str]:
        """LM words of ``n`` characters that the LM has after the word ``h1`` (a bigram),
        best ``limit`` by their bigram ln p plus the model's per-position ln p."""
        table = self._words_by_length.get(n)
        if self.lm is None or table is None or h1 < 0 or limit <= 0:
            return []
        ids, tokens = table
        follow, logp10 = self.lm.successors(h1)
        rows = np.searchsorted(ids, follow)
        ok = (rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == follow)
        if not ok.any():
            return []
        rows, logp10 = rows[ok], logp10[ok]
        picked = tokens[rows]
        scores = LN10 * logp10
        for k in range(n):
            scores = scores + np.take(position_logp[k], picked[:, k])
        best = np.argsort(-scores, kind="stable")[:limit]
        return [self.lm.words[int(ids[rows[k]])] for k in best]

    def _pattern_tables(self) -> dict[int, tuple]:
        """Per word length k (2..4): the words' code points [W, k], their unigram log10
        probabilities, for each column j the rows sorted by that column with the sorted
        column itself (for "words with this character at j" by binary search), and the
        words' ids."""
        if self._patterns is None:
            lm = self.lm
            codes, book = lm._up
            book = np.asarray(book)
            all_codes = np.frombuffer(codes, dtype=np.uint8)
            units, starts, ends = lm.words.arrays()
            lengths = ends - starts
            tables = {}
            for k in (2, 3, 4):  # numpy over the whole vocabulary: no Python string per word
                ids = np.flatnonzero(lengths == k)
                chars = units[starts[ids][:, None] + np.arange(k)].astype(np.int32)
                han = (((chars >= 0x3400) & (chars <= 0x4DBF)) | ((chars >= 0x4E00) & (chars <= 0x9FFF))
                       | ((chars >= 0xF900) & (chars <= 0xFAFF)) | ((chars >= 0x20000) & (chars <= 0x2EBEF)))
                keep = han.all(axis=1)
                ids, chars = ids.astype(np.int64)[keep], np.ascontiguousarray(chars[keep])
                prior = book[all_codes[ids]]
                orders = [np.argsort(chars[:, j], kind="stable").astype(np.int32) for j in range(k)]
                tables[k] = (chars, prior, orders, [chars[o, j] for j, o in enumerate(orders)], ids)
            self._patterns = tables
        return self._patterns

    def words_with_neighbours(self, left: str, right: str, n: int, max_side: int = 3) -> dict[str, float]:
        """Fillers of ``n`` characters that make an LM word (of up to 4 characters) with
        the characters beside the blank (``left`` / ``right``: the Han context); each
        with the best unigram log10 probability of a word it makes."""
        if self.lm is None:
            return {}
        keys, priors = [], []
        for k, (chars, prior, orders, sorted_cols, _) in self._pattern_tables().items():
            for i in range(0, min(max_side, len(left)) + 1):
                j = k - n - i
                if j < 0 or j > min(max_side, len(right)) or i + j == 0:
                    continue
                # Narrow by one fixed character with a binary search, then compare the rest.
                col, ch = (0, left[-i]) if i else (n, right[0])
                # (int32 needles: int64 ones would make numpy copy the column to int64)
                lo, hi = np.searchsorted(sorted_cols[col], np.array([ord(ch), ord(ch) + 1], dtype=np.int32))
                if lo == hi:
                    continue
                rows = orders[col][lo:hi]
                sub = chars[rows]
                keep = np.ones(len(rows), dtype=bool)
                for c in range(i):
                    keep &= sub[:, c] == ord(left[-i + c])
                for c in range(j):
                    keep &= sub[:, i + n + c] == ord(right[c])
                if keep.any():
                    key = np.zeros(int(keep.sum()), dtype=np.int64)
                    for c in range(n):  # n <= 3 here: 21 bits a code point fit
                        key = (key << 21) | sub[keep, i + c].astype(np.int64)
                    keys.append(key)
                    priors.append(prior[rows[keep]])
        if not keys:
            return {}
        key = np.concatenate(keys)
        prior = np.concatenate(priors)
        order = np.lexsort((-prior, key))  # by filler, best prior first
        key, prior = key[order], prior[order]
        first = np.ones(len(key), dtype=bool)
        first[1:] = key[1:] != key[:-1]
        found: dict[str, float] = {}
        for value, p in zip(key[first].tolist(), prior[first].tolist()):
            chars_out = []
            for _ in range(n):
                chars_out.append(chr(value & 0x1FFFFF))
                value >>= 21
            found["".join(reversed(chars_out))] = p
        return found

    # -- scoring -------------------------------------------------------------
    def contexts(self, left_text: str, right_text: str) -> tuple[str, str]:
        """The Han runs next to the blank that the LM scores with each filler."""
        return han_context(left_text, right_text, self.context_chars)

    def scorer(self, left: str, right: str) -> FillerScorer | None:
        """The word-LM scorer of one blank's window (None without an LM)."""
        return None if self.lm is None else FillerScorer(self.lm, left, right)

    def lm_scores(self, left: str, right: str, fillers: Sequence[str],
                  scorer: FillerScorer | None = None) -> list[float]:
        """ln p of ``left + filler + right`` under the word LM, for each filler."""
        if self.lm is None:
            return [0.0] * len(fillers)
        scorer = scorer or FillerScorer(self.lm, left, right)
        return [LN10 * scorer.score(f) for f in fillers]

    def echoes(self, left_text: str, n: int, right_text: str) -> dict[str, int]:
        """Fillers of ``n`` characters found elsewhere in the query between the blank's
        neighbours (:func:`edge.text_cues.echoes`), the best ``limits["echo"]`` of them."""
        found = echoes(left_text, n, right_text)
        keep = int(self.limits.get("echo", 8))
        return dict(sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))[:keep])

    def rarity(self, ch: str) -> float:
        """``-log10`` of a character's unigram probability under the word LM (the
        rarest value when the LM lacks it or there is no LM)."""
        value = self._rarity.get(ch)
        if value is None:
            w = self.lm.word_id(ch) if self.lm is not None else -1
            value = -self.lm.logp(-1, -1, w) if w >= 0 else MAX_RARITY
            if len(self._rarity) < 65536:  # characters: bounded by the script, not the traffic
                self._rarity[ch] = value
        return value

    def add_text_cues(self, candidates: Sequence[Candidate], left_text: str, right_text: str,
                      echo: dict[int, dict[str, int]] | None = None) -> None:
        """Set each candidate's echo (from ``echo``: length → filler → characters matched,
        computed here when not given), cohesion with the query's text and, for an idiom
        of the bundle's idiom contexts, how typical the text near the blank is of it."""
        echo = dict(echo or {})
        chars = set(left_text) | set(right_text)
        near = None  # the idiom cue's view of the text, made only when a candidate is a word
        for c in candidates:
            if c.length not in echo:
                echo[c.length] = self.echoes(left_text, c.length, right_text)
            c.echo = echo[c.length].get(c.text, 0)
            c.cohesion = cohesion(c.text, chars, self.rarity)
            if self.idioms is not None and c.text in self.idioms:
                near = near or self.idioms.query(left_text, right_text)
                c.assoc = self.idioms.score(c.text, near)

    def memory_hits(self, left_text: str, n: int, right_text: str) -> list[MemoryHit]:
        """The memory's fillers of ``n`` characters for this context."""
        if self.memory is None:
            return []
        return self.memory.lookup(left_text, n, right_text, limit=int(self.limits["memory"]))

    def register(self, left_text: str, right_text: str, hits: Iterable[MemoryHit] = ()) -> float:
        """z in [-1, 1]: +1 when the word LM knows the blank's context well (modern
        Chinese), -1 when it does not (classical); 0 without an LM or context. A text the
        memory (classical poetry and prose) holds verbatim is classical whatever the LM
        says: it knows the famous lines' phrases (不亦乐乎, 杨柳) and read 学而时习之 as
        modern, trusting itself over the whole line in the memory."""
        if any(is_whole_line(hit) for hit in hits):
            return -1.0
        if self.lm is None:
            return 0.0
        total, chars = 0.0, 0
        for part in (left_text[-REGISTER_CHARS:], right_text[:REGISTER_CHARS]):
            score, words = self.lm.best_segmentation(part)
            total += score
            chars += sum(len(w) for w in words)
        if chars == 0:
            return 0.0
        return float(min(1.0, max(-1.0, (total / chars - REGISTER_MIDPOINT) / REGISTER_SCALE)))

    def feature_matrix(self, candidates: Sequence[Candidate], z: float = 0.0) -> np.ndarray:
        """[candidates, features] in the order of :data:`FEATURES`; ``z``: the register."""
        best = max((c.memory.context for c in candidates if c.memory is not None), default=0)
        best_two = max((min(c.memory.left, c.memory.right) for c in candidates if c.memory is not None), default=0)
        lm_best = max((c.lm for c in candidates if c.lm is not None), default=0.0)
        rows = []
        for c in candidates:
            mem = c.memory.context if c.memory is not None else 0
            two = min(c.memory.left, c.memory.right) if c.memory is not None else 0
            two_bucket = next((name for low, name in reversed(MEM_TWO_BUCKETS) if two >= low), None) \
                if two == best_two else None
            whole = is_whole_line(c.memory)
            oov = c.model is None
            model = 0.0 if oov else max(c.model, MODEL_FLOOR)
            # Characters the model cannot write: 1 for such a one-character filler (model 0),
            # one per missing character of a longer one (model over the others).
            missing = max(c.unwritten, 1) if oov else c.unwritten
            lm = 0.0 if c.lm is None else max(c.lm - lm_best, LM_FLOOR)
            mem_context = min(mem, MEM_CONTEXT_CAP) / 4.0
            bucket = next((name for low, name in reversed(MEM_BEST_BUCKETS) if best >= low), None) \
                if mem and mem == best else None
            rows.append([
                model, lm, mem_context,
                *(1.0 if bucket == name else 0.0 for _, name in MEM_BEST_BUCKETS),
                0.0 if c.memory is None else c.memory.cover,
                model * z, lm * z, mem_context * z,
                float(missing),
                1.0 if c.length == 2 else 0.0,
                1.0 if c.length == 3 else 0.0,
                1.0 if c.length == 4 else 0.0,
                *(1.0 if two_bucket == name else 0.0 for _, name in MEM_TWO_BUCKETS),
                1.0 if whole else 0.0,
                min(c.echo, ECHO_CAP) / 4.0,
                c.cohesion,
                c.assoc,
            ])
        return np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURES))

    @staticmethod
    def null_features(z: float = 0.0) -> np.ndarray:
        """The "none of these" outcome's features, in the order of :data:`NULL_FEATURES`."""
        return np.array([1.0, z])

    def rank(self, candidates: list[Candidate], kind: str, null: bool = True, z: float = 0.0) -> list[Candidate]:
        """Score, normalise (softmax with the "none of these" outcome when ``null``) and
        sort the candidates, best first (ties by text, so answers are deterministic)."""
        if not candidates:
            return []
        weights, null_weights = self._weights.get(kind, self._weights["word"])
        null_score = float(self.null_features(z) @ null_weights)
        features = self.feature_matrix(candidates, z)
        scores = features @ weights
        top = max(float(scores.max()), null_score if null else -math.inf)
        mass = np.exp(scores - top)
        total = float(mass.sum()) + (math.exp(null_score - top) if null else 0.0)
        for c, s, m in zip(candidates, scores, mass):
            c.score = float(s)
            c.probability = float(m) / total
            c.z = z
        return sorted(candidates, key=lambda c: (-c.score, c.text))
