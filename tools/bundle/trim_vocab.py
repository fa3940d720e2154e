"""Trim a BERT vocabulary: drop what Chinese BERT tokenization can never produce,
then rare tokens by corpus frequency, and re-index the model to match.

1. ``##`` + one CJK character (BERT splits every CJK character off as a word of its
   own, so a CJK character is never a continuation piece) and ``[unusedN]``.
2. Rare tokens, by how often the source tokenizer produces them over a corpus, down
   to a target size. Special tokens are always kept; kept tokens stay in their
   original id order.

The word embedding rows, the MLM decoder rows and the decoder bias are re-indexed
together in the torch model (before export), ``config.vocab_size`` updated and the
embedding/decoder tie kept. The matching ``tokenizer.json`` is the source one with
its WordPiece vocabulary replaced (same normalizer, pre-tokenizer, post-processor),
so anything outside the kept vocabulary becomes ``[UNK]``.

Token frequencies are exact but cheap: BERT's pre-tokenizer makes every CJK
character a word of its own, so the corpus is counted as characters plus non-CJK
runs, and only the *distinct* characters and runs go through the tokenizer.
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
from typing import Any, Iterable

from edge.manifest import SPECIAL_TOKENS
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
UNUSED_RE = re.compile(r"^\[unused\d+\]$")
CACHE_VERSION = 1
MAX_TEST_TEXTS = 4000
# Training-split documents kept for static INT8 calibration: one in CALIBRATION_EVERY
# (by a hash of the text, so the choice does not depend on file order), at most
# MAX_CALIBRATION_TEXTS of them.
MAX_CALIBRATION_TEXTS = 256
CALIBRATION_EVERY = 97


def is_cjk_wordpiece(token: str) -> bool:
    """True for ``##`` + one CJK character (never produced by BERT Chinese tokenization)."""
    return len(token) == 3 and token.startswith("##") and bool(CJK_CHAR_RE.fullmatch(token[2]))


def is_unused(token: str) -> bool:
    """True for ``[unusedN]`` placeholder tokens."""
    return bool(UNUSED_RE.match(token))


# -- corpus statistics ------------------------------------------------------------

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


def token_counts(stats: CorpusStats, tokenizer) -> tuple[Counter, dict[str, list[int]]]:
    """Exact token frequencies of the corpus under ``tokenizer`` (a transformers fast
    tokenizer). Returns (id -> count, piece -> ids) where piece is a distinct CJK
    character or non-CJK run."""
    backend = tokenizer.backend_tokenizer
    pieces = list(stats.chars) + list(stats.runs)
    encodings = backend.encode_batch(pieces, add_special_tokens=False)
    ids_of = {piece: enc.ids for piece, enc in zip(pieces, encodings)}
    counts: Counter = Counter()
    for table in (stats.chars, stats.runs):
        for piece, n in table.items():
            for token_id in ids_of[piece]:
                counts[token_id] += n
    return counts, ids_of


# -- choosing the vocabulary ------------------------------------------------------

@dataclass
class TrimPlan:
    """Which original ids to keep, and what the trim costs."""

    kept_ids: list[int]  # original ids, ascending
    original_size: int
    dropped_wordpiece: int
    dropped_unused: int
    dropped_rare: int
    coverage: float | None = None  # share of corpus non-space chars whose tokens are kept
    coverage_cjk: float | None = None  # same, CJK characters only
    original_coverage: float | None = None  # same for the untrimmed vocabulary (upper bound)
    test_coverage: float | None = None  # the same three on the held-apart test split
    test_coverage_cjk: float | None = None
    test_original_coverage: float | None = None
    corpus: str | None = None

    def info(self) -> dict[str, Any]:
        """The manifest ``vocab`` entry."""
        return {
            "original_size": self.original_size,
            "kept": len(self.kept_ids),
            "dropped_wordpiece": self.dropped_wordpiece,
            "dropped_unused": self.dropped_unused,
            "dropped_rare": self.dropped_rare,
            "coverage": self.coverage,
            "coverage_cjk": self.coverage_cjk,
            "original_coverage": self.original_coverage,
            "test_coverage": self.test_coverage,
            "test_coverage_cjk": self.test_coverage_cjk,
            "test_original_coverage": self.test_original_coverage,
            "coverage_definition": "share of non-space corpus characters whose tokens are all kept "
                                   "(training split; test_* on the held-apart split)",
            "corpus": self.corpus,
        }


def plan_trim(vocab: dict[str, int], target_size: int | None, stats: CorpusStats | None = None,
              tokenizer=None) -> TrimPlan:
    """Choose the ids to keep.

    ``vocab`` is token -> id. Drops ``##``+CJK and ``[unusedN]``, then (when
    ``target_size`` is smaller than what is left) the least frequent tokens in
    ``stats``, ties broken by original id. Specials are always kept.
    """
    n_special = len(SPECIAL_TOKENS)
    if target_size is not None and target_size < n_special:
        raise ToolError(f"--vocab {target_size} is smaller than the {n_special} special tokens "
                        f"({' '.join(SPECIAL_TOKENS)}) that must be kept")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ToolError(f"vocabulary lacks special token(s) {', '.join(missing)}")
    special = {vocab[t] for t in SPECIAL_TOKENS}
    wordpiece = {i for t, i in vocab.items() if is_cjk_wordpiece(t) and i not in special}
    unused = {i for t, i in vocab.items() if is_unused(t) and i not in special}
    candidates = sorted(i for i in vocab.values() if i not in special | wordpiece | unused)

    counts: Counter = Counter()
    ids_of: dict[str, list[int]] = {}
    if stats is not None:
        if tokenizer is None:
            raise ValueError("plan_trim needs the tokenizer to count tokens")
        counts, ids_of = token_counts(stats, tokenizer)
    room = len(candidates) if target_size is None else max(0, target_size - n_special)
    if room < len(candidates):
        if stats is None:
            raise ToolError(f"--vocab {target_size} is below the {len(candidates) + n_special} tokens left "
                            "after the structural trim; pass --corpus so rare tokens can be ranked by frequency")
        ranked = sorted(candidates, key=lambda i: (-counts[i], i))
        chosen = set(ranked[:room])
    else:
        chosen = set(candidates)
    kept = sorted(chosen | special)
    plan = TrimPlan(kept_ids=kept, original_size=len(vocab), dropped_wordpiece=len(wordpiece),
                    dropped_unused=len(unused), dropped_rare=len(candidates) - len(chosen))
    if stats is not None:
        unk = vocab["[UNK]"]
        kept_set = set(kept) - {unk}
        all_ids = set(vocab.values()) - {unk}
        plan.coverage, plan.coverage_cjk = _coverage(stats, ids_of, kept_set)
        plan.original_coverage, _ = _coverage(stats, ids_of, all_ids)
        plan.corpus = stats.source
        if stats.test_texts:
            # Held-apart documents were not counted: their coverage shows how the
            # choice generalises to text the ranking never saw.
            chars, runs, n = count_texts(stats.test_texts)
            held = CorpusStats(chars, runs, [], n)
            new_pieces = [p for p in list(chars) + list(runs) if p not in ids_of]
            encodings = tokenizer.backend_tokenizer.encode_batch(new_pieces, add_special_tokens=False)
            ids_of.update({p: e.ids for p, e in zip(new_pieces, encodings)})
            plan.test_coverage, plan.test_coverage_cjk = _coverage(held, ids_of, kept_set)
            plan.test_original_coverage, _ = _coverage(held, ids_of, all_ids)
    return plan


def _coverage(stats: CorpusStats, ids_of: dict[str, list[int]], kept: set[int]) -> tuple[float, float]:
    """Share of corpus characters (all non-space; CJK only) whose tokens are all in ``kept``."""
    cjk_total = sum(stats.chars.values())
    cjk_kept = sum(n for c, n in stats.chars.items() if all(i in kept for i in ids_of[c]))
    run_total = sum(len(r) * n for r, n in stats.runs.items())
    run_kept = sum(len(r) * n for r, n in stats.runs.items() if all(i in kept for i in ids_of[r]))
    total = cjk_total + run_total
    return ((cjk_kept + run_kept) / total if total else 0.0, cjk_kept / cjk_total if cjk_total else 0.0)


# -- applying the plan ---------------------------------------------------------------

def trim_model(model, kept_ids: list[int]) -> None:
    """Re-index the word embedding, MLM decoder weight and bias of ``model`` in place to
    ``kept_ids`` (original ids, ascending); update ``config.vocab_size``; keep the tie."""
    import torch

    old_size = model.get_input_embeddings().weight.shape[0]
    if any(i < 0 or i >= old_size for i in kept_ids) or kept_ids != sorted(set(kept_ids)):
        raise ValueError("kept_ids must be ascending, unique ids of the model's vocabulary")
    index = torch.tensor(kept_ids, dtype=torch.long)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        old_emb = model.get_input_embeddings()
        pad = getattr(model.config, "pad_token_id", None)
        new_pad = kept_ids.index(pad) if pad is not None and pad in kept_ids else None
        new_emb = torch.nn.Embedding(len(kept_ids), old_emb.weight.shape[1], padding_idx=new_pad)
        new_emb.weight.copy_(old_emb.weight[index])
        model.set_input_embeddings(new_emb)

        old_dec = model.get_output_embeddings()
        new_dec = torch.nn.Linear(old_dec.in_features, len(kept_ids), bias=old_dec.bias is not None)
        new_dec.weight.copy_(new_emb.weight if tied else old_dec.weight[index])
        if old_dec.bias is not None:
            new_dec.bias.copy_(old_dec.bias[index])
        model.set_output_embeddings(new_dec)
        # BERT's head keeps its own ``bias`` parameter tied to ``decoder.bias``.
        for module in model.modules():
            if getattr(module, "decoder", None) is new_dec and isinstance(getattr(module, "bias", None), torch.nn.Parameter):
                module.bias = new_dec.bias
    model.config.vocab_size = len(kept_ids)
    if new_pad is not None:
        model.config.pad_token_id = new_pad
    if tied:
        new_dec.weight = new_emb.weight
    # Every vocabulary-sized tensor of the MLM must now have the new size.
    sized = [model.get_input_embeddings().weight, new_dec.weight] + ([new_dec.bias] if new_dec.bias is not None else [])
    if any(t.shape[0] != len(kept_ids) for t in sized):
        raise ValueError("re-indexing left a vocabulary-sized tensor at its old size")


def trimmed_tokenizer_json(tokenizer_json: str, vocab: dict[str, int], kept_ids: list[int]) -> str:
    """Return the source ``tokenizer.json`` text with its WordPiece vocabulary reduced to
    ``kept_ids`` (re-numbered 0..n-1 in original order) and special ids updated."""
    data = json.loads(tokenizer_json)
    model = data.get("model", {})
    if model.get("type") not in (None, "WordPiece") or "vocab" not in model:
        raise ToolError("only WordPiece (BERT) tokenizers can be trimmed")
    token_of = {i: t for t, i in vocab.items()}
    new_vocab = {token_of[old]: new for new, old in enumerate(kept_ids)}
    model["vocab"] = new_vocab
    data["added_tokens"] = [
        dict(tok, id=new_vocab[tok["content"]]) for tok in data.get("added_tokens", [])
        if tok["content"] in new_vocab
    ]
    post = data.get("post_processor") or {}
    for entry in (post.get("special_tokens") or {}).values():
        entry["ids"] = [new_vocab[t] for t in entry["tokens"]]
    for key in ("cls", "sep"):  # BertProcessing stores [token, id] pairs
        if isinstance(post.get(key), list):
            post[key] = [post[key][0], new_vocab[post[key][0]]]
    return json.dumps(data, ensure_ascii=False)


def trim_checkpoint(ckpt, plan: TrimPlan):
    """Apply ``plan`` to a loaded Checkpoint in place: model re-indexed, tokenizer replaced."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = ckpt.tokenizer.get_vocab()
    text = trimmed_tokenizer_json(ckpt.tokenizer.backend_tokenizer.to_str(), vocab, plan.kept_ids)
    backend = Tokenizer.from_str(text)
    trim_model(ckpt.model, plan.kept_ids)
    ckpt.tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    return ckpt


def save_checkpoint(ckpt, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a (trimmed) Checkpoint as a Hugging Face folder plus its provenance file."""
    from tools.bundle.checkpoint import PROVENANCE_FILE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.model.save_pretrained(str(out))
    ckpt.tokenizer.save_pretrained(str(out))
    provenance = {"source": ckpt.source, "revision": ckpt.revision, "random_init": ckpt.random_init,
                  "seed": ckpt.seed, **(extra or {})}
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return out


def default_corpus() -> Path | None:
    """``../shared/data`` relative to the repository, when it exists."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return path if path.is_dir() else None


# -- command line --------------------------------------------------------------------

def add_arguments(parser) -> None:
    """Options of ``python -m tools trim``."""
    from tools.bundle.checkpoint import add_source_arguments

    add_source_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder for the trimmed checkpoint")
    parser.add_argument("--vocab", type=int, default=None, help="target vocabulary size (default: structural trim only)")
    parser.add_argument("--corpus", type=Path, default=default_corpus(),
                        help="corpus file/folder for token frequencies (.json/.txt)")
    parser.add_argument("--no-cache", action="store_true", help="recount the corpus instead of using cached counts")


def run(args) -> int:
    """Load, trim and save a checkpoint; print the trim report."""
    from tools.bundle.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.source, random_init=args.random_init, seed=args.seed, revision=args.revision)
    stats = corpus_stats(args.corpus, use_cache=not args.no_cache) if args.corpus else None
    plan = plan_trim(ckpt.vocab, args.vocab, stats, ckpt.tokenizer)
    log_plan(plan)
    trim_checkpoint(ckpt, plan)
    save_checkpoint(ckpt, args.out, {"vocab": plan.info()})
    log.info("trimmed checkpoint written to %s", args.out)
    return 0


def log_plan(plan: TrimPlan) -> None:
    """Log what the trim keeps and drops."""
    log.info("vocabulary %d -> %d (dropped: %d ##CJK, %d [unused], %d rare)", plan.original_size,
             len(plan.kept_ids), plan.dropped_wordpiece, plan.dropped_unused, plan.dropped_rare)
    if plan.coverage is not None:
        log.info("corpus coverage: %.4f%% of characters (%.4f%% of CJK); untrimmed vocabulary %.4f%%",
                 100 * plan.coverage, 100 * plan.coverage_cjk, 100 * plan.original_coverage)
    if plan.test_coverage is not None:
        log.info("held-apart coverage: %.4f%% of characters (%.4f%% of CJK); untrimmed vocabulary %.4f%%",
                 100 * plan.test_coverage, 100 * plan.test_coverage_cjk, 100 * plan.test_original_coverage)
