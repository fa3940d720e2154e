"""``python -m tools idioms``: the characters the training corpus uses around each idiom
(the bundle's ``idioms.bin``, read by :class:`edge.idiom_context.IdiomContext`).

``build`` takes the idioms from the bundle's word LM (its four-character words of Han
characters: 11,946 in the default's) and reads the modern part of the corpus the default
model was trained on (FewCLUE in ``../shared/data``; ChID's ``dev_few_all.json`` is
evaluation data and is never read, and every document :func:`tools.train.corpus.
is_test_document` holds apart is left out, as for training and the memory). For each idiom
it counts its occurrences and the Han characters within ``window`` characters of each
occurrence, in the same document; and it counts every character of the corpus (the
background the cue compares with). Only counts are stored, no text.

``window`` (30) and ``alpha`` (3000) were chosen by 10 × 2-fold cross-validation within
ChID ``dev_few_all`` (the given-filler weights fitted on one half, scored on the other):
without the cue 34.0%; with it (window 30, every character near the blank) 39.6 / 39.7 /
39.2% for alpha 1000 / 3000 / 10000; window 60: 38.7-39.7%. Keeping only each idiom's
64 or 128 strongest characters (to save space) lost 3.9 and 1.4 points, so all are kept.
The same corpus always gives the same bytes.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np

from edge.idiom_context import is_han_char
from tools import ToolError
from tools.knowledge.args import check_bundle_folder, open_bundle_file

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "fewclue"
IDIOMS_FILE, IDIOMS_README_FILE = "idioms.bin", "idioms.README.md"
WINDOW, ALPHA = 30, 3000.0
IDIOM_CHARS = 4
MAX_COUNT = 255  # counts are stored in one byte; an idiom's total N stays exact


def idioms_of_lm(lm) -> set[str]:
    """The word LM's four-character words made of Han characters."""
    return {w for w in (lm.words[i] for i in range(len(lm.words)))
            if len(w) == IDIOM_CHARS and all(is_han_char(ch) for ch in w)}


def build_idioms(corpus: Path, idioms: set[str], out_file: Path, test_fraction: float = 0.02,
                 window: int = WINDOW, alpha: float = ALPHA, provenance: str = "", license_note: str = "") -> dict:
    """Count the characters around each of ``idioms`` in the training split of ``corpus``
    and write ``out_file``; return its metadata."""
    from edge.arrays_file import write_arrays
    from edge.idiom_context import FORMAT
    from tools.train.corpus import CorpusError, iter_documents, is_test_document

    started = time.monotonic()
    near: dict[str, Counter] = {}
    occurrences: Counter = Counter()
    background: Counter = Counter()
    documents = held_apart = 0
    log.info("reading %s (held-apart documents excluded) for %d idioms", corpus, len(idioms))
    try:
        for doc in iter_documents(corpus):
            text = doc.text
            if is_test_document(text, test_fraction):
                held_apart += 1
                continue
            documents += 1
            background.update(text)
            for i in range(len(text) - IDIOM_CHARS + 1):
                gram = text[i:i + IDIOM_CHARS]
                if gram in idioms:
                    occurrences[gram] += 1
                    around = text[max(0, i - window):i] + text[i + IDIOM_CHARS:i + IDIOM_CHARS + window]
                    near.setdefault(gram, Counter()).update(ch for ch in around if is_han_char(ch))
            if documents % 20000 == 0:
                log.info("%d documents, %d idiom occurrences (%.0f s)", documents, sum(occurrences.values()),
                         time.monotonic() - started)
    except CorpusError as exc:
        raise ToolError(str(exc)) from exc
    if documents == 0:
        raise ToolError(f"{corpus}: no training documents with Chinese text")
    words = sorted(w for w in occurrences if near.get(w))
    off, chars, counts, totals = [0], [], [], []
    for w in words:
        entries = sorted((ord(ch), n) for ch, n in near[w].items() if ord(ch) < 0x10000)
        chars.extend(c for c, _ in entries)
        counts.extend(min(n, MAX_COUNT) for _, n in entries)
        totals.append(sum(n for _, n in entries))
        off.append(len(chars))
    bg = sorted((ord(ch), n) for ch, n in background.items() if is_han_char(ch) and ord(ch) < 0x10000)
    arrays = {
        "words_utf8": np.frombuffer("\n".join(words).encode("utf-8"), dtype=np.uint8),
        "off": np.array(off, dtype=np.uint32),
        "chars": np.array(chars, dtype=np.uint16),
        "counts": np.array(counts, dtype=np.uint8),
        "totals": np.array(totals, dtype=np.uint32),
        "occurrences": np.array([occurrences[w] for w in words], dtype=np.uint32),
        "bg_chars": np.array([c for c, _ in bg], dtype=np.uint16),
        "bg_counts": np.array([n for _, n in bg], dtype=np.uint32),
    }
    meta = {
        "format": FORMAT,
        "window": window,
        "alpha": alpha,
        "idioms": len(words),
        "idioms_asked": len(idioms),
        "idiom_occurrences": int(sum(occurrences.values())),
        "pairs": len(chars),
        "corpus_characters": int(sum(background.values())),
        "documents": documents,
        "held_apart_documents": held_apart,
        "test_fraction": test_fraction,
        "corpus": corpus.name,
        "provenance": provenance,
        "license": license_note,
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    size = write_arrays(out_file, arrays, meta)
    log.info("wrote %s: %.2f MB (%d of %d idioms seen, %d occurrences, %d idiom-character pairs) in %.0f s",
             out_file, size / 1e6, len(words), len(idioms), meta["idiom_occurrences"], len(chars),
             time.monotonic() - started)
    return meta


def add_idioms_to_bundle(bundle: Path, corpus: Path, test_fraction: float = 0.02, provenance: str = "",
                         license_note: str = "") -> dict:
    """Write idioms.bin (+ its provenance note) into ``bundle``, for the idioms of its word
    LM, and list them in its manifest."""
    from edge.manifest import Manifest
    from edge.ngram_lm import NgramLM

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    if manifest.lm is None:
        raise ToolError(f"{bundle}: has no word LM (lm.bin); the idioms are its four-character words: "
                        "run `python -m tools lm convert --bundle` first")
    lm = open_bundle_file(bundle, "lm.bin", NgramLM)
    meta = build_idioms(Path(corpus), idioms_of_lm(lm), bundle / IDIOMS_FILE, test_fraction,
                        provenance=provenance, license_note=license_note)
    (bundle / IDIOMS_README_FILE).write_text(readme_text(meta), encoding="utf-8")
    names = [IDIOMS_FILE, IDIOMS_README_FILE]
    manifest.idioms = manifest.attach_files(bundle, {k: v for k, v in meta.items() if k != "format"}, names)
    manifest.save(bundle)
    return manifest.idioms


def readme_text(meta: dict) -> str:
    """The provenance note shipped beside idioms.bin (deterministic: no dates)."""
    return (
        "# idioms.bin: the characters around each idiom in the training corpus\n\n"
        f"Counts over the training split of the corpus `{meta['corpus']}` ({meta['documents']:,} documents; "
        f"{meta['held_apart_documents']:,} held-apart documents, test fraction {meta['test_fraction']}, "
        "are not in it): for each of the word LM's four-character words that occur in it "
        f"({meta['idioms']:,} of {meta['idioms_asked']:,}, {meta['idiom_occurrences']:,} occurrences), how often "
        f"each Han character occurs within {meta['window']} characters of it; and every character's count. "
        "Only counts, no text.\n\n"
        f"Provenance: {meta.get('provenance') or 'see the manifest'}.\n"
        f"License: {meta.get('license') or 'see the manifest'}.\n"
        "Built by `python -m tools idioms build` (fillmask-edge); the same corpus gives the same bytes.\n"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m tools idioms``."""
    sub = parser.add_subparsers(dest="idioms_command", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="corpus → the bundle's idioms.bin (the idioms of its word LM)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--bundle", type=Path, required=True, help="bundle folder with lm.bin")
    build.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus folder (JSON lines / .txt)")
    build.add_argument("--test-fraction", type=float, default=0.02, help="held-apart share (as in pretrain)")
    build.add_argument("--provenance", default="", help="one line on where the corpus comes from")
    build.add_argument("--license", dest="license_note", default="", help="the corpus's license, as a note")
    score = sub.add_parser("score", help="the idiom cue of each given idiom for a text with one blank")
    score.add_argument("--bundle", type=Path, default=None, help="bundle with idioms.bin (default: the embedded one)")
    score.add_argument("text")
    score.add_argument("idioms", nargs="+")


def run(args: argparse.Namespace) -> int:
    """Run ``idioms build`` or ``idioms score``."""
    if args.idioms_command == "build":
        check_bundle_folder(args.bundle)
        add_idioms_to_bundle(args.bundle, args.corpus, args.test_fraction, args.provenance, args.license_note)
        return 0
    from edge.blanks import find_blanks
    from edge.idiom_context import IdiomContext

    table = open_bundle_file(args.bundle, IDIOMS_FILE, IdiomContext)
    segments, blanks = find_blanks(args.text)
    if len(blanks) != 1:
        raise ToolError("give a text with exactly one blank ([MASK], or several adjacent)")
    for word, value in zip(args.idioms, table.scores(args.idioms, segments[0], segments[1])):
        print(f"{word}\tassoc {value:+.3f}\tseen {table.occurrences(word)} times")
    return 0
