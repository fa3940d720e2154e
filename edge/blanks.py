"""Finding the blanks in a query.

A blank is written ``[MASK]`` (any letter case; the full-width ``［MASK］`` too).
Adjacent masks form one blank of that many characters: ``[MASK][MASK][MASK][MASK]``
is one four-character blank (an idiom, say), not four guesses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# One run of adjacent masks (whitespace between them is allowed and ignored).
MASK_RUN_RE = re.compile(r"(?:[\[［]MASK[\]］]\s*)*[\[［]MASK[\]］]", re.IGNORECASE)
SINGLE_MASK_RE = re.compile(r"[\[［]MASK[\]］]", re.IGNORECASE)


@dataclass(frozen=True)
class Blank:
    """One blank: where it stands in the input text and how many masks it has."""

    start: int  # character offset of the blank's first mask in the input text
    end: int  # character offset just past its last mask
    n_masks: int  # masks written (characters the blank stands for)


def find_blanks(text: str) -> tuple[list[str], list[Blank]]:
    """Split ``text`` into the pieces between blanks and the blanks themselves.

    Returns ``(segments, blanks)`` with ``len(segments) == len(blanks) + 1``:
    ``segments[0] + blank0 + segments[1] + blank1 + …`` rebuilds the text.
    """
    segments: list[str] = []
    blanks: list[Blank] = []
    cursor = 0
    for match in MASK_RUN_RE.finditer(text):
        segments.append(text[cursor:match.start()])
        n_masks = len(SINGLE_MASK_RE.findall(match.group()))
        blanks.append(Blank(start=match.start(), end=match.end(), n_masks=n_masks))
        cursor = match.end()
    segments.append(text[cursor:])
    return segments, blanks


def window_start(first: int, span: int, length: int, size: int) -> int:
    """Where a window of ``size`` tokens starts in a sequence of ``length`` tokens so
    that the ``span`` tokens from ``first`` on sit in its middle (as far as the ends
    allow): how the engine cuts a text longer than the model's positions."""
    return max(0, min(first - (size - span) // 2, length - size))
