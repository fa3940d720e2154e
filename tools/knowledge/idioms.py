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

It then reads the corpus's idiom questions without answers (ChID's ``unlabeled.json``:
7,569 passages, each with seven candidate idioms and the answer withheld; those the
held-apart rule holds apart are left out) and adds, for each candidate, the question's
characters near the blank times the probability that it is the answer, by a few rounds of
expectation-maximisation (:func:`soft_counts`). The passages are of the kind ChID asks
about, and most of ChID's idioms are in no other text of the corpus: 6,424 idioms have
contexts afterwards, against 5,143 seen in running text.

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

from edge.idiom_context import cue, is_han_char
from tools import ToolError
from tools.knowledge.args import check_bundle_folder, open_bundle_file

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "fewclue"
IDIOMS_FILE, IDIOMS_README_FILE = "idioms.bin", "idioms.README.md"
WINDOW, ALPHA = 30, 3000.0
IDIOM_CHARS = 4
# Unlabeled ChID questions (the passage, seven candidate idioms, no answer): expectation-
# maximisation over which candidate each one holds. The posterior over a question's
# candidates is softmax(TEMPERATURE * assoc) under the counts so far; each candidate then
# counts the question's characters times its posterior. TEMPERATURE is the given-filler
# weight of assoc fitted on dev before this step (4.18); ITERATIONS 3 and MIN_SOFT_COUNT
# 0.25 were chosen by 10 x 2-fold cross-validation within ChID dev_few_all (without the
# questions 39.6%; with them 44.1 / 45.5% after 1 / 3 iterations, 44.4% after 5;
# temperature 3 or 8: 44.0 / 45.0%; dropping pairs below 0.1 / 0.25 / 0.5 / 1.0 of a
# count: 45.4 / 45.4 / 44.3 / 42.9%, 1.10 / 0.84 / 0.72 / 0.62 M pairs).
EM_ITERATIONS, EM_TEMPERATURE, MIN_SOFT_COUNT = 3, 4.18, 0.25
COUNT_LEVELS = 256  # counts are stored as one byte: an index into a geometric table of levels


def is_idiom(word: str) -> bool:
    """Whether ``word`` is four Han characters (an LM word counted as an idiom, or a
    candidate of an idiom question)."""
    return len(word) == IDIOM_CHARS and all(is_han_char(ch) for ch in word)


def idioms_of_lm(lm) -> set[str]:
    """The word LM's four-character words made of Han characters."""
    return {w for w in (lm.words[i] for i in range(len(lm.words))) if is_idiom(w)}


def _han_counts(text: str) -> Counter:
    return Counter(ch for ch in text if is_han_char(ch) and ord(ch) < 0x10000)


def _assoc(word: str, near_chars: list[str], shares: np.ndarray, counts: dict, totals: dict,
           occurrences: dict, alpha: float) -> float:
    """The cue of :class:`edge.idiom_context.IdiomContext` from counts in memory (0 for an
    idiom seen less than once, which the file will not hold)."""
    if occurrences.get(word, 0.0) < 1.0:
        return 0.0
    seen = counts[word]
    return cue(np.array([seen.get(q, 0.0) for q in near_chars]), totals[word], shares, alpha)


def soft_counts(questions: list, near: dict, occurrences: Counter, share: dict, alpha: float,
                iterations: int = EM_ITERATIONS, temperature: float = EM_TEMPERATURE) -> tuple[dict, Counter]:
    """Expected counts from idiom questions without answers: each question's characters
    near its blank, times the posterior of each candidate under the corpus's counts plus
    the previous iteration's expected counts. Returns (idiom → Counter of characters,
    idiom → expected occurrences), the questions' part only."""
    added, added_occ = {}, Counter()
    for iteration in range(iterations):
        counts = {w: near.get(w, Counter()) + added.get(w, Counter()) for w in set(near) | set(added)}
        totals = {w: float(sum(c.values())) for w, c in counts.items()}
        occ = {w: occurrences.get(w, 0) + added_occ.get(w, 0.0) for w in counts}
        new, new_occ = {}, Counter()
        for candidates, chars in questions:
            # Distinct characters the corpus has, in a fixed order: the same bytes every time.
            near_chars = sorted(ch for ch in chars if ch in share)
            shares = np.array([share[ch] for ch in near_chars])
            scores = np.array([temperature * _assoc(c, near_chars, shares, counts, totals, occ, alpha)
                               for c in candidates])
            posterior = np.exp(scores - scores.max())
            posterior /= posterior.sum()
            for word, p in zip(candidates, posterior.tolist()):
                new_occ[word] += p
                target = new.setdefault(word, Counter())
                for ch, n in chars.items():
                    target[ch] += p * n
        added, added_occ = new, new_occ
        log.info("idiom questions: iteration %d of %d done", iteration + 1, iterations)
    return added, added_occ


def count_levels(largest: float) -> np.ndarray:
    """The geometric table of count levels, MIN_SOFT_COUNT to ``largest`` (relative step
    ~4% for a largest count of 5,000)."""
    return np.geomspace(MIN_SOFT_COUNT, max(largest, MIN_SOFT_COUNT * 2), COUNT_LEVELS).astype(np.float32)


def build_idioms(corpus: Path, idioms: set[str], out_file: Path, test_fraction: float = 0.02,
                 window: int = WINDOW, alpha: float = ALPHA, provenance: str = "", license_note: str = "",
                 iterations: int = EM_ITERATIONS) -> dict:
    """Count the characters around each of ``idioms`` in the training split of ``corpus``,
    add the expected counts from its idiom questions without answers (``iterations`` of
    expectation-maximisation; 0: none) and write ``out_file``; return its metadata."""
    from edge.arrays_file import write_arrays
    from edge.idiom_context import FORMAT
    from tools.train.corpus import CorpusError, iter_documents, iter_idiom_questions, is_test_document

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
                    near.setdefault(gram, Counter()).update(_han_counts(around))
            if documents % 20000 == 0:
                log.info("%d documents, %d idiom occurrences (%.0f s)", documents, sum(occurrences.values()),
                         time.monotonic() - started)
        questions, questions_apart = [], 0
        if iterations > 0:
            for q in iter_idiom_questions(corpus):
                if is_test_document(q.document, test_fraction):
                    questions_apart += 1
                    continue
                candidates = tuple(dict.fromkeys(c for c in q.candidates if is_idiom(c)))
                chars = _han_counts(q.left[-window:] + q.right[:window])
                if len(candidates) >= 2 and chars:
                    questions.append((candidates, chars))
    except CorpusError as exc:
        raise ToolError(str(exc)) from exc
    if documents == 0:
        raise ToolError(f"{corpus}: no training documents with Chinese text")
    total_chars = sum(background.values())
    share = {ch: n / total_chars for ch, n in background.items() if is_han_char(ch) and ord(ch) < 0x10000}
    log.info("%d idiom questions without answers (%d held apart): %d iterations", len(questions),
             questions_apart, iterations if questions else 0)
    added, added_occ = soft_counts(questions, near, occurrences, share, alpha, iterations) if questions \
        else ({}, Counter())
    counts: dict[str, dict[int, float]] = {}
    expected: dict[str, float] = {}
    for w in set(near) | set(added):
        merged = Counter(near.get(w, Counter()))
        merged.update(added.get(w, {}))
        # Counts below MIN_SOFT_COUNT are only a question's faint posterior: dropped.
        kept = {ord(ch): n for ch, n in merged.items() if n >= MIN_SOFT_COUNT}
        seen = occurrences.get(w, 0) + added_occ.get(w, 0.0)
        if kept and seen >= 1.0:  # an idiom seen less than once (in expectation) says nothing
            counts[w], expected[w] = kept, seen
    words = sorted(counts)
    largest = max((n for c in counts.values() for n in c.values()), default=1.0)
    levels = count_levels(largest)
    log_levels = np.log(levels.astype(np.float64))
    off, chars, codes, totals = [0], [], [], []
    for w in words:
        entries = sorted(counts[w].items())
        values = np.array([n for _, n in entries])
        log_values = np.log(values)
        # The nearest level in log terms (a relative error of at most half a step).
        index = np.searchsorted(log_levels, log_values).clip(1, COUNT_LEVELS - 1)
        lower_is_nearer = log_values - log_levels[index - 1] < log_levels[index] - log_values
        chars.extend(c for c, _ in entries)
        codes.extend((index - lower_is_nearer).tolist())
        totals.append(float(values.sum()))
        off.append(len(chars))
    bg = sorted((ord(ch), n) for ch, n in background.items() if is_han_char(ch) and ord(ch) < 0x10000)
    arrays = {
        "words_utf8": np.frombuffer("\n".join(words).encode("utf-8"), dtype=np.uint8),
        "off": np.array(off, dtype=np.uint32),
        "chars": np.array(chars, dtype=np.uint16),
        "codes": np.array(codes, dtype=np.uint8),
        "levels": levels,
        "totals": np.array(totals, dtype=np.float32),
        "occurrences": np.array([expected[w] for w in words], dtype=np.float32),
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
        "questions": len(questions),
        "held_apart_questions": questions_apart,
        "question_iterations": iterations if questions else 0,
        "question_temperature": EM_TEMPERATURE,
        "min_soft_count": MIN_SOFT_COUNT,
        "pairs": len(chars),
        "corpus_characters": int(total_chars),
        "documents": documents,
        "held_apart_documents": held_apart,
        "test_fraction": test_fraction,
        "corpus": corpus.name,
        "provenance": provenance,
        "license": license_note,
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    size = write_arrays(out_file, arrays, meta)
    log.info("wrote %s: %.2f MB (%d idioms: %d of the LM's %d seen in the corpus, %d occurrences, %d questions; "
             "%d idiom-character pairs) in %.0f s", out_file, size / 1e6, len(words), sum(1 for w in occurrences
             if w in counts), len(idioms), meta["idiom_occurrences"], len(questions), len(chars),
             time.monotonic() - started)
    return meta


def add_idioms_to_bundle(bundle: Path, corpus: Path, test_fraction: float = 0.02, provenance: str = "",
                         license_note: str = "", rounds: int = EM_ITERATIONS) -> dict:
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
                        provenance=provenance, license_note=license_note, iterations=rounds)
    (bundle / IDIOMS_README_FILE).write_text(readme_text(meta), encoding="utf-8")
    names = [IDIOMS_FILE, IDIOMS_README_FILE]
    manifest.idioms = manifest.attach_files(bundle, {k: v for k, v in meta.items() if k != "format"}, names)
    manifest.save(bundle)
    return manifest.idioms


def readme_text(meta: dict) -> str:
    """The provenance note shipped beside idioms.bin (deterministic: no dates)."""
    questions = meta.get("questions", 0)
    return (
        "# idioms.bin: the characters around each idiom in the training corpus\n\n"
        f"Counts over the training split of the corpus `{meta['corpus']}` ({meta['documents']:,} documents; "
        f"{meta['held_apart_documents']:,} held-apart documents, test fraction {meta['test_fraction']}, "
        "are not in it): for each of the word LM's four-character words that occur in it "
        f"({meta['idiom_occurrences']:,} occurrences), how often each Han character occurs within "
        f"{meta['window']} characters of it; and every character's count. "
        + (f"Added to those: the corpus's {questions:,} idiom questions without answers "
           f"({meta.get('held_apart_questions', 0):,} held apart are not), each question's characters near "
           "its blank counted for each of its candidate idioms times the probability that the candidate is "
           f"the answer ({meta['question_iterations']} rounds of expectation-maximisation). "
           if questions else "")
        + f"{meta['idioms']:,} idioms in all; only counts, no text.\n\n"
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
    build.add_argument("--rounds", type=int, default=EM_ITERATIONS,
                       help="rounds of expectation-maximisation over the idiom questions without answers (0: none)")
    score = sub.add_parser("score", help="the idiom cue of each given idiom for a text with one blank")
    score.add_argument("--bundle", type=Path, default=None, help="bundle with idioms.bin (default: the embedded one)")
    score.add_argument("text")
    score.add_argument("idioms", nargs="+")


def run(args: argparse.Namespace) -> int:
    """Run ``idioms build`` or ``idioms score``."""
    if args.idioms_command == "build":
        check_bundle_folder(args.bundle)
        if args.rounds < 0:
            raise ToolError(f"--rounds {args.rounds}: give 0 or more")
        add_idioms_to_bundle(args.bundle, args.corpus, args.test_fraction, args.provenance, args.license_note,
                             args.rounds)
        return 0
    from edge.blanks import find_blanks
    from edge.idiom_context import IdiomContext

    table = open_bundle_file(args.bundle, IDIOMS_FILE, IdiomContext)
    segments, blanks = find_blanks(args.text)
    if len(blanks) != 1:
        raise ToolError("give a text with exactly one blank ([MASK], or several adjacent)")
    for word, value in zip(args.idioms, table.scores(args.idioms, segments[0], segments[1])):
        print(f"{word}\tassoc {value:+.3f}\tseen {table.occurrences(word):.1f} times (questions without answers counted by their posterior)")
    return 0
