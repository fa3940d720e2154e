"""The development data the fusion weights are fitted on, and nothing else:

- the held-apart cloze split (:func:`tools.train.wwm.held_apart_passages`) *minus* the
  passages that ``tools evaluate`` measures (its first ``EVAL_CLOZE_ITEMS`` items with
  seed 0), so the reported cloze figures stay untouched by the fit; from the rest,
  one-character blanks, blanks of a whole word (2-4 characters, jieba's words) and
  ``blank_length: "auto"`` blanks over a word of 1-4 characters;
- ChID ``dev_few_all.json`` (idiom choice);
- the 16 everyday sentences (:mod:`tools.evaluation.everyday`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from tools.evaluation.everyday import EVERYDAY

EVAL_CLOZE_ITEMS = 2000  # what `tools evaluate` measures by default (seed 0)
HAN_WORD_RE = re.compile(r"^[\u3400-\u4dbf\u4e00-\u9fff]+$")
MASK = "[MASK]"


@dataclass(frozen=True)
class BlankItem:
    """A development query: ``text`` with its blank, the answer, and how it is asked."""

    text: str
    answer: str
    blank_length: int | str | None = None  # None: as many characters as masks
    set: str = ""


def fit_passages(passages: Sequence[str], eval_items: int = EVAL_CLOZE_ITEMS) -> list[str]:
    """The held-apart passages that ``tools evaluate`` does not measure."""
    from tools.evaluation.items import make_cloze_items

    used = {item.passage for item in make_cloze_items(passages, eval_items, seed=0)}
    return [p for i, p in enumerate(passages) if i not in used]


def char_items(passages: Sequence[str], count: int, seed: int = 1) -> list[BlankItem]:
    """One random Han character of a passage masked (as ``tools evaluate`` does)."""
    from tools.evaluation.items import make_cloze_items

    return [BlankItem(i.text, i.answer, None, "cloze-char") for i in make_cloze_items(passages, count, seed)]


def word_items(passages: Sequence[str], count: int, seed: int = 2, lengths=(2, 3, 4),
               auto: bool = False) -> list[BlankItem]:
    """A random jieba word of ``lengths`` characters masked: as that many masks, or
    (``auto``) as one mask with ``blank_length: "auto"``."""
    import jieba

    jieba.setLogLevel(60)
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    items: list[BlankItem] = []
    for index in order:
        if len(items) >= count:
            break
        passage = passages[index]
        spans, at = [], 0
        for word in jieba.cut(passage):
            if len(word) in lengths and HAN_WORD_RE.match(word):
                spans.append((at, word))
            at += len(word)
        if not spans:
            continue
        at, word = rng.choice(spans)
        blank = MASK if auto else MASK * len(word)
        items.append(BlankItem(passage[:at] + blank + passage[at + len(word):], word,
                               "auto" if auto else None, "cloze-auto" if auto else "cloze-word"))
    return items


def everyday_items() -> list[BlankItem]:
    """The 16 everyday sentences."""
    return [BlankItem(text, answer, None, "everyday") for text, answer in EVERYDAY]
