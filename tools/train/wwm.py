"""Whole-word-masking data preparation for ``python -m tools pretrain``.

The pipeline, in the order the data is touched:

1. read every document with :func:`tools.train.corpus.iter_documents` and hold apart the
   test split (:func:`tools.train.corpus.split_documents`) before anything else looks at
   the text; the test passages go to a text file for ``python -m tools evaluate``;
2. count bert-base-chinese token ids over the *training* documents and keep the
   special tokens plus the tokens used at least ``min_freq`` times (optionally
   capped to the most frequent), in their original id order;
3. segment each training document with jieba and tokenize it with the kept
   vocabulary; every token carries a flag "starts a new word" so that masking can
   take all characters of a word together (BERT-wwm);
4. cache the token ids and word-start flags as numpy arrays in the run folder.

:func:`mask_batch` then draws the masks for one batch (dynamic masking: a new draw
every step): 15% of the real tokens, whole words at a time, 80% ``[MASK]``, 10% a
random token, 10% unchanged; special tokens and ``[UNK]`` are never masked.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tools import ToolError

log = logging.getLogger(__name__)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TEST_FILE = "test_passages.txt"
CACHE_VERSION = 1
# A passage for the cloze evaluation is at most this many characters: short enough
# to fit a 128-token model with room to spare, long enough to give context.
PASSAGE_CHARS = 100


# --------------------------------------------------------------------------- vocab
def read_vocab(path: str | Path) -> list[str]:
    """Read a BERT ``vocab.txt`` (one token a line, line number = id)."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{path}: vocabulary file not found")
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    missing = [s for s in SPECIALS if s not in tokens]
    if missing:
        raise ToolError(f"{path}: vocabulary lacks special tokens {missing}")
    return tokens


def build_vocab(base_tokens: Sequence[str], id_counts: dict[int, int] | np.ndarray,
                min_freq: int = 2, max_size: int | None = None) -> list[str]:
    """Choose the kept vocabulary: specials + tokens used ``>= min_freq`` times.

    ``id_counts`` maps an id of ``base_tokens`` to how often the corpus uses it.
    With ``max_size``, only the most frequent tokens are kept so that the result
    (specials included) has at most ``max_size`` entries. ``[unusedN]`` tokens are
    never kept. The result keeps the original id order, so the kept vocabulary is a
    sub-sequence of the base one.
    """
    counts = np.zeros(len(base_tokens), dtype=np.int64)
    if isinstance(id_counts, dict):
        for i, c in id_counts.items():
            counts[int(i)] = c
    else:
        counts[: len(id_counts)] = np.asarray(id_counts)[: len(base_tokens)]
    special_ids = {i for i, t in enumerate(base_tokens) if t in SPECIALS}
    candidates = [i for i, t in enumerate(base_tokens)
                  if i not in special_ids and counts[i] >= min_freq
                  and not (t.startswith("[unused") and t.endswith("]"))]
    if max_size is not None:
        room = max(0, max_size - len(special_ids))
        # Stable: ties broken by original id so the choice is reproducible.
        candidates = sorted(candidates, key=lambda i: (-counts[i], i))[:room]
    kept = sorted(special_ids | set(candidates))
    return [base_tokens[i] for i in kept]


def write_vocab(tokens: Sequence[str], path: str | Path) -> None:
    """Write ``tokens`` as a BERT ``vocab.txt``."""
    Path(path).write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


def make_tokenizer(vocab_file: str | Path):
    """A ``BertTokenizerFast`` with bert-base-chinese's settings over ``vocab_file``.

    bert-base-chinese does not lowercase (``do_lower_case: false``) and splits every
    CJK character into a word of its own.
    """
    from transformers import BertTokenizerFast

    # transformers 5 takes the vocab file as ``vocab`` (``vocab_file`` is ignored
    # there and yields a 5-token vocabulary).
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=False,
                                  tokenize_chinese_chars=True, strip_accents=None)
    expected = len(read_vocab(vocab_file))
    if len(tokenizer.get_vocab()) != expected:
        raise ToolError(f"{vocab_file}: tokenizer has {len(tokenizer.get_vocab())} tokens, file {expected}")
    return tokenizer


def count_token_ids(tokenizer, texts: Sequence[str], batch: int = 2000) -> np.ndarray:
    """Count how often each token id occurs when ``tokenizer`` encodes ``texts``."""
    counts = np.zeros(len(tokenizer.get_vocab()), dtype=np.int64)
    for start in range(0, len(texts), batch):
        enc = tokenizer(list(texts[start:start + batch]), add_special_tokens=False)["input_ids"]
        for ids in enc:
            np.add.at(counts, ids, 1)
    return counts


# ------------------------------------------------------------------ test passages
def passages_of(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Cut one document into passages of at most ``max_chars`` characters.

    Line breaks are joined (they separate poem lines and record fields); the cut
    falls after the last sentence-ending punctuation inside the window when there is
    one, so passages read as whole sentences.
    """
    flat = "".join(part.strip() for part in text.splitlines())
    out = []
    while flat:
        if len(flat) <= max_chars:
            out.append(flat)
            break
        window = flat[:max_chars]
        cut = max(window.rfind(p) for p in "。！？；!?;")
        cut = cut + 1 if cut >= max_chars // 3 else max_chars
        out.append(flat[:cut])
        flat = flat[cut:]
    return [p for p in out if p.strip()]


def test_passages(docs: Iterable, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Passages of the held-apart documents, in document order (for the cloze test)."""
    out: list[str] = []
    for doc in docs:
        out.extend(passages_of(getattr(doc, "text", doc), max_chars))
    return out


def read_documents(data: str | Path) -> list:
    """All documents under ``data`` (via :func:`tools.train.corpus.iter_documents`), each once.

    A file that is not a corpus (e.g. FewCLUE's ``label_distribution.json``, which
    has a ``.json`` name but holds plain text) is skipped with a warning by
    ``iter_documents`` instead of stopping the whole run.
    """
    # Why there is no per-file retry here: an earlier version re-read a file after a
    # parse error in the middle of it, and list.extend() had already kept the records
    # before the error, so those were read twice (2,866 FewCLUE iflytek documents in
    # the shipped model's corpus cache; see README, "Training and evaluating the
    # compact model").
    from tools.train.corpus import CorpusError, iter_documents

    try:
        docs = list(iter_documents(data))
    except CorpusError as exc:
        raise ToolError(str(exc)) from exc
    if not docs:
        raise ToolError(f"{data}: no documents with Chinese text")
    return docs


def held_apart_passages(data: str | Path, test_fraction: float = 0.02) -> list[str]:
    """The test passages of ``data``, exactly as ``prepare_corpus`` writes them."""
    from tools.train.corpus import split_documents

    return test_passages(split_documents(read_documents(data), test_fraction)[1])


# --------------------------------------------------------------- word segmentation
def word_start_flags(text: str, offsets: Sequence[tuple[int, int]], words: Sequence[str]) -> np.ndarray:
    """For each token (given by its character ``offsets`` in ``text``), 1 if it
    starts a new jieba word, else 0 (it continues the word of the token before).

    ``words`` is jieba's segmentation of ``text`` (their concatenation is ``text``).
    """
    word_of_char = np.empty(len(text), dtype=np.int64)
    pos = 0
    for w_index, word in enumerate(words):
        word_of_char[pos:pos + len(word)] = w_index
        pos += len(word)
    if pos != len(text):
        raise ValueError("segmentation does not cover the text")
    flags = np.ones(len(offsets), dtype=np.uint8)
    prev = -1
    for t, (start, _end) in enumerate(offsets):
        w = word_of_char[start] if start < len(text) else -2
        flags[t] = 0 if w == prev else 1
        prev = w
    return flags


@dataclass
class Prepared:
    """The training stream: token ids and word-start flags, documents joined by [SEP]."""

    ids: np.ndarray          # uint16/int32 [n_tokens]
    word_start: np.ndarray   # uint8 [n_tokens]

    def __len__(self) -> int:
        return len(self.ids)


def encode_documents(texts: Sequence[str], tokenizer, sep_id: int, progress_every: float = 15.0,
                     batch: int = 1000) -> Prepared:
    """Segment ``texts`` with jieba and tokenize them; join the documents with [SEP].

    Shows progress (documents, characters, rate) every ``progress_every`` seconds.
    """
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    total_chars = sum(len(t) for t in texts)
    ids_parts: list[np.ndarray] = []
    flag_parts: list[np.ndarray] = []
    sep = np.array([sep_id], dtype=np.int32)
    sep_flag = np.ones(1, dtype=np.uint8)
    started = last = time.monotonic()
    done_chars = 0
    for start in range(0, len(texts), batch):
        chunk = list(texts[start:start + batch])
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for text, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            if not ids:
                continue
            words = list(jieba.cut(text, HMM=True))
            ids_parts.append(np.asarray(ids, dtype=np.int32))
            flag_parts.append(word_start_flags(text, offsets, words))
            ids_parts.append(sep)
            flag_parts.append(sep_flag)
            done_chars += len(text)
        now = time.monotonic()
        if now - last >= progress_every:
            last = now
            rate = done_chars / max(now - started, 1e-9)
            log.info("segmented %d/%d documents, %.1f/%.1f M chars, %.0f chars/s, ~%.0f s left",
                     min(start + batch, len(texts)), len(texts), done_chars / 1e6, total_chars / 1e6,
                     rate, (total_chars - done_chars) / max(rate, 1e-9))
    if not ids_parts:
        raise ToolError("the training corpus produced no tokens")
    return Prepared(ids=np.concatenate(ids_parts), word_start=np.concatenate(flag_parts))


def prepare_corpus(data: str | Path, out_dir: str | Path, base_vocab: str | Path,
                   test_fraction: float = 0.02, min_freq: int = 2, max_vocab: int | None = None) -> dict:
    """Run the whole preparation once and cache it under ``out_dir``; return its meta.

    Files written: ``test_passages.txt`` (held-apart passages, one a line),
    ``vocab.txt`` (kept vocabulary), ``ids.npy``, ``word_start.npy``, ``prep.json``
    (settings and counts). A second call with the same settings reuses the cache.
    """
    from tools.train.corpus import split_documents

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "prep.json"
    settings = {"cache_version": CACHE_VERSION, "data": str(Path(data).resolve()),
                "test_fraction": test_fraction, "min_freq": min_freq, "max_vocab": max_vocab,
                "base_vocab": str(Path(base_vocab).resolve())}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("settings") == settings and all(
                (out_dir / f).is_file() for f in ("ids.npy", "word_start.npy", "vocab.txt", TEST_FILE)):
            log.info("using cached prepared data in %s (%d tokens)", out_dir, meta["train_tokens"])
            return meta
        log.info("cached data in %s was made with other settings; preparing again", out_dir)

    t0 = time.monotonic()
    log.info("reading documents from %s (traditional → simplified)", data)
    train_docs, test_docs = split_documents(read_documents(data), test_fraction)
    if not train_docs:
        raise ToolError(f"{data}: no training documents")
    passages = test_passages(test_docs)
    (out_dir / TEST_FILE).write_text("".join(p + "\n" for p in passages), encoding="utf-8")
    log.info("%d train / %d test documents (%.1f s); %d test passages → %s",
             len(train_docs), len(test_docs), time.monotonic() - t0, len(passages), out_dir / TEST_FILE)

    texts = [d.text for d in train_docs]
    base_tokens = read_vocab(base_vocab)
    counts = count_token_ids(make_tokenizer(base_vocab), texts)
    kept = build_vocab(base_tokens, counts, min_freq=min_freq, max_size=max_vocab)
    kept_index = {t: i for i, t in enumerate(base_tokens)}
    # Coverage: share of the corpus tokens that stay themselves (not [UNK]); tokens
    # bert-base-chinese itself maps to [UNK] count as not covered.
    covered = int(sum(counts[kept_index[t]] for t in kept if t != "[UNK]"))
    coverage = covered / max(int(counts.sum()), 1)
    write_vocab(kept, out_dir / "vocab.txt")
    log.info("vocabulary: kept %d of %d tokens (min_freq %d, cap %s); token coverage %.4f%%",
             len(kept), len(base_tokens), min_freq, max_vocab, 100 * coverage)

    tokenizer = make_tokenizer(out_dir / "vocab.txt")
    prepared = encode_documents(texts, tokenizer, sep_id=tokenizer.sep_token_id)
    dtype = np.uint16 if len(kept) < 2**16 else np.int32
    np.save(out_dir / "ids.npy", prepared.ids.astype(dtype))
    np.save(out_dir / "word_start.npy", prepared.word_start)
    unk = int((prepared.ids == tokenizer.unk_token_id).sum())
    meta = {"settings": settings, "train_documents": len(train_docs), "test_documents": len(test_docs),
            "test_passages": len(passages), "train_chars": sum(len(t) for t in texts),
            "train_tokens": int(len(prepared)), "unk_tokens": unk, "vocab_size": len(kept),
            "base_vocab_size": len(base_tokens), "token_coverage": coverage,
            "prepare_seconds": round(time.monotonic() - t0, 1)}
    meta_path.write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    log.info("prepared %d tokens in %.0f s → %s", len(prepared), meta["prepare_seconds"], out_dir)
    return meta


def load_prepared(out_dir: str | Path) -> Prepared:
    """Load the cached arrays written by :func:`prepare_corpus`."""
    out_dir = Path(out_dir)
    ids = np.load(out_dir / "ids.npy")
    flags = np.load(out_dir / "word_start.npy")
    if len(ids) != len(flags):
        raise ToolError(f"{out_dir}: ids.npy and word_start.npy differ in length")
    return Prepared(ids=ids, word_start=flags)


# ------------------------------------------------------------------------ masking
def chunk_starts(n_tokens: int, body_len: int) -> np.ndarray:
    """Start offsets of the fixed-length chunks (``body_len`` tokens) of the stream."""
    if n_tokens < body_len:
        return np.zeros(1, dtype=np.int64)
    return np.arange(0, n_tokens - body_len + 1, body_len, dtype=np.int64)


def make_batch(prepared: Prepared, starts: Sequence[int], seq_len: int, cls_id: int, sep_id: int,
               pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut sequences ``[CLS] body [SEP]`` of ``seq_len`` tokens from the stream.

    Returns (input_ids int64 [B, seq_len], word_start uint8 [B, seq_len],
    attention_mask int64 [B, seq_len]); [CLS], [SEP] and padding get word_start 1.
    """
    body = seq_len - 2
    batch = len(starts)
    ids = np.full((batch, seq_len), pad_id, dtype=np.int64)
    flags = np.ones((batch, seq_len), dtype=np.uint8)
    attn = np.zeros((batch, seq_len), dtype=np.int64)
    for row, s in enumerate(starts):
        piece = prepared.ids[s:s + body].astype(np.int64)
        n = len(piece)
        ids[row, 0] = cls_id
        ids[row, 1:1 + n] = piece
        ids[row, 1 + n] = sep_id
        flags[row, 1:1 + n] = prepared.word_start[s:s + n]
        flags[row, 1] = 1  # a chunk may start inside a word: treat that piece as a word
        attn[row, :n + 2] = 1
    return ids, flags, attn


def mask_batch(ids: np.ndarray, word_start: np.ndarray, rng: np.random.Generator, mask_id: int,
               vocab_size: int, never_mask: Sequence[int], mask_prob: float = 0.15,
               random_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Whole-word masking of one batch (BERT-wwm recipe).

    Per sequence: the eligible tokens (not in ``never_mask``) are grouped into words
    by ``word_start``; words are taken in random order until ``round(mask_prob × n
    eligible)`` tokens are covered (a word that would overshoot is skipped, as in
    Google's ``create_pretraining_data.py``). Each chosen token becomes ``[MASK]``
    with probability 0.8, a random token (from ``random_ids``, default every
    non-special id) with 0.1, and stays with 0.1.

    Returns (masked input ids, labels) where labels are -100 except at chosen tokens.
    """
    never = np.asarray(sorted(set(never_mask)), dtype=np.int64)
    if random_ids is None:
        random_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), never)
    inputs = ids.copy()
    labels = np.full(ids.shape, -100, dtype=np.int64)
    for row in range(ids.shape[0]):
        eligible = ~np.isin(ids[row], never)
        n_eligible = int(eligible.sum())
        if n_eligible == 0:
            continue
        target = max(1, int(round(n_eligible * mask_prob)))
        # Words: maximal runs of eligible tokens, split where word_start is 1.
        positions = np.flatnonzero(eligible)
        starts_here = word_start[row, positions].astype(bool)
        starts_here |= np.r_[True, np.diff(positions) != 1]
        word_ids = np.cumsum(starts_here) - 1
        n_words = int(word_ids[-1]) + 1
        bounds = np.searchsorted(word_ids, np.arange(n_words + 1))
        chosen: list[np.ndarray] = []
        covered = 0
        for w in rng.permutation(n_words):
            size = int(bounds[w + 1] - bounds[w])
            if covered + size > target:
                continue
            chosen.append(positions[bounds[w]:bounds[w + 1]])
            covered += size
            if covered >= target:
                break
        if not chosen:
            continue
        pick = np.concatenate(chosen)
        labels[row, pick] = ids[row, pick]
        roll = rng.random(len(pick))
        to_mask = pick[roll < 0.8]
        to_random = pick[(roll >= 0.8) & (roll < 0.9)]
        inputs[row, to_mask] = mask_id
        if len(to_random):
            inputs[row, to_random] = rng.choice(random_ids, size=len(to_random))
    return inputs, labels
