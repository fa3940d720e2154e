"""Reading Chinese text corpora: FewCLUE JSON lines, chinese-poetry JSON, plain text.

Every record (a JSON line, an element of a top-level JSON list, or a line of a
``.txt`` file) is one *document*; the train/test split is made by document, from a
stable hash of its text, before anything else sees the data. Traditional characters
are converted to simplified ones (chinese-poetry is traditional).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

# Keys whose string values (or lists of strings) hold running text in the corpora
# of ../shared/data. Labels, ids, titles and candidate lists are left out.
TEXT_KEYS = {
    "sentence", "sentence1", "sentence2", "content", "abst", "text",
    "paragraphs", "para", "paragraph",
}
# Evaluation sets that must never be trained on: ChID dev is the idiom benchmark.
EVAL_ONLY_FILES = {"dev_few_all.json"}
CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
IDIOM_PLACEHOLDER = "#idiom#"
log = logging.getLogger(__name__)


class CorpusError(ValueError):
    """A corpus path does not exist or holds nothing readable."""


@dataclass(frozen=True)
class Document:
    """One record of a corpus: its source file and its text (simplified)."""

    source: str
    text: str


@dataclass(frozen=True)
class IdiomQuestion:
    """A ChID-style record whose answer is not given (FewCLUE's ``unlabeled.json``): the
    text around its one ``#idiom#`` and the candidate idioms, simplified, with the
    document text training reads for it (for the held-apart rule)."""

    document: str
    left: str
    right: str
    candidates: tuple[str, ...]


@lru_cache(maxsize=1)
def _t2s():
    """Return a traditional→simplified converter (OpenCC tables, pure Python)."""
    from opencc import OpenCC  # toolchain-only dependency

    return OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Convert traditional Chinese characters to simplified ones."""
    return _t2s().convert(text)


def _strings_under(value, under_text_key: bool) -> Iterator[str]:
    if isinstance(value, str):
        if under_text_key:
            yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings_under(item, under_text_key)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings_under(item, under_text_key or key in TEXT_KEYS)


def record_text(record) -> str:
    """Join the running-text fields of one JSON record into one document text.

    ChID's ``#idiom#`` placeholder is filled with the answer when the record has
    one, and otherwise the text is split there (a newline), so no placeholder
    reaches training.
    """
    if isinstance(record, dict) and IDIOM_PLACEHOLDER in str(record.get("content", "")):
        content = record["content"]
        candidates, answer = record.get("candidates"), record.get("answer")
        if isinstance(candidates, list) and isinstance(answer, int) and 0 <= answer < len(candidates):
            content = content.replace(IDIOM_PLACEHOLDER, candidates[answer], 1)
        record = dict(record, content=content.replace(IDIOM_PLACEHOLDER, "\n"))
    parts = [s.strip() for s in _strings_under(record, False) if s.strip()]
    return "\n".join(parts)


def _records_of_json_file(path: Path) -> Iterator[object]:
    raw = path.read_text(encoding="utf-8")
    stripped = raw.lstrip()
    if not stripped:
        return
    if stripped[0] == "[" or (stripped[0] == "{" and "\n{" not in stripped):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = None
        if data is not None:
            yield from (data if isinstance(data, list) else [data])
            return
    # split("\n"), not splitlines(): JSON strings may hold U+2028, which
    # splitlines() would treat as a line break (FewCLUE iflytek does).
    for number, line in enumerate(raw.split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc


def corpus_files(path: str | Path, include_eval: bool = False) -> list[Path]:
    """List the corpus files under ``path`` (a file or a folder), sorted.

    ``.json`` and ``.txt`` files are read; ChID's ``dev_few_all.json`` files are
    left out unless ``include_eval`` (they are evaluation data).
    """
    root = Path(path)
    if not root.exists():
        raise CorpusError(f"{root}: corpus path does not exist")
    if root.is_file():
        return [root]
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in (".json", ".txt")
        and (include_eval or p.name not in EVAL_ONLY_FILES)
    )
    if not files:
        raise CorpusError(f"{root}: no .json or .txt files found")
    return files


def read_records(file: Path) -> list | None:
    """The records of one corpus file (JSON records, or the lines of a ``.txt``), or None
    when it cannot be read: one unreadable file (a .json that is not JSON) must not sink
    a corpus of hundreds, so it is named in the log and skipped."""
    try:
        if file.suffix == ".txt":
            return file.read_text(encoding="utf-8").split("\n")
        return list(_records_of_json_file(file))
    except (CorpusError, UnicodeDecodeError) as exc:
        log.warning("skipping %s: %s", file, exc)
        return None


def iter_documents(path: str | Path, include_eval: bool = False, simplify: bool = True) -> Iterator[Document]:
    """Yield every document with Chinese text under ``path``, simplified.

    Test/public-test files of FewCLUE are plain text for our purpose (their labels
    are never used), so they are corpus like the rest.
    """
    for file in corpus_files(path, include_eval):
        records = read_records(file)
        if records is None:
            continue
        for record in records:
            text = record.strip() if isinstance(record, str) else record_text(record)
            if not CJK_RE.search(text):
                continue
            if simplify:
                text = to_simplified(text)
            yield Document(source=str(file), text=text)


def iter_idiom_questions(path: str | Path, include_eval: bool = False) -> Iterator[IdiomQuestion]:
    """Yield every record under ``path`` with exactly one ``#idiom#``, a list of candidate
    idioms and no valid answer (a record with its answer is running text: the answer is
    filled in there, see :func:`record_text`). Unreadable files are skipped, as by
    :func:`iter_documents`."""
    for file in corpus_files(path, include_eval):
        records = read_records(file) if file.suffix == ".json" else None
        for record in records or ():
            if not isinstance(record, dict):
                continue
            content, candidates, answer = record.get("content"), record.get("candidates"), record.get("answer")
            if not isinstance(content, str) or content.count(IDIOM_PLACEHOLDER) != 1:
                continue
            if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
                continue
            if isinstance(answer, int) and 0 <= answer < len(candidates):
                continue
            left, right = to_simplified(content).split(IDIOM_PLACEHOLDER)
            yield IdiomQuestion(to_simplified(record_text(record)), left, right,
                                tuple(to_simplified(c) for c in candidates))


def is_test_document(text: str, test_fraction: float) -> bool:
    """Stable by-document split: hash the text, compare with the fraction."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def split_documents(docs: Iterable[Document], test_fraction: float = 0.02) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, test) by a stable hash of each document."""
    train, test = [], []
    for doc in docs:
        (test if is_test_document(doc.text, test_fraction) else train).append(doc)
    return train, test


def char_counts(texts: Iterable[str]) -> Counter:
    """Count characters (what BERT's Chinese tokenization splits into) over texts."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(text)
    return counts
