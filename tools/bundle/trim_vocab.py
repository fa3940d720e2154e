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
runs (:mod:`tools.bundle.corpus_counts`), and only the *distinct* characters and
runs go through the tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.manifest import SPECIAL_TOKENS
from tools import ToolError
from tools.bundle.corpus_counts import CJK_CHAR_RE, CorpusStats, corpus_stats, count_texts, default_corpus

log = logging.getLogger(__name__)

UNUSED_RE = re.compile(r"^\[unused\d+\]$")


def is_cjk_wordpiece(token: str) -> bool:
    """True for ``##`` + one CJK character (never produced by BERT Chinese tokenization)."""
    return len(token) == 3 and token.startswith("##") and bool(CJK_CHAR_RE.fullmatch(token[2]))


def is_unused(token: str) -> bool:
    """True for ``[unusedN]`` placeholder tokens."""
    return bool(UNUSED_RE.match(token))


# -- choosing the vocabulary ------------------------------------------------------

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
