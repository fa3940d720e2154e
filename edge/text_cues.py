"""What the query's own text says about a blank, beyond its immediate neighbours.

Two cues, both computed from the text alone (no model, no file):

- **echo**: the filler occurs elsewhere in the same text between the same neighbours
  (诗经's refrains 有杕之杜，生于道左 … 有杕之杜，生于道周; a name or a term a news item
  repeats). :func:`echoes` finds, for a blank of ``n`` characters, every ``n``-character
  Han string of the text whose left and right neighbours match the blank's, with how many
  characters matched (left + right, at least 2). On the held-apart passages such a
  repeat was the answer 58% of the time when 3+ characters matched (81 of 139 blanks).
- **cohesion**: the filler's characters already appear in the text around it. Idioms in
  particular echo their passage (ChID: 雪中送炭 in a passage about help that came in
  time, 炭 or 雪 elsewhere in it), so each of the filler's distinct characters found in the
  text counts by how rare it is (``-log10`` of its unigram probability under the word LM:
  的 or 是 say nothing, 炭 a lot). Measured on ChID with the weights fitted on one half of
  ``dev_few_all`` and scored on the other: 30.5% → 36.3% (mean of 10 × 2 folds).
"""

from __future__ import annotations

from typing import Callable

BLANK = "\x00"  # stands for the blank's own characters while searching the text
MIN_ECHO_CONTEXT = 2  # characters of matched neighbours an echo needs (one says nothing)
MAX_ECHO_SIDE = 8  # characters compared on each side
# Cohesion: a character counts by how much rarer than 1 in 10,000 (log10 4) it is, capped
# at 1 in a million, so that common characters (的, 是, 人, 大, 心) count nothing. The
# baseline was chosen by 10 × 2-fold cross-validation within ChID dev_few_all (fitting
# the weights on one half, scoring the other): 34.0% with 2.5, 34.9% with 3.0, 35.4% with
# 3.5, 36.3% with 4.0.
COMMON_RARITY, MAX_RARITY = 4.0, 6.0


def _is_han(ch: str) -> bool:
    o = ord(ch)
    return 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2EBEF


def echoes(left: str, n: int, right: str, max_side: int = MAX_ECHO_SIDE,
           min_context: int = MIN_ECHO_CONTEXT) -> dict[str, int]:
    """Fillers of ``n`` Han characters that occur elsewhere in ``left + blank + right``
    between the blank's neighbours: filler → the most neighbour characters matched
    (left + right, each side up to ``max_side``, at least ``min_context``)."""
    text = left + BLANK * n + right
    blank = len(left)
    starts: set[int] = set()
    # A match has the blank's left neighbour just before it or its right neighbour just
    # after it: str.find over those two characters visits only such places.
    for ch, shift in ((left[-1:], 1), (right[:1], -n)):
        if not ch:
            continue
        at = text.find(ch)
        while at >= 0:
            starts.add(at + shift)
            at = text.find(ch, at + 1)
    found: dict[str, int] = {}
    for p in starts:
        if p < 0 or p + n > len(text) or (p < blank + n and p + n > blank):
            continue  # off the text, or overlapping the blank itself
        filler = text[p:p + n]
        if not all(_is_han(c) for c in filler):
            continue
        k = 0
        while k < max_side and p - 1 - k >= 0 and blank - 1 - k >= 0 \
                and text[p - 1 - k] == text[blank - 1 - k] != BLANK:
            k += 1
        j = 0
        while j < max_side and p + n + j < len(text) and blank + n + j < len(text) \
                and text[p + n + j] == text[blank + n + j] != BLANK:
            j += 1
        if k + j >= min_context and k + j > found.get(filler, 0):
            found[filler] = k + j
    return found


def cohesion(filler: str, context_chars: set[str], rarity: Callable[[str], float]) -> float:
    """How much the filler's characters echo the text: the sum, over its distinct
    characters found in ``context_chars``, of their rarity above :data:`COMMON_RARITY`
    (``rarity``: ``-log10`` of the character's unigram probability), halved."""
    total = 0.0
    for ch in set(filler):
        if ch in context_chars:
            total += max(min(rarity(ch), MAX_RARITY) - COMMON_RARITY, 0.0)
    return total / 2.0
