"""The bundle's exact phrase memory on the board (``memory.bin``, built by
``python -m tools memory build``): which fillers occur in the training corpus between
a blank's left and right context, with the longest matching context winning.

The file holds the text of every work (poem, ci, chapter) of the training split as
UTF-16-BE, a suffix array over the positions where a Han character starts, and each
work's title, author, dynasty and collection. A lookup for a blank of ``n``
characters:

1. *left-anchored*: the longest tail of the left context that occurs in the corpus is
   found by binary search (on its length, then in the suffix array); each occurrence
   gives the ``n`` characters after it as a filler and, compared with the right
   context, how much of that matched too. Shorter tails are taken in turn while they
   have at most ``max_occurrences`` occurrences;
2. *right-anchored*: the same from the right context, reading the filler before it;
3. per filler: the longest total context (left + right characters) of any
   occurrence, how many occurrences have it, and the first of them, for its source.

Everything is binary search over the memory-mapped file; nothing is loaded up front.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.arrays_file import ArraysFileError, open_arrays

FORMAT = "fillmask-edge phrase memory 1"
MAX_CONTEXT = 24  # characters of context used on each side
MIN_CONTEXT = 2  # a hit needs at least this much context matched (one character says nothing)
SENTENCE_END = "。！？；\n"
QUOTE_CHARS = 40
SAMPLE_EVERY = 256  # suffix-array rows between two keys held in memory
_HALF_TO_FULL = str.maketrans({",": "，", "?": "？", "!": "！", ";": "；", ":": "：", "(": "（", ")": "）"})
_SPACE_RE = re.compile(r"\s+")


class PhraseMemoryError(ValueError):
    """The memory file is missing, corrupt or of an unknown format; the message names it."""


def normalize_query(text: str) -> str:
    """The memory's spelling: full-width punctuation (a full stop only after Han text),
    no spaces, characters beyond the Basic Multilingual Plane as □."""
    text = _SPACE_RE.sub("", text).translate(_HALF_TO_FULL)
    text = re.sub(r"(?<=[\u3400-\u9fff])\.", "。", text)
    return "".join(ch if ord(ch) < 0x10000 else "□" for ch in text)


def is_han_unit(units: np.ndarray) -> np.ndarray:
    """Which UTF-16 code units are Han characters (the positions the index starts at)."""
    return ((units >= 0x3400) & (units <= 0x4DBF)) | ((units >= 0x4E00) & (units <= 0x9FFF)) | \
        ((units >= 0xF900) & (units <= 0xFAFF))


def _is_han(ch: str) -> bool:
    o = ord(ch)
    return 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF


@dataclass
class MemoryHit:
    """A filler the memory has for a blank: how much context matched, how often."""

    filler: str
    left: int  # characters of the left context that matched
    right: int  # characters of the right context that matched
    count: int  # occurrences with that much context
    position: int  # where the first of them starts (blank start, in characters)
    source: dict | None = None  # the line and the work it comes from (see PhraseMemory.source)

    @property
    def context(self) -> int:
        """Characters of context matched in all."""
        return self.left + self.right


class PhraseMemory:
    """Exact-context lookups in ``memory.bin``."""

    def __init__(self, path: str | Path, max_occurrences: int = 256):
        self.path = Path(path)
        file = open_arrays(self.path, FORMAT, PhraseMemoryError)
        meta = self.meta = file.meta
        try:
            self._text = file.view("text_utf16be")
            self._sa = file.view("sa")
            self._work_start = file.view("work_start")
            self._work_meta = file.array("work_meta_utf8")
        except ArraysFileError as exc:
            raise PhraseMemoryError(str(exc)) from exc
        self._width = int(meta.get("sa_width", 0))
        self.characters = len(self._text) // 2
        if self._width not in (3, 4) or len(self._sa) != self._width * int(meta.get("positions", -1)) \
                or self.characters != meta.get("characters") or len(self._work_start) != meta.get("works"):
            raise PhraseMemoryError(f"{self.path}: tables do not match its header (corrupt?)")
        self.positions = len(self._sa) // self._width
        self.max_occurrences = max_occurrences
        self._meta_ends: np.ndarray | None = None
        self._sa_array = file.array("sa")
        self._units = file.array("text_utf16be").view(">u2")
        # Binary search reads the mapped file directly (one bytes copy per probe).
        self._mm, self._text_at, _ = file.span("text_utf16be")
        _, self._sa_at, _ = file.span("sa")
        # Ranges of recent patterns: a lookup and the n-gram model of the same blank
        # search the same context tails. Bounded; cleared whole when full.
        self._ranges: dict[bytes, tuple[int, int]] = {}
        self._samples: list[bytes] | None = None
        self._file = file
        every = meta.get("sample_every")
        if every != SAMPLE_EVERY or "sample_keys" not in file.names() or \
                len(file.array("sample_keys")) != (self.positions + SAMPLE_EVERY - 1) // SAMPLE_EVERY:
            raise PhraseMemoryError(f"{self.path}: no sample keys every {SAMPLE_EVERY} rows (rebuild it with "
                                    "python -m tools memory build)")

    # -- suffix array --------------------------------------------------------
    def _pos(self, k: int) -> int:
        at = self._sa_at + self._width * k
        return int.from_bytes(self._mm[at : at + self._width], "little")

    def _chars(self, start: int, end: int) -> str:
        start, end = max(0, start), min(self.characters, end)
        return bytes(self._text[2 * start : 2 * end]).decode("utf-16-be") if end > start else ""

    def _range(self, pattern: bytes) -> tuple[int, int]:
        """Suffix-array rows whose suffix starts with ``pattern`` (UTF-16-BE bytes)."""
        found = self._ranges.get(pattern)
        if found is None:
            if len(self._ranges) >= 4096:
                self._ranges = {}
            found = self._ranges[pattern] = self._search(pattern)
        return found

    def _sample_keys(self) -> list[bytes]:
        """The first ``MAX_CONTEXT`` characters (UTF-16-BE) of every ``SAMPLE_EVERY``-th
        suffix (stored in the file by the builder, read once): a search narrows to one
        block of rows with these in memory and only then probes the file, 8 times
        instead of ~23, so a lookup touches few pages of it."""
        if self._samples is None:
            keys = self._file.array("sample_keys")
            lengths = self._file.array("sample_lengths")
            self._samples = [bytes(k[:n]) for k, n in zip(keys, lengths.tolist())]
        return self._samples

    def _search(self, pattern: bytes) -> tuple[int, int]:
        mm, m, width = self._mm, len(pattern), self._width
        text_at, sa_at = self._text_at, self._sa_at
        from_bytes = int.from_bytes
        samples = self._sample_keys()
        bounds = []
        for inclusive in (False, True):
            # Samples before the bound: key < pattern (lower) or key <= pattern (upper).
            if m > 2 * MAX_CONTEXT:  # longer than the keys: search all rows
                lo, hi = 0, self.positions
            else:
                if inclusive:
                    j = bisect.bisect_right(samples, pattern, key=lambda key: key[:m])
                else:
                    j = bisect.bisect_left(samples, pattern, key=lambda key: key[:m])
                lo = max(0, (j - 1) * SAMPLE_EVERY + 1) if j else 0
                hi = min(self.positions, j * SAMPLE_EVERY)
            while lo < hi:
                mid = (lo + hi) // 2
                at = sa_at + width * mid
                p = text_at + 2 * from_bytes(mm[at : at + width], "little")
                key = mm[p : p + m]
                if key < pattern or (inclusive and key == pattern):
                    lo = mid + 1
                else:
                    hi = mid
            bounds.append(lo)
        return bounds[0], bounds[1]

    def count(self, pattern: str) -> int:
        """How often ``pattern`` (starting with a Han character) occurs."""
        first, end = self._range(normalize_query(pattern).encode("utf-16-be"))
        return end - first

    # -- lookup --------------------------------------------------------------
    def lookup(self, left: str, n: int, right: str, limit: int = 20) -> list[MemoryHit]:
        """Fillers of ``n`` Han characters seen between ``left`` and ``right``, best first
        (most context matched, then most occurrences); each with its first source."""
        left = normalize_query(left)[-MAX_CONTEXT:]
        right = normalize_query(right)[:MAX_CONTEXT]
        found: dict[int, tuple[str, int, int]] = {}  # blank start -> (filler, left, right)
        for l, first, end in self._anchored(left, lambda k: left[-k:], lambda k: _is_han(left[-k])):
            for row in range(first, end):
                q = self._pos(row) + l
                if q in found:
                    continue
                filler = self._chars(q, q + n)
                if len(filler) == n and all(_is_han(c) for c in filler):
                    found[q] = (filler, l, _common_prefix(self._chars(q + n, q + n + len(right)), right))
        for r, first, end in self._anchored(right, lambda k: right[:k], lambda k: _is_han(right[0])):
            for row in range(first, end):
                q = self._pos(row) - n
                if q in found or q < 0:
                    continue
                filler = self._chars(q, q + n)
                if len(filler) == n and all(_is_han(c) for c in filler):
                    found[q] = (filler, _common_suffix(self._chars(q - len(left), q), left), r)
        best: dict[str, MemoryHit] = {}
        for q in sorted(found):
            filler, l, r = found[q]
            if l + r < MIN_CONTEXT:
                continue
            hit = best.get(filler)
            if hit is None or l + r > hit.context:
                best[filler] = MemoryHit(filler=filler, left=l, right=r, count=1, position=q)
            elif l + r == hit.context:
                hit.count += 1
        hits = sorted(best.values(), key=lambda h: (-h.context, -h.count, h.filler))[:limit]
        for hit in hits:
            hit.source = self.source(hit.position, n)
        return hits

    def _anchored(self, context: str, pattern_of, valid):
        """(length, first row, end row) for the longest occurring pattern of ``context``
        and then shorter ones, while they occur at most ``max_occurrences`` times."""
        lengths = [k for k in range(1, len(context) + 1) if valid(k)]
        if not lengths:
            return []
        ranges: dict[int, tuple[int, int]] = {}

        def occurs(k: int) -> bool:
            if k not in ranges:
                ranges[k] = self._range(pattern_of(k).encode("utf-16-be"))
            return ranges[k][1] > ranges[k][0]

        # Occurrence is monotone in the length: binary search for the longest.
        lo, hi = 0, len(lengths)
        while lo < hi:
            mid = (lo + hi) // 2
            if occurs(lengths[mid]):
                lo = mid + 1
            else:
                hi = mid
        out = []
        for index in range(lo - 1, -1, -1):
            k = lengths[index]
            occurs(k)
            first, end = ranges[k]
            if end - first > self.max_occurrences:
                break
            out.append((k, first, end))
        return out

    # -- a character n-gram model read off the suffix array ---------------------
    def _rows(self, first: int, end: int) -> np.ndarray:
        """Text positions of suffix-array rows ``first..end`` (vectorised)."""
        w = self._width
        raw = self._sa_array[w * first : w * end].reshape(-1, w).astype(np.int64)
        pos = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        if w == 4:
            pos |= raw[:, 3] << 24
        return pos

    def _keys(self, starts: np.ndarray, n: int) -> np.ndarray:
        """One integer per ``n`` code units starting at each position (n <= 4)."""
        starts = starts[(starts >= 0) & (starts + n <= self.characters)]
        key = np.zeros(len(starts), dtype=np.uint64)
        for i in range(n):
            key = (key << np.uint64(16)) | self._units[starts + i].astype(np.uint64)
        return key

    @staticmethod
    def key_of(text: str) -> int:
        """The integer :meth:`_keys` gives the characters of ``text``."""
        key = 0
        for ch in text:
            key = (key << 16) | ord(ch)
        return key

    def ngram_logp(self, left: str, right: str, fillers: list[str], max_level: int = 6,
                   max_rows: int = 8000, vocab: int = 8000) -> list[float]:
        """ln p of each filler after the left context times ln p before the right one,
        under character n-gram models read off the corpus (Witten-Bell interpolation of
        the contexts' 1..``max_level`` nearest characters; a level with more than
        ``max_rows`` occurrences is left out, the base is uniform over ``vocab``).

        The counts come from the suffix array: the rows of a context pattern, gathered
        with numpy, give the characters that follow (precede) it in the corpus.
        """
        left = normalize_query(left)[-MAX_CONTEXT:]
        right = normalize_query(right)[:MAX_CONTEXT]
        if not fillers:
            return []
        n = len(fillers[0])
        if n > 4 or any(len(f) != n for f in fillers):
            raise ValueError("ngram_logp takes fillers of one length, at most 4 characters")
        keys = np.array([self.key_of(f) for f in fillers], dtype=np.uint64)
        total = np.zeros(len(fillers))
        for side in ("left", "right"):
            p = np.full(len(fillers), 1.0 / float(vocab) ** n)
            for k in range(1, min(max_level, len(left if side == "left" else right)) + 1):
                pattern = left[-k:] if side == "left" else right[:k]
                if not _is_han(pattern[0]):
                    continue
                first, end = self._range(pattern.encode("utf-16-be"))
                if end == first:
                    break
                if end - first > max_rows:
                    continue
                pos = self._rows(first, end)
                seen = self._keys(pos + k if side == "left" else pos - n, n)
                if not len(seen):
                    continue
                values, counts = np.unique(seen, return_counts=True)
                at = np.searchsorted(values, keys)
                hit = (at < len(values)) & (values[np.minimum(at, len(values) - 1)] == keys)
                c = np.where(hit, counts[np.minimum(at, len(values) - 1)], 0)
                types, tokens = len(values), len(seen)
                p = (c + types * p) / (tokens + types)
            total += np.log(p)
        return [float(x) for x in total]

    # -- sources -------------------------------------------------------------
    def work_of(self, position: int) -> int:
        """Index of the work holding character ``position``."""
        return bisect.bisect_right(self._work_start, position) - 1

    def work_info(self, index: int) -> dict:
        """Title, author, dynasty and collection of work ``index`` (empty ones left out)."""
        if self._meta_ends is None:
            self._meta_ends = np.nonzero(self._work_meta == 10)[0]
        ends = self._meta_ends
        start = 0 if index == 0 else int(ends[index - 1]) + 1
        end = int(ends[index]) if index < len(ends) else len(self._work_meta)
        fields = self._work_meta[start:end].tobytes().decode("utf-8", errors="replace").split("\t")
        try:
            title, author, group = fields
            dynasty, collection = self.meta["groups"][int(group)]
        except (ValueError, IndexError, KeyError, TypeError):
            return {}  # a damaged record: the quote goes without its source, the answer stands
        fields = {"title": title, "author": author, "dynasty": dynasty, "collection": collection}
        return {k: v for k, v in fields.items() if v}

    def source(self, position: int, n: int) -> dict:
        """The sentence around a blank at ``position`` (``n`` characters) and its work."""
        index = self.work_of(position)
        work_start = self._work_start[index]
        before = self._chars(max(work_start, position - QUOTE_CHARS), position)
        cut = max(before.rfind(c) for c in SENTENCE_END)
        before = before[cut + 1 :]
        after = self._chars(position, position + n + QUOTE_CHARS)
        stops = [after.find(c, n) for c in SENTENCE_END]
        stops = [s for s in stops if s >= 0]
        if stops:
            stop = min(stops)
            after = after[: stop + (0 if after[stop] == "\n" else 1)]
        info = {"text": before + after}
        info.update(self.work_info(index))
        return info


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or x == "\n":
            break
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y or x == "\n":
            break
        n += 1
    return n

