"""``python -m tools memory``: the exact phrase memory of a bundle (``memory.bin``).

``build`` reads the corpus the default model was trained on (by default the
chinese-poetry part of ``../shared/data``), keeps only the training split (every
document whose text :func:`tools.train.corpus.is_test_document` holds apart is left out,
exactly as ``pretrain`` leaves it out), and writes:

- the text of each *work* (a poem, a ci, a chapter…) as one line: its paragraphs in
  simplified characters, punctuation made full-width, joined, then ``\\n``; stored as
  UTF-16-BE so that byte order is character order;
- a suffix array over the positions where a Han character starts (3-byte entries
  while the text has under 2**24 code units), sorted on the first 32 characters;
- per work its start, title, author, dynasty and collection, for quoting the source.

:class:`edge.phrase_memory.PhraseMemory` answers "which fillers occur between this
left and this right context, with how much of it matched" with binary searches on
the board. The same corpus always gives the same bytes.

Why poetry only by default: the index costs ~5 bytes per character, and the modern
part (FewCLUE, 7.9 M characters) would double it past the bundle's size budget, while
the big-corpus word LM already covers modern usage; famous lines of poetry and the
classics are what people quote verbatim and what a 3 M-parameter model cannot recall.
``--corpus`` takes any folder of the same formats.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from tools import ToolError
from tools.knowledge.args import add_output_arguments, check_bundle_folder, open_bundle_file

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "poetry"
MEMORY_FILE, MEMORY_LICENSE_FILE, MEMORY_README_FILE = "memory.bin", "memory.LICENSE", "memory.README.md"
SORT_DEPTH = 32  # characters the suffix array is sorted on (longest pattern searched: 24)
MAX_TITLE = 24  # characters of a work's title kept for quoting it
TITLE_KEYS = ("title", "rhythmic", "chapter")
# Dynasty of each chinese-poetry collection (folder), where one dynasty holds for all of it.
FOLDER_DYNASTY = {"全唐诗": "唐", "水墨唐诗": "唐", "宋词": "宋", "元曲": "元", "五代诗词": "五代", "诗经": "先秦",
                  "楚辞": "先秦", "论语": "先秦", "四书五经": "先秦", "曹操诗集": "汉", "纳兰性德": "清", "幽梦影": "清"}
FILE_DYNASTY = {"tangshisanbaishou.json": "唐"}
DYNASTY_CODES = {"tang": "唐", "song": "宋", "yuan": "元", "ming": "明", "qing": "清"}
AUTHOR_DYNASTY_RE = re.compile(r"^\s*[（(]([^）)]{1,4})[）)]\s*(.+)$|^\s*([^：:]{1,4})[：:]\s*(.+)$")


@dataclass
class Work:
    """One poem / ci / chapter: where it comes from and its paragraphs."""

    title: str
    author: str
    dynasty: str
    collection: str
    paragraphs: list[str] = field(default_factory=list)


def _clean_author(author: str, dynasty: str) -> tuple[str, str]:
    """'（唐）孟浩然' → ('孟浩然', '唐'); '先秦：左丘明' → ('左丘明', '先秦');
    '王筠（1784-1854），字貫山…' → ('王筠', …)."""
    author = (author or "").strip()
    match = AUTHOR_DYNASTY_RE.match(author)
    if match:
        found_dynasty = match.group(1) or match.group(3)
        author = (match.group(2) or match.group(4)).strip()
        dynasty = dynasty or found_dynasty.strip()
    if len(author) > 10:  # a biography, not a name: keep the name before it
        author = re.split(r"[（(，,。]", author, maxsplit=1)[0].strip()[:10]
    return author, dynasty


def works_of_record(record, inherited: Work, depth: int = 0) -> Iterator[Work]:
    """The works in one JSON record of chinese-poetry (nested collections included).

    Paragraphs are the strings directly under the corpus reader's text keys
    (:data:`tools.train.corpus.TEXT_KEYS`), so the memory holds training text only.
    """
    from tools.train.corpus import TEXT_KEYS

    if isinstance(record, list):
        for item in record:
            yield from works_of_record(item, inherited, depth)
        return
    if not isinstance(record, dict):
        return
    title = next((str(record[k]) for k in TITLE_KEYS if isinstance(record.get(k), str) and record[k].strip()), "")
    dynasty = DYNASTY_CODES.get(str(record.get("dynasty", "")).lower(), inherited.dynasty)
    author, dynasty = _clean_author(record["author"], dynasty) if isinstance(record.get("author"), str) \
        else (inherited.author, dynasty)
    here = Work(title=title or inherited.title, author=author, dynasty=dynasty, collection=inherited.collection)
    nested = []
    for key, value in record.items():
        if key in TEXT_KEYS and isinstance(value, str):
            here.paragraphs.append(value)
        elif key in TEXT_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            here.paragraphs.extend(value)
        elif isinstance(value, (list, dict)):
            nested.append(value)
    if here.paragraphs:
        yield here
    if nested:
        # A collection inside a file (唐诗三百首 → 五言绝句 → 行宫): the file's title names
        # the collection of the works below it; their author, if they name none, is
        # the one of the record around them (弟子规's chapters: 李毓秀).
        below = Work(title="", author=here.author, dynasty=here.dynasty,
                     collection=(title or inherited.collection) if depth == 0 else inherited.collection)
        for value in nested:
            yield from works_of_record(value, below, depth + 1)


def read_works(corpus: Path, test_fraction: float = 0.02) -> tuple[list[Work], dict]:
    """Works of the training split of ``corpus``, simplified; and counts."""
    from edge.phrase_memory import normalize_query
    from tools.train.corpus import CJK_RE, corpus_files, is_test_document, read_records, record_text, to_simplified

    works: list[Work] = []
    stats = {"documents": 0, "held_apart_documents": 0, "files": 0}
    for file in corpus_files(corpus):
        if file.suffix != ".json":
            continue
        records = read_records(file)
        if records is None:
            continue
        stats["files"] += 1
        parts = file.relative_to(corpus).parts
        folder = parts[0] if len(parts) > 1 else corpus.name
        dynasty = FILE_DYNASTY.get(file.name, FOLDER_DYNASTY.get(folder, ""))
        for record in records:
            text = record_text(record)
            if not CJK_RE.search(text):
                continue
            # The same rule and the same text as pretrain's split: a held-apart document
            # must not be recalled verbatim.
            if is_test_document(to_simplified(text), test_fraction):
                stats["held_apart_documents"] += 1
                continue
            stats["documents"] += 1
            base = Work(title="", author="", dynasty=dynasty, collection=to_simplified(folder))
            for work in works_of_record(record, base):
                paragraphs = [normalize_query(to_simplified(p)) for p in work.paragraphs]
                paragraphs = [p for p in paragraphs if CJK_RE.search(p)]
                if paragraphs:
                    works.append(Work(title=to_simplified(work.title), author=to_simplified(work.author),
                                      dynasty=to_simplified(work.dynasty), collection=to_simplified(work.collection),
                                      paragraphs=paragraphs))
    stats["works"] = len(works)
    return works, stats


def _field(text: str) -> str:
    """A title or author as one field of a tab-separated line (some titles hold line breaks)."""
    return " ".join(text.split())


def suffix_array(units: np.ndarray, positions: np.ndarray, depth: int = SORT_DEPTH,
                 progress: bool = True) -> np.ndarray:
    """``positions`` sorted by the ``depth`` code units of ``units`` that start there
    (prefix doubling with numpy; ties by position, so the order is deterministic)."""
    n = len(units)
    rank = units.astype(np.int64) + 1  # 0 is "past the end"
    k = 1
    while k < depth:
        shifted = np.zeros(n, dtype=np.int64)
        shifted[: n - k] = rank[k:]
        key = rank * (int(rank.max()) + 1) + shifted
        _, rank = np.unique(key, return_inverse=True)
        rank = rank.astype(np.int64) + 1
        k *= 2
        if progress:
            log.info("suffix array: sorted on %d characters (%d distinct)", k, int(rank.max()))
    order = np.argsort(rank[positions], kind="stable")
    return positions[order]


def build_memory(corpus: Path, out_file: Path, test_fraction: float = 0.02, provenance: str = "",
                 license_id: str = "") -> dict:
    """Build ``memory.bin`` from the training split of ``corpus``; return its metadata."""
    from edge.arrays_file import write_arrays
    from edge.phrase_memory import FORMAT, is_han_unit

    started = time.monotonic()
    corpus = Path(corpus)
    if not corpus.exists():
        raise ToolError(f"{corpus}: corpus path does not exist")
    log.info("reading works from %s (held-apart documents excluded)", corpus)
    works, stats = read_works(corpus, test_fraction)
    if not works:
        raise ToolError(f"{corpus}: no works with Chinese text in its training split")
    lines = ["".join(w.paragraphs) + "\n" for w in works]
    starts = np.cumsum([0] + [len(line) for line in lines[:-1]]).astype(np.int64)
    text = "".join(lines)
    units = np.frombuffer(text.encode("utf-16-be"), dtype=">u2").astype(np.uint16)
    if len(units) != len(text):
        raise ToolError("internal: the memory text has characters outside the BMP after normalisation")
    han = is_han_unit(units)
    positions = np.nonzero(han)[0].astype(np.int64)
    log.info("%d works, %d characters, %d Han positions (%.0f s)", len(works), len(units), len(positions),
             time.monotonic() - started)
    sa = suffix_array(units, positions)
    width = 3 if len(units) < 1 << 24 else 4
    sa_bytes = sa.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :width].reshape(-1).copy()
    # Per work "title<TAB>author<TAB>group", the group indexing (dynasty, collection)
    # pairs kept once in the header (96 k works share a few dozen of them).
    groups = sorted({(_field(w.dynasty), _field(w.collection)) for w in works})
    group_of = {g: i for i, g in enumerate(groups)}
    meta_blob = "\n".join(f"{_field(w.title)[:MAX_TITLE]}\t{_field(w.author)}\t{group_of[(_field(w.dynasty), _field(w.collection))]}"
                          for w in works).encode("utf-8")
    meta_lines = np.frombuffer(meta_blob, dtype=np.uint8)
    # Every SAMPLE_EVERY-th suffix's first MAX_CONTEXT characters, for the reader's
    # two-level search (edge.phrase_memory.PhraseMemory._sample_keys).
    from edge.phrase_memory import MAX_CONTEXT, SAMPLE_EVERY

    text_bytes = text.encode("utf-16-be")
    key_bytes = 2 * MAX_CONTEXT
    sampled = sa[::SAMPLE_EVERY]
    sample_keys = np.zeros((len(sampled), key_bytes), dtype=np.uint8)
    sample_lengths = np.zeros(len(sampled), dtype=np.uint8)
    for k, pos in enumerate(sampled.tolist()):
        key = text_bytes[2 * pos : 2 * pos + key_bytes]
        sample_keys[k, : len(key)] = np.frombuffer(key, dtype=np.uint8)
        sample_lengths[k] = len(key)
    arrays = {
        "text_utf16be": np.frombuffer(text_bytes, dtype=np.uint8),
        "sa": sa_bytes,
        "sample_keys": sample_keys,
        "sample_lengths": sample_lengths,
        "work_start": starts.astype(np.uint32),
        "work_meta_utf8": meta_lines,
    }
    meta = {
        "format": FORMAT,
        "sa_width": width,
        "sample_every": SAMPLE_EVERY,
        "sort_depth": SORT_DEPTH,
        "characters": int(len(units)),
        "positions": int(len(positions)),
        "works": len(works),
        "documents": stats["documents"],
        "held_apart_documents": stats["held_apart_documents"],
        "test_fraction": test_fraction,
        "groups": [list(g) for g in groups],
        "corpus": corpus.name,
        "license": license_id,
        "provenance": provenance,
        "normalization": "simplified (OpenCC t2s), full-width punctuation, spaces removed, non-BMP as □",
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    size = write_arrays(out_file, arrays, meta)
    meta["bytes"] = size
    meta["build_seconds"] = round(time.monotonic() - started, 1)
    log.info("wrote %s: %.1f MB (%d works, %d characters) in %.0f s", out_file, size / 1e6, len(works),
             len(units), meta["build_seconds"])
    return meta


def add_memory_to_bundle(bundle: Path, corpus: Path, license_file: Path | None = None, license_id: str = "",
                         provenance: str = "", test_fraction: float = 0.02) -> dict:
    """Write memory.bin (+ license, provenance note) into ``bundle`` and list them in its manifest."""
    from edge.manifest import Manifest

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    corpus = Path(corpus)
    if license_file is None:
        found = sorted(p for p in corpus.glob("LICENSE*") if p.is_file()) if corpus.is_dir() else []
        license_file = found[0] if found else None
    if license_file is None or not Path(license_file).is_file():
        raise ToolError(f"{corpus}: no LICENSE file in it; give --license FILE (the memory ships with its license)")
    meta = build_memory(corpus, bundle / MEMORY_FILE, test_fraction, provenance=provenance, license_id=license_id)
    shutil.copyfile(license_file, bundle / MEMORY_LICENSE_FILE)
    (bundle / MEMORY_README_FILE).write_text(readme_text(meta), encoding="utf-8")
    names = [MEMORY_FILE, MEMORY_LICENSE_FILE, MEMORY_README_FILE]
    manifest.memory = manifest.attach_files(bundle, {k: v for k, v in meta.items() if k not in (
        "bytes", "build_seconds", "format", "groups", "sample_every")}, names)
    manifest.save(bundle)
    return manifest.memory


def readme_text(meta: dict) -> str:
    """The provenance note shipped beside memory.bin (deterministic: no dates)."""
    return (
        "# memory.bin: exact phrase memory\n\n"
        f"An index over the training split of the corpus `{meta['corpus']}`: {meta['works']:,} works "
        f"({meta['characters']:,} characters) from {meta['documents']:,} documents; "
        f"{meta['held_apart_documents']:,} held-apart documents (test fraction {meta['test_fraction']}, "
        "the split the default model was evaluated on) are not in it.\n\n"
        f"Provenance: {meta.get('provenance') or 'see the manifest'}.\n"
        f"License: {meta.get('license') or 'see memory.LICENSE'} (text in `memory.LICENSE`).\n"
        f"Normalisation: {meta['normalization']}.\n"
        "Built by `python -m tools memory build` (fillmask-edge); the same corpus gives the same bytes.\n"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m tools memory``."""
    sub = parser.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="corpus → memory.bin (into a bundle: --bundle; or a file: --out)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus folder (chinese-poetry JSON)")
    add_output_arguments(build, MEMORY_FILE, "corpus", "LICENSE* in the corpus", "MIT")
    build.add_argument("--test-fraction", type=float, default=0.02, help="held-apart share (as in pretrain)")
    look = sub.add_parser("lookup", help="fillers the memory has for a text with one [MASK] blank")
    look.add_argument("--bundle", type=Path, default=None, help="bundle with memory.bin (default: the embedded one)")
    look.add_argument("--length", type=int, default=None, help="characters the blank stands for (default: masks)")
    look.add_argument("text")


def run(args: argparse.Namespace) -> int:
    """Run ``memory build`` or ``memory lookup``."""
    if args.memory_command == "build":
        if args.bundle is not None:
            check_bundle_folder(args.bundle)
            add_memory_to_bundle(args.bundle, args.corpus, args.license, args.license_id, args.provenance,
                                 args.test_fraction)
        else:
            build_memory(args.corpus, args.out, args.test_fraction, args.provenance, args.license_id)
        return 0
    from edge.blanks import find_blanks
    from edge.phrase_memory import PhraseMemory

    memory = open_bundle_file(args.bundle, MEMORY_FILE, PhraseMemory)
    segments, blanks = find_blanks(args.text)
    if len(blanks) != 1:
        raise ToolError("give a text with exactly one blank ([MASK], or several adjacent for a word)")
    started = time.perf_counter()
    hits = memory.lookup(segments[0], args.length or blanks[0].n_masks, segments[1])
    took = (time.perf_counter() - started) * 1000
    for hit in hits:
        print(f"{hit.filler}\tcontext {hit.left}+{hit.right}\tcount {hit.count}\t{hit.source}")
    print(f"({len(hits)} fillers in {took:.2f} ms)")
    return 0
