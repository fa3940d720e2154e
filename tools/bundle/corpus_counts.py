"""Corpus counts for the vocabulary trim and the build's checks (``tools trim``,
``tools build``, ``tools verify``).

Over the training split of a corpus (a file or folder of ``.json``/``.txt``, read with
:mod:`tools.train.corpus`): how often each CJK character and each maximal non-CJK,
non-space run occurs, plus a sample of held-apart (test split) texts for evaluation
and a sample of training texts for static INT8 calibration. BERT's pre-tokenizer
makes every CJK character a word of its own, so these counts are all
:mod:`tools.bundle.trim_vocab` needs to get exact token frequencies cheaply. Reading
a whole corpus is slow, so the counts are cached by corpus path + file sizes/mtimes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tools import ToolError

log = logging.getLogger(__name__)

# BERT's _is_chinese_char ranges (what BertNormalizer(handle_chinese_chars) splits off).
_CJK_RANGES = (
    "\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff"
    "\U00020000-\U0002a6df\U0002a700-\U0002b73f\U0002b740-\U0002b81f"
    "\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f"
)
CJK_CHAR_RE = re.compile(f"[{_CJK_RANGES}]")
NON_CJK_RUN_RE = re.compile(f"[^\\s{_CJK_RANGES}]+")

CACHE_VERSION = 1
MAX_TEST_TEXTS = 4000
# Training-split documents kept for static INT8 calibration: one in CALIBRATION_EVERY
# (by a hash of the text, so the choice does not depend on file order), at most
# MAX_CALIBRATION_TEXTS of them.
MAX_CALIBRATION_TEXTS = 256
CALIBRATION_EVERY = 97


@dataclass
class CorpusStats:
    """Character and non-CJK-run counts over a corpus's training split, plus a sample
    of held-apart (test split) texts for evaluation."""

    chars: Counter  # CJK character -> count
    runs: Counter  # maximal non-CJK, non-space run -> count
    test_texts: list[str] = field(default_factory=list)
    documents: int = 0
    source: str = ""
    calibration_texts: list[str] = field(default_factory=list)  # training split, for static INT8

    @property
    def total_chars(self) -> int:
        """Non-whitespace characters counted (CJK + non-CJK runs)."""
        return sum(self.chars.values()) + sum(len(r) * n for r, n in self.runs.items())


def count_texts(texts: Iterable[str]) -> tuple[Counter, Counter, int]:
    """Count CJK characters and non-CJK runs over ``texts``; return (chars, runs, n_texts)."""
    chars: Counter = Counter()
    runs: Counter = Counter()
    n = 0
    for text in texts:
        n += 1
        chars.update(CJK_CHAR_RE.findall(text))
        runs.update(NON_CJK_RUN_RE.findall(text))
    return chars, runs, n


def _cache_key(corpus: Path) -> str:
    from tools.train.corpus import corpus_files

    digest = hashlib.sha256(f"v{CACHE_VERSION}:{corpus.resolve()}".encode())
    for file in corpus_files(corpus):
        stat = file.stat()
        digest.update(f"{file}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    """Where corpus counts are cached (``$EDGE_TOOLS_CACHE`` or ``~/.cache/edge-tools``)."""
    return Path(os.environ.get("EDGE_TOOLS_CACHE", Path.home() / ".cache" / "edge-tools"))


def corpus_stats(corpus: str | Path, use_cache: bool = True) -> CorpusStats:
    """Count the training split of a corpus (file or folder of ``.json``/``.txt``).

    Documents are read with ``tools.train.corpus.iter_documents`` (simplified Chinese) and
    split with ``split_documents``; only the training split is counted, and up to
    ``MAX_TEST_TEXTS`` test-split texts are kept for evaluation. Results are cached
    by corpus path + file sizes/mtimes, because reading the whole corpus is slow.
    """
    from tools.train.corpus import CorpusError, corpus_files, is_test_document, iter_documents

    corpus = Path(corpus).expanduser()
    if not corpus.exists():
        raise ToolError(f"{corpus}: corpus path does not exist")
    try:
        key = _cache_key(corpus)
    except CorpusError as exc:
        raise ToolError(str(exc)) from exc
    cache_file = cache_dir() / f"corpus-v2-{key}.json"  # v2: with calibration_texts
    if use_cache and cache_file.is_file():
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        log.info("corpus counts from cache %s (%d documents)", cache_file, data["documents"])
        return CorpusStats(Counter(data["chars"]), Counter(data["runs"]), data["test_texts"],
                           data["documents"], str(corpus), data["calibration_texts"])

    start = time.monotonic()
    test_texts: list[str] = []
    calibration_texts: list[str] = []
    chars: Counter = Counter()
    runs: Counter = Counter()
    documents = 0
    files = corpus_files(corpus)
    skipped = []
    for number, file in enumerate(files, 1):
        try:
            # Read a whole file before counting, so an unreadable one is skipped entirely
            # (e.g. a label summary saved with a .json name inside a data set folder).
            docs = list(iter_documents(file))
        except (CorpusError, UnicodeDecodeError) as exc:
            if len(files) == 1:
                raise ToolError(str(exc)) from exc
            skipped.append(file.name)
            log.warning("skipping %s", exc)
            continue
        for doc in docs:
            if is_test_document(doc.text, 0.02):  # same rule as tools.train.corpus.split_documents
                if len(test_texts) < MAX_TEST_TEXTS:
                    test_texts.append(doc.text)
                continue
            documents += 1
            if (len(calibration_texts) < MAX_CALIBRATION_TEXTS
                    and zlib.crc32(doc.text.encode("utf-8")) % CALIBRATION_EVERY == 0):
                calibration_texts.append(doc.text)
            chars.update(CJK_CHAR_RE.findall(doc.text))
            runs.update(NON_CJK_RUN_RE.findall(doc.text))
        if number % 20 == 0:
            log.info("  read %d/%d files, %d documents (%.0f s)", number, len(files), documents,
                     time.monotonic() - start)
    if not chars:
        raise ToolError(f"{corpus}: no Chinese text found in the corpus")
    log.info("counted %d training documents, %d CJK characters, in %.1f s",
             documents, sum(chars.values()), time.monotonic() - start)
    stats = CorpusStats(chars, runs, test_texts, documents, str(corpus), calibration_texts)
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"documents": documents, "chars": chars, "runs": runs,
                                       "test_texts": test_texts, "calibration_texts": calibration_texts},
                                      ensure_ascii=False), encoding="utf-8")
            tmp.replace(cache_file)
        except OSError as exc:  # a read-only home must not stop the build
            log.warning("cannot write corpus cache %s: %s", cache_file, exc)
    return stats


def default_corpus() -> Path | None:
    """``../shared/data`` relative to the repository, when it exists."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return path if path.is_dir() else None
