"""The bundle's word n-gram LM on the board: lookups with back-off, and scores of a
text window over its best segmentation into LM words (numpy and the standard
library only; the file is memory-mapped, see :mod:`edge.arrays_file`).

Probabilities follow the ARPA back-off rule exactly as KenLM computes them with
``bos=False, eos=False`` (the model has no sentence markers):
``p(w | u v) = p3(u v w)`` if that trigram exists, else ``bo(u v) + p(w | v)``;
``p(w | v) = p2(v w)`` if that bigram exists, else ``bo(v) + p1(w)``; log10 throughout;
a word outside the vocabulary is ``<unk>``.

The LM's words are Chinese (Han) only, so a text is scored run by run: punctuation,
Latin letters and digits end a run, and the next run starts with no context. Within
a run, a segmentation is any split into LM words, a Han character that is no LM
word standing alone as ``<unk>``. :meth:`NgramLM.best_segmentation` finds the most
probable one exactly (Viterbi over n-gram states); :class:`FillerScorer` scores many
fillers of one blank in the same window, sharing all the work that does not depend
on the filler (see its docstring).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.arrays_file import ArraysFile, ArraysFileError, open_arrays

FORMAT = "fillmask-edge ngram lm 1"
HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]+")
HAN_END_RE = re.compile(HAN_RE.pattern + "$")
HAN_CHAR_RE = re.compile(r"^[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]+$")
# Words longer than this are not tried when segmenting (the model has a handful of
# 9-13 character entries; checking them at every position would cost for nothing).
MAX_SEGMENT_WORD = 7
NO_WORD = -1


class NgramLMError(ValueError):
    """The LM file is missing, corrupt or of an unknown format; the message names it."""


def is_han(text: str) -> bool:
    """True when ``text`` is one or more Han characters and nothing else."""
    return bool(HAN_CHAR_RE.match(text))


class Vocabulary(SequenceABC):
    """The LM's words, sorted by code point (a word's id is its rank), held as one
    UTF-32 blob and two small numpy tables instead of a list and a dict of 165 k
    Python strings (measured: ~4 MB instead of 23 MB in the server).

    ``vocabulary[i]`` is the word with id ``i``; :meth:`index_of` finds a word's id by
    binary search over the keys of the words of up to :data:`KEY_CHARS` characters: each
    character as its rank among the vocabulary's characters in 16 bits, left-aligned in
    64, so that the words with a given prefix have adjacent keys (a search can stop as
    soon as no word continues the text). The few longer words are in a dict.
    """

    KEY_CHARS = 4

    def __init__(self, text: str):
        self._blob = text.encode("utf-32-le")
        units = np.frombuffer(self._blob, dtype=np.uint32)
        breaks = np.flatnonzero(units == 10)
        starts = np.concatenate(([0], breaks + 1)).astype(np.int64)
        ends = np.concatenate((breaks, [len(units)])).astype(np.int64)
        self._starts = memoryview(starts.astype(np.uint32)).cast("B").cast("I")
        self._ends = memoryview(ends.astype(np.uint32)).cast("B").cast("I")
        self._starts_array, self._ends_array = starts, ends
        lengths = ends - starts
        chars = np.unique(units[units != 10])
        if len(chars) >= 1 << 16:
            raise ValueError(f"{len(chars)} distinct characters: at most {(1 << 16) - 1} fit the word keys")
        # Rank + 1 of each character (0 is "no character"); a dict of ~10 k entries.
        self._rank = {chr(c): k + 1 for k, c in enumerate(chars.tolist())}
        short = np.flatnonzero((lengths >= 1) & (lengths <= self.KEY_CHARS))
        key = np.zeros(len(short), dtype=np.uint64)
        for j in range(self.KEY_CHARS):
            has = lengths[short] > j
            at = np.minimum(starts[short] + j, len(units) - 1)
            rank = (np.searchsorted(chars, units[at]) + 1).astype(np.uint64)
            key = (key << np.uint64(16)) | np.where(has, rank, np.uint64(0))
        order = np.argsort(key, kind="stable")
        keys, ids = key[order], short[order].astype(np.uint32)
        if len(keys) > 1 and not (keys[1:] != keys[:-1]).all():
            raise ValueError("the vocabulary has a word twice")
        self._keys = memoryview(keys).cast("B").cast("Q")
        self._key_ids = memoryview(ids).cast("B").cast("I")
        self._long = {self[int(i)]: int(i) for i in np.flatnonzero(lengths > self.KEY_CHARS)}

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self._blob[4 * self._starts[index] : 4 * self._ends[index]].decode("utf-32-le")

    def __contains__(self, word) -> bool:
        return isinstance(word, str) and self.index_of(word) >= 0

    def prefixes_of(self, text: str) -> list[tuple[int, int]]:
        """``(length, id)`` of the words among ``text[:1]``, ``text[:2]``, … (up to
        :data:`KEY_CHARS` characters), shortest first."""
        keys, ids, rank = self._keys, self._key_ids, self._rank
        n = len(keys)
        found, key, lo = [], 0, 0
        for j in range(min(len(text), self.KEY_CHARS)):
            r = rank.get(text[j])
            if r is None:
                break
            shift = 16 * (self.KEY_CHARS - 1 - j)
            key |= r << shift
            lo = bisect.bisect_left(keys, key, lo)
            if lo == n or keys[lo] >= key + (1 << shift):
                break  # no word starts with text[:j + 1]
            if keys[lo] == key:
                found.append((j + 1, ids[lo]))
        return found

    def index_of(self, word: str) -> int:
        """The id of ``word``, or NO_WORD."""
        if not word:
            return NO_WORD
        if len(word) > self.KEY_CHARS:
            return self._long.get(word, NO_WORD)
        found = self.prefixes_of(word)
        return found[-1][1] if found and found[-1][0] == len(word) else NO_WORD

    def long_word(self, word: str) -> int:
        """The id of a word longer than :data:`KEY_CHARS` characters, or NO_WORD."""
        return self._long.get(word, NO_WORD)

    def has_prefix(self, prefix: str) -> bool:
        """Whether some word longer than ``prefix`` starts with it."""
        k = bisect.bisect_right(self, prefix)
        return k < len(self) and self[k].startswith(prefix)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(code points of all words, UTF-32, separated by 10; start and end of each word
        in it), for building tables over the whole vocabulary with numpy."""
        return np.frombuffer(self._blob, dtype=np.uint32), self._starts_array, self._ends_array


class NgramLM:
    """A back-off n-gram LM (order 1–3) read from ``lm.bin``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = file = open_arrays(self.path, FORMAT, NgramLMError)
        meta = self.meta = file.meta
        self.order = int(meta.get("order", 0))
        if not 1 <= self.order <= 3:
            raise NgramLMError(f"{self.path}: order {self.order} is not supported (1-3)")
        try:
            self.words = Vocabulary(file.bytes_of("vocab_utf8").decode("utf-8"))
            self._up = self._codes(file, "uni_p")
            self._ubo = self._codes(file, "uni_bo")
            if self.order >= 2:
                self._bi_off = file.view("bi_off")
                self._bi_wp = file.view("bi_wp")
                self._bp = self._book(file, "bi_p")
            if self.order >= 3:
                self._ctx = file.view("ctx")
                self._ctx_bo = self._codes(file, "ctx_bo")
                self._tri_off = file.view("tri_off")
                self._tri_wp = file.view("tri_wp")
                self._tp = self._book(file, "tri_p")
            self.rev_order = file.view("rev_order")
        except (ArraysFileError, UnicodeDecodeError, ValueError) as exc:
            raise NgramLMError(f"{self.path}: {exc}") from exc
        counts = meta.get("counts", {})
        vocab = len(self.words)
        if vocab != counts.get("1") or len(self.rev_order) != vocab or len(self._up[0]) != vocab:
            raise NgramLMError(f"{self.path}: vocabulary of {vocab} words does not match its tables (corrupt?)")
        if self.order >= 2 and (len(self._bi_off) != vocab + 1 or self._bi_off[-1] != len(self._bi_wp)
                                or len(self._bi_wp) != counts.get("2")):
            raise NgramLMError(f"{self.path}: bigram tables are inconsistent (corrupt?)")
        if self.order >= 3 and (self._tri_off[-1] != len(self._tri_wp) or len(self._tri_wp) != counts.get("3")
                                or len(self._tri_off) != len(self._ctx) + 1):
            raise NgramLMError(f"{self.path}: trigram tables are inconsistent (corrupt?)")
        self.unk = self.words.index_of("<unk>")
        if self.unk == NO_WORD:
            raise NgramLMError(f"{self.path}: the vocabulary has no <unk>")
        self.max_word_chars = min(int(meta.get("max_word_chars", 4)), MAX_SEGMENT_WORD)
        self.max_error = meta.get("quantization", {}).get("max_abs_error_log10", {})

    @staticmethod
    def _book(file: ArraysFile, name: str) -> list[float]:
        return [float(x) for x in file.array(f"cb_{name}")]

    @classmethod
    def _codes(cls, file: ArraysFile, name: str) -> tuple[memoryview, list[float]]:
        return file.view(name), cls._book(file, name)

    # -- lookups -------------------------------------------------------------
    def word_id(self, word: str) -> int:
        """The id of ``word`` (``<unk>``'s id when it is not in the vocabulary)."""
        w = self.words.index_of(word)
        return self.unk if w == NO_WORD else w

    def _bigram(self, w1: int, w2: int) -> int:
        """Index of the bigram (w1, w2), or NO_WORD."""
        lo, hi = self._bi_off[w1], self._bi_off[w1 + 1]
        key = w2 << 8
        k = bisect.bisect_left(self._bi_wp, key, lo, hi)
        return k if k < hi and self._bi_wp[k] >> 8 == w2 else NO_WORD

    def logp(self, h2: int, h1: int, w: int) -> float:
        """log10 p(w | h2 h1) with back-off; ``NO_WORD`` for an absent history word."""
        codes, book = self._up
        if self.order == 1 or h1 == NO_WORD:
            return book[codes[w]]
        backoff = 0.0
        if self.order >= 3 and h2 != NO_WORD:
            ctx = self._bigram(h2, h1)
            if ctx != NO_WORD:
                contexts = self._ctx
                c = bisect.bisect_left(contexts, ctx)
                if c < len(contexts) and contexts[c] == ctx:
                    lo, hi = self._tri_off[c], self._tri_off[c + 1]
                    if lo < hi:
                        k = bisect.bisect_left(self._tri_wp, w << 8, lo, hi)
                        if k < hi and self._tri_wp[k] >> 8 == w:
                            return self._tp[self._tri_wp[k] & 255]
                    backoff = self._ctx_bo[1][self._ctx_bo[0][c]]
        lo, hi = self._bi_off[h1], self._bi_off[h1 + 1]
        k = bisect.bisect_left(self._bi_wp, w << 8, lo, hi)
        if k < hi and self._bi_wp[k] >> 8 == w:
            return backoff + self._bp[self._bi_wp[k] & 255]
        return backoff + self._ubo[1][self._ubo[0][h1]] + book[codes[w]]

    def successors(self, h1: int):
        """(word ids, log10 p2) of every bigram (h1, w) in the model, as numpy arrays."""
        import numpy as np

        if self.order < 2 or h1 == NO_WORD:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        lo, hi = self._bi_off[h1], self._bi_off[h1 + 1]
        packed = np.frombuffer(self._bi_wp, dtype=np.uint32, count=hi - lo, offset=4 * lo)
        book = np.asarray(self._bp)
        return (packed >> 8).astype(np.int64), book[packed & 255]

    def score_words(self, words: Sequence[str]) -> float:
        """log10 probability of a word sequence (no context before it, none after)."""
        h2 = h1 = NO_WORD
        total = 0.0
        for word in words:
            w = self.word_id(word)
            total += self.logp(h2, h1, w)
            h2, h1 = h1, w
        return total

    # -- segmentation --------------------------------------------------------
    def words_at(self, text: str, start: int, end: int | None = None) -> list[tuple[int, int]]:
        """``(end, word id)`` of each LM word starting at ``start`` in ``text`` (ending by
        ``end``); a character that is no LM word stands alone as ``<unk>``."""
        stop = min(len(text) if end is None else end, start + self.max_word_chars)
        return [(start + k, w) for k, w in self._words_in(text[start:stop])]

    def _words_in(self, piece: str) -> list[tuple[int, int]]:
        vocabulary = self.words
        found = vocabulary.prefixes_of(piece)
        for k in range(Vocabulary.KEY_CHARS + 1, len(piece) + 1):
            w = vocabulary.long_word(piece[:k])
            if w != NO_WORD:
                found.append((k, w))
        if not found or found[0][0] != 1:
            found.insert(0, (1, self.unk))
        return found

    def best_segmentation(self, text: str) -> tuple[float, list[str]]:
        """The most probable segmentation of ``text`` into LM words (exact Viterbi over
        n-gram states, run by run); returns (log10 probability, words)."""
        total, words = 0.0, []
        for match in HAN_RE.finditer(text):
            score, run_words = self._viterbi(match.group())
            total += score
            words.extend(run_words)
        return total, words

    def _viterbi(self, run: str) -> tuple[float, list[str]]:
        # states[i]: (h2, h1) -> (score, back pointer (i0, state0), word); exact, no pruning.
        states: list[dict] = [dict() for _ in range(len(run) + 1)]
        states[0][(NO_WORD, NO_WORD)] = (0.0, None, None)
        for i in range(len(run)):
            if not states[i]:
                continue
            nexts = self.words_at(run, i)
            for (h2, h1), (score, _, _) in states[i].items():
                for e, w in nexts:
                    key = (h1, w) if self.order >= 3 else (NO_WORD, w)
                    value = score + self.logp(h2, h1, w)
                    old = states[e].get(key)
                    if old is None or value > old[0]:
                        states[e][key] = (value, (i, (h2, h1)), run[i:e])
        end = states[len(run)]
        key = max(end, key=lambda k: end[k][0])
        best = end[key][0]
        words: list[str] = []
        at, state = len(run), key
        while at > 0:
            _, (prev_at, prev_state), word = states[at][state]
            words.append(word)
            at, state = prev_at, prev_state
        return best, words[::-1]


class FillerScorer:
    """log10 p(L + filler + R) under the best segmentation, for many fillers of one blank.

    ``L`` and ``R`` are the Han runs touching the blank (up to ``context`` characters
    each way). Every segmentation of ``L f R`` has one word ``w`` covering the blank's
    first character, starting at some ``s`` in ``L`` (or at the blank); so

        best(f) = max over s, states σ at s, words from s that cover the blank …
                  F[s][σ] + log p(w | σ) + (the rest, through f, into R)

    where ``F`` (the Viterbi table of ``L``) does not depend on the filler and is
    computed once, and once the last ``order - 1`` words placed lie wholly inside ``R``,
    the best completion ``G`` (a memo over positions of ``R`` and n-gram states) is
    shared by every filler too. Only the few words that touch the filler are scored
    per filler. ``beam`` keeps that many best states of ``F`` per position (None: all,
    which is exact).
    """

    def __init__(self, lm: NgramLM, left: str, right: str, beam: int | None = 6):
        self.lm = lm
        self.left, self.right = left, right
        self.beam = beam
        self._memo: dict = {}  # (h2, h1, w) -> logp, shared by everything below
        self._right_words = [lm.words_at(right, q) for q in range(len(right))]
        self._g: dict = {}
        self._forward = self._forward_table(left)
        # Starts s < len(left) from which an LM word can cover the blank: left[s:] must
        # begin some longer word (checked once here, not per filler).
        self._cover_starts = []
        for s in range(max(0, len(left) - lm.max_word_chars + 1), len(left)):
            if lm.words.has_prefix(left[s:]):
                self._cover_starts.append(s)
        self._cover_starts.append(len(left))

    def left_states(self, limit: int = 2) -> list[tuple[float, int, int]]:
        """The best (score, h2, h1) states at the end of the left context."""
        return self._forward[len(self.left)][:limit]

    def _logp(self, h2: int, h1: int, w: int) -> float:
        key = (h2, h1, w)
        value = self._memo.get(key)
        if value is None:
            value = self._memo[key] = self.lm.logp(h2, h1, w)
        return value

    def _forward_table(self, text: str) -> list[list[tuple[float, int, int]]]:
        table: list[dict] = [dict() for _ in range(len(text) + 1)]
        table[0][(NO_WORD, NO_WORD)] = 0.0
        order3 = self.lm.order >= 3
        pruned: list[list[tuple[float, int, int]]] = []
        for i in range(len(text) + 1):
            items = sorted(((s, h2, h1) for (h2, h1), s in table[i].items()), reverse=True)
            if self.beam is not None:
                items = items[: self.beam]
            pruned.append(items)
            if i == len(text):
                break
            for e, w in self.lm.words_at(text, i):
                for score, h2, h1 in items:
                    key = (h1, w) if order3 else (NO_WORD, w)
                    value = score + self._logp(h2, h1, w)
                    if value > table[e].get(key, -1e300):
                        table[e][key] = value
        return pruned

    def _completion(self, q: int, h2: int, h1: int) -> float:
        """Best log10 probability of ``right[q:]`` after the history (h2, h1)."""
        if q == len(self.right):
            return 0.0
        if self.lm.order < 3:
            h2 = NO_WORD
        key = (q, h2, h1)
        value = self._g.get(key)
        if value is None:
            value = max(self._logp(h2, h1, w) + self._completion(e, h1, w) for e, w in self._right_words[q])
            self._g[key] = value
        return value

    def score(self, filler: str) -> float:
        """log10 probability of ``left + filler + right`` (best segmentation)."""
        if not filler or not is_han(filler):
            # Not Han (digits, Latin, punctuation): it splits the window into runs, and
            # each of its non-Han characters costs what an unknown word costs, so that
            # leaving the LM's words is never free.
            others = sum(1 for ch in filler if not HAN_RE.match(ch))
            unk = self.lm.logp(NO_WORD, NO_WORD, self.lm.unk)
            return self.lm.best_segmentation(self.left + filler + self.right)[0] + others * unk
        lm = self.lm
        text = self.left + filler + self.right
        a = len(self.left)
        b = a + len(filler)
        need = lm.order - 1
        memo: dict = {}
        logp = self._logp

        def rest(p: int, h2: int, h1: int, inside: int) -> float:
            # Best log10 probability of text[p:] given history (h2, h1); ``inside`` counts
            # the words placed so far that lie wholly in the right context.
            if p >= b and inside >= need:
                return self._completion(p - b, h2, h1)
            if p == len(text):
                return 0.0
            key = (p, h2, h1, inside)
            value = memo.get(key)
            if value is None:
                if p >= b:
                    options = [(e + b, w) for e, w in self._right_words[p - b]]
                else:
                    options = lm.words_at(text, p)
                step = 1 if p >= b else 0
                value = max(logp(h2, h1, w) + rest(e, h1, w, inside + step) for e, w in options)
                memo[key] = value
            return value

        best = -1e300
        for s in self._cover_starts:
            states = self._forward[s]
            if not states:
                continue
            if s == a:
                words = lm.words_at(text, a)
            else:
                words = [(e, w) for e, w in lm.words_at(text, s) if e > a and w != lm.unk]
            for e, w in words:
                for score, h2, h1 in states:
                    value = score + logp(h2, h1, w) + rest(e, h1, w, 1 if s >= b else 0)
                    if value > best:
                        best = value
        return best


def han_context(left_text: str, right_text: str, chars: int = 8) -> tuple[str, str]:
    """The Han run ending ``left_text`` and the one starting ``right_text`` (at most
    ``chars`` characters each): the part of the context the LM scores with a blank."""
    left, right = HAN_END_RE.search(left_text), HAN_RE.match(right_text)
    return (left.group()[-chars:] if left else ""), (right.group()[:chars] if right else "")
