"""The evaluation's items: random-character cloze blanks on held-apart passages and
ChID idiom questions, read and checked (a bad file stops with its name and line)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tools import ToolError

CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Text the engine reads as a blank (or that would make the passage ambiguous).
BLANK_LIKE_RE = re.compile(r"[\[［]\s*MASK\s*[\]］]", re.IGNORECASE)
IDIOM = "#idiom#"
MASK = "[MASK]"


@dataclass(frozen=True)
class ClozeItem:
    """One cloze query: ``text`` has one ``[MASK]`` where ``answer`` was."""

    text: str
    answer: str
    passage: int


@dataclass(frozen=True)
class ChidItem:
    """One ChID question: ``text`` has one blank of four ``[MASK]``."""

    text: str
    candidates: tuple[str, ...]
    answer: int
    line: int


def make_cloze_items(passages: Sequence[str], count: int | None, seed: int = 0) -> list[ClozeItem]:
    """Pick up to ``count`` passages (seeded order) and mask one random CJK character in each.

    Passages without a CJK character or that already contain a blank marker are
    left out.
    """
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    items: list[ClozeItem] = []
    for index in order:
        if count is not None and len(items) >= count:
            break
        passage = passages[index].strip()
        if BLANK_LIKE_RE.search(passage):
            continue
        positions = [m.start() for m in CJK_RE.finditer(passage)]
        if not positions:
            continue
        at = rng.choice(positions)
        items.append(ClozeItem(text=passage[:at] + MASK + passage[at + 1:], answer=passage[at], passage=index))
    return items


def read_passages(path: str | Path) -> list[str]:
    """Passages of a text file, one a line (empty lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{path}: cloze text file not found")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise ToolError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    passages = [line.strip() for line in lines if line.strip()]
    if not passages:
        raise ToolError(f"{path}: no passages (expected one passage a line)")
    return passages


def chid_text(content: str, blank_chars: int = 4) -> str:
    """ChID content with its first ``#idiom#`` as the blank and the others removed."""
    first = content.find(IDIOM)
    if first < 0:
        raise ValueError(f"no {IDIOM} in the content")
    before = content[:first].replace(IDIOM, "")
    after = content[first + len(IDIOM):].replace(IDIOM, "")
    # Remove anything the engine would read as a second blank.
    before, after = BLANK_LIKE_RE.sub("", before), BLANK_LIKE_RE.sub("", after)
    return before + MASK * blank_chars + after


def read_chid(path: str | Path, count: int | None = None) -> list[ChidItem]:
    """Read ChID questions (FewCLUE JSON lines: content, candidates, answer)."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{path}: ChID file not found")
    items: list[ChidItem] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        if count is not None and len(items) >= count:
            break
        try:
            record = json.loads(line)
            content, candidates, answer = record["content"], record["candidates"], record["answer"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ToolError(f"{path}:{number}: not a ChID record with content/candidates/answer ({exc})") from exc
        if not isinstance(candidates, list) or not candidates or not isinstance(answer, int) \
                or not 0 <= answer < len(candidates):
            raise ToolError(f"{path}:{number}: answer {answer!r} does not index the candidates")
        try:
            text = chid_text(content, max(len(c) for c in candidates))
        except ValueError as exc:
            raise ToolError(f"{path}:{number}: {exc}") from exc
        items.append(ChidItem(text=text, candidates=tuple(candidates), answer=answer, line=number))
    if not items:
        raise ToolError(f"{path}: no ChID questions")
    return items
