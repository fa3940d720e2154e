"""``python -m tools lm``: an ARPA n-gram LM → the bundle's compact ``lm.bin``.

``convert`` reads an ARPA file (plain, or the one ``.arpa`` inside a ``.tar.xz`` /
``.tar.gz``), checks it (section counts, line shapes, that every n-gram's context is
itself an (n-1)-gram), and writes the memory-mappable form that
:class:`edge.ngram_lm.NgramLM` reads on the board:

- the vocabulary sorted by code point (a word's id is its rank), UTF-8, one a line;
- per order, the n-grams sorted by (context, word) in CSR form, each as one uint32:
  the word id shifted left 8 bits over an 8-bit code of its log10 probability (into a
  256-entry codebook spaced evenly over the array's range); back-off weights likewise
  coded (0, the common case, is exact), and kept for a bigram only when it has
  trigrams or a non-zero weight; the
  largest rounding error of each codebook is stored, and it bounds the difference to
  KenLM (tests/test_lm.py checks it on a few hundred sentences);
- word ids ordered by reversed spelling, for "words ending in …" lookups.

The same ARPA always gives the same bytes. The license text and a provenance note
travel with the file (``lm.LICENSE``, ``lm.README.md`` in the bundle) and the manifest
lists all three with their sizes and sha256 (see :func:`add_lm_to_bundle`).

``score`` prints the best segmentation of a text into LM words and its log10
probability, as the engine computes it (for looking into an answer).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from tools import ToolError
from tools.knowledge.args import add_output_arguments, check_bundle_folder, open_bundle_file

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ARPA = REPO.parent / "shared" / "data" / "lm" / "lm_sc.arpa-20220810.tar.xz"
MAX_ORDER = 3
CODE_LEVELS = 256


@dataclass
class ArpaModel:
    """An ARPA model read into arrays (words as strings, n-grams as word-id tuples)."""

    order: int
    words: list[str]  # sorted; id = index
    uni_p: np.ndarray
    uni_bo: np.ndarray
    grams: dict[int, np.ndarray]  # n -> int64 [count, n] word ids, sorted
    probs: dict[int, np.ndarray]  # n -> float64 [count]
    backoffs: dict[int, np.ndarray]  # n -> float64 [count] (n < order)


# ------------------------------------------------------------------ reading ARPA
def open_arpa(path: Path) -> tuple[IO[str], str]:
    """Open an ARPA file (plain, .gz-free text, or inside a tar archive) as text."""
    if not path.is_file():
        raise ToolError(f"{path}: ARPA file not found")
    name = path.name
    if name.endswith((".tar.xz", ".tar.gz", ".tar.bz2", ".tar", ".txz", ".tgz")):
        try:
            archive = tarfile.open(path)
            members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".arpa")]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ToolError(f"{path}: not a readable tar archive ({exc})") from exc
        if len(members) != 1:
            raise ToolError(f"{path}: expected one .arpa file in the archive, found {len(members)}")
        raw = archive.extractfile(members[0])
        assert raw is not None
        return io.TextIOWrapper(raw, encoding="utf-8"), f"{path}:{members[0].name}"
    return open(path, encoding="utf-8"), str(path)


def _lines(handle: IO[str], origin: str) -> Iterator[tuple[int, str]]:
    number = 0
    try:
        for number, line in enumerate(handle, 1):
            yield number, line.rstrip("\n").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise ToolError(f"{origin}: not UTF-8 text after line {number} ({exc.reason})") from exc


def read_arpa(path: Path, progress_every: int = 500_000) -> ArpaModel:
    """Parse and check an ARPA file; raise ToolError naming the file and line."""
    handle, origin = open_arpa(path)
    counts: dict[int, int] = {}
    rows: dict[int, list] = {}
    section = None  # None, "data", or an order
    seen_end = False
    started = time.monotonic()
    with handle:
        for number, line in _lines(handle, origin):
            stripped = line.strip()
            if not stripped:
                continue
            if stripped == "\\data\\":
                section = "data"
                continue
            if stripped == "\\end\\":
                seen_end = True
                break
            if stripped.startswith("\\") and stripped.endswith("-grams:"):
                try:
                    n = int(stripped[1:-len("-grams:")])
                except ValueError:
                    raise ToolError(f"{origin}:{number}: bad section header {stripped!r}") from None
                if n not in counts:
                    raise ToolError(f"{origin}:{number}: section {n}-grams is not announced in \\data\\")
                section = n
                rows[n] = []
                continue
            if section == "data":
                if not stripped.startswith("ngram ") or "=" not in stripped:
                    raise ToolError(f"{origin}:{number}: expected 'ngram N=COUNT' in \\data\\, got {stripped!r}")
                key, value = stripped[6:].split("=", 1)
                try:
                    counts[int(key)] = int(value)
                except ValueError:
                    raise ToolError(f"{origin}:{number}: bad count line {stripped!r}") from None
                if int(key) > MAX_ORDER:
                    raise ToolError(f"{origin}:{number}: order {key} n-grams; this runtime scores up to "
                                    f"{MAX_ORDER}-grams (prune the model to a trigram LM first)")
                continue
            if not isinstance(section, int):
                if section is None:
                    continue  # text before \data\ is allowed by the format
                raise ToolError(f"{origin}:{number}: unexpected line {stripped[:40]!r}")
            fields = line.split("\t")
            if len(fields) == 1:  # some writers use spaces
                fields = line.split()
                fields = [fields[0], " ".join(fields[1:1 + section])] + fields[1 + section:]
            if len(fields) not in (2, 3):
                raise ToolError(f"{origin}:{number}: expected 'logprob<TAB>words[<TAB>backoff]', got {line[:60]!r}")
            words = fields[1].split(" ")
            if len(words) != section:
                raise ToolError(f"{origin}:{number}: {len(words)} words in the {section}-grams section")
            try:
                prob = float(fields[0])
                backoff = float(fields[2]) if len(fields) == 3 else 0.0
            except ValueError:
                raise ToolError(f"{origin}:{number}: bad number in {line[:60]!r}") from None
            if not np.isfinite(prob) or prob > 1e-6 or not np.isfinite(backoff):
                raise ToolError(f"{origin}:{number}: log10 probability {prob} is not a finite value ≤ 0")
            rows[section].append((words, prob, backoff))
            if progress_every and sum(len(r) for r in rows.values()) % progress_every == 0:
                log.info("read %d n-grams (%.0f s)", sum(len(r) for r in rows.values()), time.monotonic() - started)
    if not counts:
        raise ToolError(f"{origin}: no \\data\\ section (is this an ARPA file?)")
    if not seen_end:
        raise ToolError(f"{origin}: no \\end\\ line (truncated file?)")
    order = max(counts)
    for n in range(1, order + 1):
        got = len(rows.get(n, []))
        if got != counts.get(n, 0):
            raise ToolError(f"{origin}: \\data\\ announces {counts.get(n, 0)} {n}-grams, the file has {got}")
    return _to_arrays(rows, order, origin)


def _to_arrays(rows: dict[int, list], order: int, origin: str) -> ArpaModel:
    words = sorted(w[0] for w, _, _ in rows[1])
    if len(set(words)) != len(words):
        raise ToolError(f"{origin}: a word appears twice among the 1-grams")
    index = {w: i for i, w in enumerate(words)}
    uni_p = np.zeros(len(words))
    uni_bo = np.zeros(len(words))
    for (word,), prob, backoff in rows[1]:
        uni_p[index[word]] = prob
        uni_bo[index[word]] = backoff
    grams: dict[int, np.ndarray] = {}
    probs: dict[int, np.ndarray] = {}
    backoffs: dict[int, np.ndarray] = {}
    for n in range(2, order + 1):
        ids = np.empty((len(rows[n]), n), dtype=np.int64)
        prob = np.empty(len(rows[n]))
        bo = np.empty(len(rows[n]))
        for k, (ws, p, b) in enumerate(rows[n]):
            try:
                ids[k] = [index[w] for w in ws]
            except KeyError as exc:
                raise ToolError(f"{origin}: {n}-gram {' '.join(ws)!r} has the word {exc.args[0]!r}, "
                                "which is not a 1-gram") from None
            prob[k], bo[k] = p, b
        sort = np.lexsort(ids.T[::-1])
        ids, prob, bo = ids[sort], prob[sort], bo[sort]
        if len(ids) > 1 and not (np.diff(ids, axis=0) != 0).any(axis=1).all():
            raise ToolError(f"{origin}: an {n}-gram appears twice")
        grams[n], probs[n] = ids, prob
        if n < order:
            backoffs[n] = bo
        elif (bo != 0).any():
            log.warning("%s: back-off weights on the highest order (%d) are ignored", origin, n)
    return ArpaModel(order=order, words=words, uni_p=uni_p, uni_bo=uni_bo, grams=grams, probs=probs,
                     backoffs=backoffs)


# ------------------------------------------------------------------ quantization
def quantize(values: np.ndarray, exact_zero: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """8-bit codes for ``values``: a codebook of evenly spaced levels over their range
    (level 0 exactly 0.0 when ``exact_zero``); returns (codes, codebook, max error)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(CODE_LEVELS, dtype=np.float32), 0.0
    levels = CODE_LEVELS - 1 if exact_zero else CODE_LEVELS
    nonzero = values[values != 0] if exact_zero else values
    lo, hi = (float(nonzero.min()), float(nonzero.max())) if nonzero.size else (0.0, 0.0)
    grid = np.linspace(lo, hi, levels) if hi > lo else np.full(levels, lo)
    book = np.concatenate([[0.0], grid]) if exact_zero else grid
    book = book.astype(np.float32)
    # Nearest level (ties to the lower one, deterministic).
    order = np.argsort(book, kind="stable")
    sorted_book = book[order].astype(np.float64)
    mids = (sorted_book[1:] + sorted_book[:-1]) / 2
    codes = order[np.searchsorted(mids, values, side="left")].astype(np.uint8)
    if exact_zero:
        codes[values == 0] = 0
    error = float(np.abs(book[codes].astype(np.float64) - values).max())
    return codes, book, error


# ------------------------------------------------------------------ writing lm.bin
def pack(word_ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``(word id << 8) | code`` as uint32 (word ids must be below 2**24)."""
    if len(word_ids) and int(word_ids.max()) >= 1 << 24:
        raise ToolError(f"vocabulary of {int(word_ids.max()) + 1} words: at most {1 << 24} fit this format")
    return ((word_ids.astype(np.uint64) << 8) | codes.astype(np.uint64)).astype(np.uint32)


def build_arrays(model: ArpaModel) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of ``lm.bin`` and the quantization part of its metadata."""
    vocab = len(model.words)
    arrays: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    arrays["vocab_utf8"] = np.frombuffer("\n".join(model.words).encode("utf-8"), dtype=np.uint8)
    rev = sorted(range(vocab), key=lambda i: model.words[i][::-1])
    arrays["rev_order"] = np.array(rev, dtype=np.uint32)
    codes, book, errors["uni_p"] = quantize(model.uni_p)
    arrays["uni_p"], arrays["cb_uni_p"] = codes, book
    codes, book, errors["uni_bo"] = quantize(model.uni_bo, exact_zero=True)
    arrays["uni_bo"], arrays["cb_uni_bo"] = codes, book
    if model.order >= 2:
        ids = model.grams[2]
        arrays["bi_off"] = np.searchsorted(ids[:, 0], np.arange(vocab + 1)).astype(np.uint32)
        codes, book, errors["bi_p"] = quantize(model.probs[2])
        # Word id and probability code in one uint32: (w << 8) | code, sorted by w
        # within each history word, so one binary search finds both.
        arrays["bi_wp"] = pack(ids[:, 1], codes)
        arrays["cb_bi_p"] = book
    if model.order >= 3:
        bi = model.grams[2]
        tri = model.grams[3]
        # Each trigram's context as the global index of its bigram (w1, w2).
        bi_key = bi[:, 0] * vocab + bi[:, 1]
        ctx_key = tri[:, 0] * vocab + tri[:, 1]
        ctx_index = np.searchsorted(bi_key, ctx_key)
        ok = (ctx_index < len(bi_key)) & (bi_key[np.minimum(ctx_index, len(bi_key) - 1)] == ctx_key)
        if not ok.all():
            bad = tri[np.argmin(ok)]
            raise ToolError("a trigram's context is not a bigram: "
                            f"{model.words[bad[0]]} {model.words[bad[1]]} (the ARPA file is not well formed)")
        # "Contexts": the bigrams that have trigrams or a non-zero back-off (the others
        # back off with weight 0, so they need no entry).
        contexts = np.union1d(ctx_index, np.nonzero(model.backoffs[2] != 0)[0])
        arrays["ctx"] = contexts.astype(np.uint32)
        codes, book, errors["ctx_bo"] = quantize(model.backoffs[2][contexts], exact_zero=True)
        arrays["ctx_bo"], arrays["cb_ctx_bo"] = codes, book
        arrays["tri_off"] = np.searchsorted(ctx_index, contexts).astype(np.uint32)
        arrays["tri_off"] = np.append(arrays["tri_off"], len(tri)).astype(np.uint32)
        codes, book, errors["tri_p"] = quantize(model.probs[3])
        arrays["tri_wp"] = pack(tri[:, 2], codes)
        arrays["cb_tri_p"] = book
    quant = {"bits": 8, "levels": CODE_LEVELS, "spacing": "even over each array's range; back-off 0 exact",
             "max_abs_error_log10": {k: round(v, 6) for k, v in errors.items()}}
    return arrays, quant


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def convert(arpa: Path, out_file: Path, provenance: str = "", license_id: str = "") -> dict:
    """Convert ``arpa`` into ``out_file`` (lm.bin); return its metadata."""
    from edge.arrays_file import write_arrays

    started = time.monotonic()
    log.info("reading %s", arpa)
    model = read_arpa(Path(arpa))
    log.info("read %d words, %s in %.0f s", len(model.words),
             ", ".join(f"{len(g)} {n}-grams" for n, g in model.grams.items()), time.monotonic() - started)
    arrays, quant = build_arrays(model)
    meta = {
        "format": "fillmask-edge ngram lm 1",
        "order": model.order,
        "counts": {str(n): (len(model.words) if n == 1 else len(model.grams[n])) for n in range(1, model.order + 1)},
        "max_word_chars": max(len(w) for w in model.words),
        "log_base": 10,
        "quantization": quant,
        "source_file": Path(arpa).name,
        "source_sha256": file_sha256(Path(arpa)),
        "license": license_id,
        "provenance": provenance,
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    size = write_arrays(out_file, arrays, meta)
    meta["bytes"] = size
    log.info("wrote %s: %.1f MB in %.0f s; max rounding error (log10) %s", out_file, size / 1e6,
             time.monotonic() - started, quant["max_abs_error_log10"])
    return meta


# ------------------------------------------------------------------ bundle step
LM_FILE, LM_LICENSE_FILE, LM_README_FILE = "lm.bin", "lm.LICENSE", "lm.README.md"


def find_license(arpa: Path) -> tuple[Path | None, Path | None]:
    """The LICENSE* and README* files beside an ARPA file, if any."""
    folder = Path(arpa).parent
    licenses = sorted(p for p in folder.glob("LICENSE*") if p.is_file())
    readmes = sorted(p for p in folder.glob("README*") if p.is_file())
    return (licenses[0] if licenses else None), (readmes[0] if readmes else None)


def add_lm_to_bundle(bundle: Path, arpa: Path, license_file: Path | None = None, readme: Path | None = None,
                     license_id: str = "", provenance: str = "") -> dict:
    """Write lm.bin + its license and provenance into ``bundle`` and list them in the manifest."""
    from edge.manifest import Manifest

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    found_license, found_readme = find_license(arpa)
    license_file = license_file or found_license
    readme = readme or found_readme
    if license_file is None:
        raise ToolError(f"{arpa}: no LICENSE file beside it; give --license FILE (the LM ships with its license)")
    for path in (license_file, readme):
        if path is not None and not Path(path).is_file():
            raise ToolError(f"{path}: not found")
    if not provenance and readme is not None:
        provenance = f"see {LM_README_FILE} (copied from {Path(readme).name} beside {Path(arpa).name})"
    meta = convert(Path(arpa), bundle / LM_FILE, provenance=provenance, license_id=license_id)
    shutil.copyfile(license_file, bundle / LM_LICENSE_FILE)
    names = [LM_FILE, LM_LICENSE_FILE]
    if readme is not None:
        shutil.copyfile(readme, bundle / LM_README_FILE)
        names.append(LM_README_FILE)
    manifest.lm = manifest.attach_files(bundle, {k: meta[k] for k in (
        "order", "counts", "max_word_chars", "log_base", "quantization", "source_file", "source_sha256",
        "license", "provenance")}, names)
    manifest.save(bundle)
    return manifest.lm


# ------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m tools lm``."""
    sub = parser.add_subparsers(dest="lm_command", required=True, metavar="ACTION")
    conv = sub.add_parser("convert", help="ARPA → lm.bin (into a bundle: --bundle; or a file: --out)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    conv.add_argument("--arpa", type=Path, default=DEFAULT_ARPA, help="ARPA file (plain or .tar.xz)")
    add_output_arguments(conv, LM_FILE, "model", "LICENSE* beside the ARPA", "LGPL-2.1-or-later")
    conv.add_argument("--readme", type=Path, default=None, help="provenance note (default: README* beside the ARPA)")
    score = sub.add_parser("score", help="best segmentation of a text into LM words and its log10 probability")
    score.add_argument("--bundle", type=Path, default=None, help="bundle with lm.bin (default: the embedded one)")
    score.add_argument("text", nargs="+")


def run(args: argparse.Namespace) -> int:
    """Run ``lm convert`` or ``lm score``."""
    if args.lm_command == "convert":
        if args.bundle is not None:
            check_bundle_folder(args.bundle)
            add_lm_to_bundle(args.bundle, args.arpa, args.license, args.readme, args.license_id, args.provenance)
        else:
            convert(args.arpa, args.out, provenance=args.provenance, license_id=args.license_id)
        return 0
    from edge.ngram_lm import NgramLM

    lm = open_bundle_file(args.bundle, LM_FILE, NgramLM)
    for text in args.text:
        score, words = lm.best_segmentation(text)
        print(f"{score:.4f}\t{' '.join(words)}")
    return 0
