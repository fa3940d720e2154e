"""Inputs of ``python -m tools bench``: real held-apart sentences with blanks.

Sets (token counts with [CLS]/[SEP], bert-base-chinese tokenizer): ``short`` (12..32
tokens, one blank), ``long`` (exactly ``--long-tokens``, one blank), ``short_4``
(short, a 4-character blank), ``agree`` (single blanks for INT8 vs FP32) and
``load_pool`` (unmasked sentences the HTTP load test masks at varying places).
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from pathlib import Path
from typing import Any

from tools import ToolError

log = logging.getLogger(__name__)

SETS = ("short", "long", "short_4")
MASK = "[MASK]"
CJK_RE = re.compile(r"[\u4e00-\u9fff]")
# Inputs are kept free of ASCII letters/digits/whitespace, so that every character is
# one token under any of the compared tokenizers (full or trimmed vocabulary) and the
# token counts (32 / 128) hold for all systems.
UNWANTED_RE = re.compile(r"[A-Za-z0-9\s\u2028\u2029\u0085]")
SENTENCE_END_RE = re.compile(r"(?<=[。！？；!?;])")


def _held_apart_documents(data: Path, per_file: int, seed: int, test_fraction: float = 0.02) -> list[str]:
    """Texts of the held-apart (test split) documents under ``data``, corpora mixed.

    The split is :func:`tools.train.corpus.is_test_document`, the one the toolchain and
    the training run use. At most ``per_file`` documents per file; the documents of
    each top-level folder (FewCLUE's modern text, chinese-poetry's classical text)
    are shuffled and then interleaved, so both kinds of text are represented. Files
    that are not corpora (FewCLUE's label_distribution.json) are skipped by
    :func:`tools.train.wwm.read_documents`.
    """
    from tools.train.corpus import CorpusError, corpus_files, is_test_document
    from tools.train.wwm import read_documents

    try:
        files = corpus_files(data)
    except CorpusError as exc:
        raise ToolError(str(exc)) from exc
    groups: dict[str, list[str]] = {}
    for file in files:
        try:
            docs = read_documents(file)
        except ToolError as exc:
            log.debug("skipping %s: %s", file, exc)
            continue
        parts = file.relative_to(data).parts if data.is_dir() else (file.name,)
        held = [d.text for d in docs if is_test_document(d.text, test_fraction)]
        groups.setdefault(parts[0], []).extend(held[:per_file])
    rng = random.Random(seed)
    for texts in groups.values():
        rng.shuffle(texts)
    mixed = [text for batch in itertools.zip_longest(*groups.values()) for text in batch if text is not None]
    if not mixed:
        raise ToolError(f"{data}: no held-apart documents found")
    log.info("held-apart documents: %s", ", ".join(f"{k} {len(v)}" for k, v in groups.items()))
    return mixed


def _clean_pieces(text: str) -> list[str]:
    """Sentence-sized pieces of a document with no ASCII alphanumerics or spaces."""
    pieces = []
    for line in text.split("\n"):
        for sentence in SENTENCE_END_RE.split(line.strip()):
            sentence = sentence.strip()
            if sentence and not UNWANTED_RE.search(sentence):
                pieces.append(sentence)
    return pieces


def mask_one(text: str, rng: random.Random) -> tuple[str, str] | None:
    """Replace one random CJK character with [MASK]; return (masked, answer)."""
    spots = [i for i, ch in enumerate(text) if CJK_RE.match(ch)]
    if not spots:
        return None
    i = rng.choice(spots)
    return text[:i] + MASK + text[i + 1:], text[i]


def mask_run(text: str, rng: random.Random, length: int = 4) -> tuple[str, str] | None:
    """Replace ``length`` consecutive CJK characters with [MASK] x length."""
    spots = [i for i in range(len(text) - length + 1) if all(CJK_RE.match(c) for c in text[i:i + length])]
    if not spots:
        return None
    i = rng.choice(spots)
    return text[:i] + MASK * length + text[i + length:], text[i:i + length]


def build_inputs(data: Path, tokenizer_path: Path, n_per_set: int, n_agree: int, n_load: int,
                 long_tokens: int = 128, seed: int = 0) -> dict[str, Any]:
    """Pick the benchmark inputs from held-apart corpus text.

    - ``short``: one sentence of 12..32 tokens (with [CLS]/[SEP]), one CJK char masked;
    - ``long``: a passage cut to exactly ``long_tokens`` tokens, one char masked;
    - ``short_4``: short sentences with 4 consecutive CJK chars masked;
    - ``agree``: single-blank short sentences and long passages for INT8 vs FP32;
    - ``load_pool``: short unmasked sentences the load test masks at varying places.
    Token counts are taken with the bert-base-chinese tokenizer.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    rng = random.Random(seed)
    docs = _held_apart_documents(data, per_file=400, seed=seed)

    def n_tokens(text: str) -> int:
        return len(tokenizer.encode(text).ids)  # with [CLS] and [SEP]

    shorts, longs = [], []
    seen = set()
    for doc in docs:
        # At most two sentences per document, so no one document dominates.
        pieces = [p for p in _clean_pieces(doc) if p not in seen and len(CJK_RE.findall(p)) >= 8
                  and 12 <= n_tokens(p) <= 32]
        for piece in rng.sample(pieces, min(2, len(pieces))):
            seen.add(piece)
            shorts.append(piece)
        flat = "".join(p for p in _clean_pieces(doc))
        if len(flat) >= long_tokens and flat not in seen:
            enc = tokenizer.encode(flat, add_special_tokens=False)
            if len(enc.ids) >= long_tokens - 2:
                cut = enc.offsets[long_tokens - 3][1]
                passage = flat[:cut]
                if n_tokens(passage) == long_tokens:
                    seen.add(flat)
                    longs.append(passage)
    n_long_agree = n_agree // 3
    need_short = 2 * n_per_set + (n_agree - n_long_agree) + n_load
    if len(shorts) < need_short or len(longs) < n_per_set + n_long_agree:
        log.warning("held-apart text gave %d short sentences (wanted %d) and %d long passages (wanted %d)",
                    len(shorts), need_short, len(longs), n_per_set + n_long_agree)
    if not shorts or not longs:
        raise ToolError(f"{data}: not enough held-apart text for the benchmark inputs")

    def items(texts: list[str], masker) -> list[dict[str, Any]]:
        out = []
        for text in texts:
            masked = masker(text, rng)
            if masked:
                out.append({"text": masked[0], "answer": masked[1], "tokens": n_tokens(masked[0])})
        return out

    take = iter(shorts)
    short_set = [next(take) for _ in range(min(n_per_set, len(shorts)))]
    four_set = [t for t in take if len(t) >= 10][:n_per_set]
    rest = shorts[len(short_set) + n_per_set:]
    agree_short = rest[: n_agree - n_long_agree]
    load_pool = rest[len(agree_short):][:n_load]
    inputs = {
        "source": f"held-apart documents (tools.train.corpus.is_test_document, 2%) of {data}",
        "tokenizer": str(tokenizer_path),
        "seed": seed,
        "short": items(short_set, mask_one),
        "long": items(longs[:n_per_set], mask_one),
        "short_4": items(four_set, mask_run),
        "agree": items(agree_short, mask_one) + items(longs[n_per_set:n_per_set + n_long_agree], mask_one),
        "load_pool": load_pool or short_set,
    }
    for name in ("short", "long", "short_4", "agree"):
        counts = [item["tokens"] for item in inputs[name]]
        log.info("inputs %-8s %3d texts, %d..%d tokens", name, len(counts), min(counts, default=0),
                 max(counts, default=0))
    return inputs


def load_text(pool: list[str], i: int, seed: int = 0) -> str:
    """The i-th load-test text: sentence ``i % n`` masked at its ``i // n``-th CJK
    character (in a seeded order), so texts stay distinct across a whole test."""
    sentence = pool[i % len(pool)]
    spots = [k for k, ch in enumerate(sentence) if CJK_RE.match(ch)]
    random.Random(f"{seed}:{i % len(pool)}").shuffle(spots)
    k = spots[(i // len(pool)) % len(spots)]
    return sentence[:k] + MASK + sentence[k + 1:]

