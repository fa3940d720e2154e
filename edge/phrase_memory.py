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

Everything is binary search over the file, read with ``pread`` rather than mapped:
a lookup reads a few hundred scattered bytes, and a mapping would put whole page-cache
folios of the file into the service's resident memory (measured on Linux 6.18 / ext4:
13 MB after one lookup, 31 MB of the 38 MB file after 100 queries). Read this way the
pages stay in the page cache (shared with the serial service, dropped under memory
pressure) and out of the process's RSS. Only the sample keys (1 MB) are held in memory.
"""

from __future__ import annotations

import bisect
import os
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
    available: int = 0  # characters of context the query had (both sides, up to MAX_CONTEXT each)

    @property
    def context(self) -> int:
        """Characters of context matched in all."""
        return self.left + self.right

    @property
    def cover(self) -> float:
        """The share of the query's context that matched (1.0: the whole query is a
        line of the corpus, as when someone types a famous line)."""
        return self.context / self.available if self.available else 0.0


class PhraseMemory:
    """Exact-context lookups in ``memory.bin``."""

    def __init__(self, path: str | Path, max_occurrences: int = 256):
        self.path = Path(path)
        file = open_arrays(self.path, FORMAT, PhraseMemoryError)
        meta = self.meta = file.meta
        try:
            self._text_at, text_bytes = file.span("text_utf16be")[1:]
            self._sa_at, sa_bytes = file.span("sa")[1:]
            self._work_start = file.array("work_start").copy()  # 0.4 MB, bisected for every source
            self._meta_at, self._meta_bytes = file.span("work_meta_utf8")[1:]
            names = file.names()
        except (ArraysFileError, KeyError) as exc:
            raise PhraseMemoryError(str(exc) if isinstance(exc, ArraysFileError) else
                                    f"{self.path}: has no array {exc}") from exc
        self._width = int(meta.get("sa_width", 0))
        self.characters = text_bytes // 2
        if self._width not in (3, 4) or sa_bytes != self._width * int(meta.get("positions", -1)) \
                or self.characters != meta.get("characters") or len(self._work_start) != meta.get("works"):
            raise PhraseMemoryError(f"{self.path}: tables do not match its header (corrupt?)")
        self.positions = sa_bytes // self._width
        self.max_occurrences = max_occurrences
        self._meta_ends: np.ndarray | None = None
        # Ranges of recent patterns (the same context tails come back query after
        # query). Bounded; cleared whole when full.
        self._ranges: dict[bytes, tuple[int, int]] = {}
        every = meta.get("sample_every")
        if every != SAMPLE_EVERY or "sample_keys" not in names or \
                len(file.array("sample_keys")) != (self.positions + SAMPLE_EVERY - 1) // SAMPLE_EVERY:
            raise PhraseMemoryError(f"{self.path}: no sample keys every {SAMPLE_EVERY} rows (rebuild it with "
                                    "python -m tools memory build)")
        self._samples = self._read_sample_keys(file)
        file.close()  # everything else is read with pread
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise PhraseMemoryError(f"{self.path}: cannot read it ({exc})") from exc

    def close(self) -> None:
        """Close the file (idempotent)."""
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self.close()

    def _read(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    # -- suffix array --------------------------------------------------------
    def _pos(self, k: int) -> int:
        return int.from_bytes(self._read(self._sa_at + self._width * k, self._width), "little")

    def _positions(self, first: int, end: int) -> list[int]:
        """Text positions of suffix-array rows ``first..end`` (one read)."""
        w = self._width
        raw = self._read(self._sa_at + w * first, w * (end - first))
        return [int.from_bytes(raw[i : i + w], "little") for i in range(0, len(raw), w)]

    def _chars(self, start: int, end: int) -> str:
        start, end = max(0, start), min(self.characters, end)
        return self._read(self._text_at + 2 * start, 2 * (end - start)).decode("utf-16-be") if end > start else ""

    def _range(self, pattern: bytes) -> tuple[int, int]:
        """Suffix-array rows whose suffix starts with ``pattern`` (UTF-16-BE bytes)."""
        found = self._ranges.get(pattern)
        if found is None:
            if len(self._ranges) >= 4096:
                self._ranges = {}
            found = self._ranges[pattern] = self._search(pattern)
        return found

    @staticmethod
    def _read_sample_keys(file) -> list[bytes]:
        """The first ``MAX_CONTEXT`` characters (UTF-16-BE) of every ``SAMPLE_EVERY``-th
        suffix (stored in the file by the builder, read once): a search narrows to one
        block of rows with these in memory and only then reads the file, 8 times
        instead of ~23."""
        keys = file.array("sample_keys")
        lengths = file.array("sample_lengths").tolist()
        return [bytes(k[:n]) for k, n in zip(keys, lengths)]

    def _search(self, pattern: bytes) -> tuple[int, int]:
        fd, m, width = self._fd, len(pattern), self._width
        text_at, sa_at = self._text_at, self._sa_at
        from_bytes, pread = int.from_bytes, os.pread
        samples = self._samples
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
                p = text_at + 2 * from_bytes(pread(fd, width, sa_at + width * mid), "little")
                key = pread(fd, m, p)
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
            for q in self._positions(first, end):
                q += l
                if q in found:
                    continue
                span = self._chars(q, q + n + len(right))  # the filler and what follows, one read
                filler = span[:n]
                if len(filler) == n and all(_is_han(c) for c in filler):
                    found[q] = (filler, l, _common_prefix(span[n:], right))
        for r, first, end in self._anchored(right, lambda k: right[:k], lambda k: _is_han(right[0])):
            for q in self._positions(first, end):
                q -= n
                if q in found or q < 0:
                    continue
                before = min(q, len(left))
                span = self._chars(q - before, q + n)  # what precedes and the filler, one read
                filler = span[before:]
                if len(filler) == n and all(_is_han(c) for c in filler):
                    found[q] = (filler, _common_suffix(span[:before], left), r)
        best: dict[str, MemoryHit] = {}
        for q in sorted(found):
            filler, l, r = found[q]
            if l + r < MIN_CONTEXT:
                continue
            hit = best.get(filler)
            if hit is None or l + r > hit.context:
                best[filler] = MemoryHit(filler=filler, left=l, right=r, count=1, position=q,
                                         available=len(left) + len(right))
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

    # -- sources -------------------------------------------------------------
    def work_of(self, position: int) -> int:
        """Index of the work holding character ``position``."""
        return bisect.bisect_right(self._work_start, position) - 1

    def work_info(self, index: int) -> dict:
        """Title, author, dynasty and collection of work ``index`` (empty ones left out)."""
        if self._meta_ends is None:  # once: where each record ends (0.4 MB kept, 3 MB read)
            blob = np.frombuffer(self._read(self._meta_at, self._meta_bytes), dtype=np.uint8)
            self._meta_ends = np.nonzero(blob == 10)[0].astype(np.int64)
        ends = self._meta_ends
        start = 0 if index == 0 else int(ends[index - 1]) + 1
        end = int(ends[index]) if index < len(ends) else self._meta_bytes
        fields = self._read(self._meta_at + start, end - start).decode("utf-8", errors="replace").split("\t")
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

