"""Which characters the training corpus uses around each idiom (``idioms.bin``, built by
``python -m tools idioms build``): a cue for choosing among idioms (ChID,
``score_fillers``) and for four-character blanks.

An idiom says something about its passage beyond its neighbours: 雪中送炭 comes with
help, need, winter; 守株待兔 with waiting and luck. The file holds, for every
four-character word of the bundle's word LM that occurs in the training corpus, how
many times it occurs and how often each Han character occurs within ``window``
characters of it, and the corpus's own character counts. To those it adds the expected
counts of the corpus's idiom questions without answers (ChID's unlabeled passages, each
with seven candidates), weighted by how likely each candidate is there (see
:mod:`tools.knowledge.idioms`); the counts are therefore fractional, stored as one byte
each: an index into a table of levels. For a query, the characters
within ``window`` of the blank are compared with each idiom's (a naive-Bayes
log-likelihood ratio against the corpus's character distribution):

    assoc(idiom) = sum over distinct Han characters q near the blank of
                   ln[(n(idiom, q) + alpha p(q)) / ((N(idiom) + alpha) p(q))] / 10

with ``n(idiom, q)`` the count of q near the idiom, ``N(idiom)`` all characters near it,
``p(q)`` q's share of the corpus; ``alpha`` pulls an idiom seen rarely toward the corpus
(0 for an idiom the corpus lacks: no evidence either way). ``window`` and ``alpha`` were
chosen by cross-validation within ChID ``dev_few_all`` (see ``tools.knowledge.idioms``).

The arrays are small (about 2 MB for the default bundle) and read through the mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from edge.arrays_file import open_arrays

FORMAT = "fillmask-edge idiom contexts 2"  # counts as level codes, expected counts from questions
FORMAT_1 = "fillmask-edge idiom contexts 1"  # integer counts (bundles built before the questions)
SCALE = 10.0  # the feature is the log-likelihood ratio / 10, near the other features' range


class IdiomContextError(ValueError):
    """The idioms file is missing, corrupt or of an unknown format; the message names it."""


def is_han_char(ch: str) -> bool:
    """Whether ``ch`` is a Han character of the Basic Multilingual Plane."""
    return "\u3400" <= ch <= "\u4dbf" or "\u4e00" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def cue(counts: np.ndarray, total: float, shares: np.ndarray, alpha: float) -> float:
    """``assoc`` of one idiom: ``counts`` of the query's characters near it, ``total``
    characters near it in all, the characters' ``shares`` of the corpus (the formula in
    the module docstring; shared with the builder's expectation-maximisation)."""
    return float(np.log((counts + alpha * shares) / ((total + alpha) * shares)).sum() / SCALE)


class QueryChars(NamedTuple):
    """The distinct Han characters near a blank that the corpus has, with their shares."""

    codes: np.ndarray
    shares: np.ndarray


class IdiomContext:
    """The per-idiom character counts of ``idioms.bin``, and the cue computed from them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file = open_arrays(self.path, (FORMAT, FORMAT_1), IdiomContextError)
        meta = self.meta = file.meta
        try:
            self.window = int(meta["window"])
            self.alpha = float(meta["alpha"])
            total = float(meta["corpus_characters"])
            words = file.bytes_of("words_utf8").decode("utf-8").split("\n") if meta.get("idioms") else []
            self._off = file.array("off")
            self._chars = file.array("chars")
            # A count is levels[code]; format 1 stored the integer count itself in the byte.
            # The codes stay in the mapping (one byte per pair, paged in as read).
            if meta["format"] == FORMAT_1:
                self._codes, self._levels = file.array("counts"), np.arange(256, dtype=np.float64)
            else:
                self._codes, self._levels = file.array("codes"), file.array("levels").astype(np.float64)
            if self._codes.dtype != np.uint8 or len(self._levels) != 256:
                raise ValueError("count codes are not one byte into a table of 256 levels")
            self._totals = file.array("totals").astype(np.float64)
            self._occurrences = file.array("occurrences").astype(np.float64)
            self._bg_chars = file.array("bg_chars")
            self._bg_share = file.array("bg_counts").astype(np.float64) / total
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise IdiomContextError(f"{self.path}: unreadable idioms file ({exc})") from exc
        n = len(words)
        if not (len(self._off) == n + 1 and len(self._totals) == n == len(self._occurrences)
                and len(self._chars) == len(self._codes) == (int(self._off[-1]) if n else len(self._chars))
                and len(self._bg_chars) == len(self._bg_share) and total > 0
                and bool(np.all(np.diff(self._off.astype(np.int64)) > 0))):  # no idiom without characters
            raise IdiomContextError(f"{self.path}: inconsistent array lengths (truncated or corrupt)")
        self._index = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, word: str) -> bool:
        return word in self._index

    def occurrences(self, word: str) -> float:
        """How many times the corpus has ``word``, its questions' expected share included
        (0 when it is not an idiom of the file)."""
        i = self._index.get(word)
        return 0.0 if i is None else float(self._occurrences[i])

    def query(self, left_text: str, right_text: str) -> QueryChars:
        """The characters within ``window`` of the blank that the corpus has."""
        near = {ch for ch in left_text[-self.window:] + right_text[: self.window] if is_han_char(ch)}
        codes = np.array(sorted(ord(ch) for ch in near if ord(ch) < 0x10000), dtype=np.int64)
        pos = np.searchsorted(self._bg_chars, codes).clip(0, max(len(self._bg_chars) - 1, 0))
        known = (self._bg_chars[pos] == codes) if len(self._bg_chars) else np.zeros(len(codes), bool)
        return QueryChars(codes[known], self._bg_share[pos[known]])

    def score(self, word: str, near: QueryChars) -> float:
        """``assoc``: how much more the characters near the blank are those the corpus has
        near ``word`` than its average characters (0 for a word the file lacks)."""
        i = self._index.get(word)
        if i is None or len(near.codes) == 0:
            return 0.0
        # Every idiom in the file has at least one character (the builder keeps no empty one).
        lo, hi = int(self._off[i]), int(self._off[i + 1])
        chars, codes = self._chars[lo:hi], self._codes[lo:hi]
        pos = np.searchsorted(chars, near.codes).clip(0, hi - lo - 1)
        counts = np.where(chars[pos] == near.codes, self._levels[codes[pos]], 0.0)
        return cue(counts, float(self._totals[i]), near.shares, self.alpha)

    def scores(self, words: Iterable[str], left_text: str, right_text: str) -> list[float]:
        """:meth:`score` of each word for the blank between ``left_text`` and ``right_text``."""
        near = self.query(left_text, right_text)
        return [self.score(w, near) for w in words]
