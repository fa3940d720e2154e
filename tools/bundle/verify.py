"""Check an exported model before it ships.

- FP32 parity: the FP32 ONNX export against the PyTorch model on seeded inputs of
  several shapes (batch, seq, n_masks, with padding). Tolerance, stated once here:
  ``max |onnx - torch| <= PARITY_ATOL + PARITY_RTOL * max |torch logits|`` (a
  relative bound on the logit scale with a small absolute floor), and the top-1 id
  must agree at every masked position whose top-2 margin exceeds that bound.
- INT8 agreement: the INT8 model against the FP32 one on real text: random CJK
  characters masked in held-apart corpus lines (test split of
  ``tools.train.corpus.split_documents``); top-1 agreement, mean top-5 overlap, and each
  model's accuracy at recovering the masked character.

``python -m tools verify --bundle DIR --checkpoint SRC`` checks a written bundle
(file hashes, vocabulary, logits) against the checkpoint it was built from.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edge.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, MASK_POSITIONS
from tools import ToolError

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3
PARITY_SHAPES = ((1, 8, 1), (2, 16, 2), (3, 40, 3))  # (batch, seq, n_masks)


def ort_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with a fixed thread count (quiet logging)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, input_ids, attention_mask, mask_positions) -> np.ndarray:
    """Logits ``[batch, n_masks, vocab]`` from an ONNX session (int64 inputs)."""
    feed = {
        INPUT_IDS: np.asarray(input_ids, dtype=np.int64),
        ATTENTION_MASK: np.asarray(attention_mask, dtype=np.int64),
        MASK_POSITIONS: np.asarray(mask_positions, dtype=np.int64),
    }
    return session.run([LOGITS], feed)[0]


def torch_logits(model, input_ids, attention_mask, mask_positions) -> np.ndarray:
    """Logits of the PyTorch model at ``mask_positions`` (same wrapper as the export)."""
    import torch

    from tools.bundle.masked_lm import MaskedPositionsLM

    wrapper = MaskedPositionsLM(model).eval()
    with torch.no_grad():
        out = wrapper(torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
                      torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
                      torch.as_tensor(np.asarray(mask_positions), dtype=torch.long))
    return out.numpy()


def seeded_inputs(vocab_size: int, special_ids: dict[str, int], batch: int, seq: int, n_masks: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded ``[CLS] ... [SEP]`` inputs with right padding on all rows but the first,
    and ``[MASK]`` at ``n_masks`` distinct positions of each row."""
    rng = np.random.default_rng(seed)
    specials = set(special_ids.values())
    ordinary = np.array([i for i in range(vocab_size) if i not in specials])
    ids = np.full((batch, seq), special_ids["[PAD]"], dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    positions = np.zeros((batch, n_masks), dtype=np.int64)
    for row in range(batch):
        length = seq if row == 0 else int(rng.integers(n_masks + 2, seq + 1))
        ids[row, :length] = rng.choice(ordinary, size=length)
        ids[row, 0], ids[row, length - 1] = special_ids["[CLS]"], special_ids["[SEP]"]
        mask[row, :length] = 1
        pos = np.sort(rng.choice(np.arange(1, length - 1), size=n_masks, replace=False))
        ids[row, pos] = special_ids["[MASK]"]
        positions[row] = pos
    return ids, mask, positions


@dataclass
class ParityReport:
    """FP32 export vs PyTorch."""

    max_abs_diff: float
    logit_scale: float
    tolerance: float
    top1_agreement: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {
            "max_abs_diff": self.max_abs_diff, "logit_scale": self.logit_scale,
            "tolerance": self.tolerance, "rule": f"max|diff| <= {PARITY_ATOL} + {PARITY_RTOL} * max|logit|",
            "top1_agreement": self.top1_agreement, "passed": self.passed,
            "shapes": [list(s) for s in PARITY_SHAPES],
        }


def check_parity(model, session, special_ids: dict[str, int], seed: int = 0) -> ParityReport:
    """Compare an FP32 ONNX session with the PyTorch model on seeded inputs."""
    vocab_size = model.config.vocab_size
    worst, scale, agree, total, ok = 0.0, 0.0, 0, 0, True
    for k, (batch, seq, n_masks) in enumerate(PARITY_SHAPES):
        seq = min(seq, model.config.max_position_embeddings)
        inputs = seeded_inputs(vocab_size, special_ids, batch, seq, n_masks, seed + k)
        ref = torch_logits(model, *inputs)
        got = run_session(session, *inputs)
        if got.shape != ref.shape:
            raise ToolError(f"ONNX logits have shape {got.shape}, PyTorch {ref.shape}")
        diff = float(np.max(np.abs(got - ref)))
        ref_scale = float(np.max(np.abs(ref)))
        tol = PARITY_ATOL + PARITY_RTOL * ref_scale
        worst, scale = max(worst, diff), max(scale, ref_scale)
        ok &= diff <= tol
        # top-1 must agree wherever the reference top-2 margin is larger than the tolerance
        top2 = np.sort(ref, axis=-1)[..., -2:]
        decided = (top2[..., 1] - top2[..., 0]) > tol
        same = ref.argmax(-1) == got.argmax(-1)
        ok &= bool(np.all(same[decided]))
        agree += int(same.sum())
        total += same.size
    tolerance = PARITY_ATOL + PARITY_RTOL * scale
    return ParityReport(worst, scale, tolerance, agree / total, bool(ok))


# -- INT8 vs FP32 on real text -----------------------------------------------------

@dataclass
class ClozeBatch:
    """Masked inputs and the ids that were masked."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    mask_positions: np.ndarray
    answers: np.ndarray  # [batch, n_masks]; -1 where unknown (synthetic inputs)


def cloze_batches(tokenizer, texts: Iterable[str], special_ids: dict[str, int], n_samples: int = 200,
                  masks_per_line: int = 2, max_length: int = 64, batch_size: int = 8, seed: int = 0,
                  ) -> list[ClozeBatch]:
    """Mask ``masks_per_line`` random single-CJK-character tokens (in the kept
    vocabulary) in each of up to ``n_samples`` lines, cut to ``max_length`` tokens."""
    from tools.bundle.corpus_counts import CJK_CHAR_RE

    rng = random.Random(seed)
    backend = tokenizer.backend_tokenizer
    unk = special_ids["[UNK]"]
    rows: list[tuple[list[int], list[int], list[int]]] = []
    lines = [line.strip() for text in texts for line in text.splitlines() if len(line.strip()) >= 8]
    rng.shuffle(lines)
    for line in lines:
        enc = backend.encode(line)
        ids = enc.ids[: max_length - 1] + ([special_ids["[SEP]"]] if len(enc.ids) > max_length - 1 else [])
        tokens = enc.tokens[: len(ids)]
        eligible = [i for i, (t, tid) in enumerate(zip(tokens, ids))
                    if tid != unk and len(t) == 1 and CJK_CHAR_RE.match(t)]
        if len(eligible) < masks_per_line + 2:
            continue
        positions = sorted(rng.sample(eligible, masks_per_line))
        answers = [ids[p] for p in positions]
        for p in positions:
            ids[p] = special_ids["[MASK]"]
        rows.append((ids, positions, answers))
        if len(rows) >= n_samples:
            break
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seq = max(len(r[0]) for r in chunk)
        ids = np.full((len(chunk), seq), special_ids["[PAD]"], dtype=np.int64)
        mask = np.zeros((len(chunk), seq), dtype=np.int64)
        for i, (row_ids, _, _) in enumerate(chunk):
            ids[i, :len(row_ids)] = row_ids
            mask[i, :len(row_ids)] = 1
        batches.append(ClozeBatch(ids, mask, np.array([r[1] for r in chunk], dtype=np.int64),
                                  np.array([r[2] for r in chunk], dtype=np.int64)))
    return batches


def compare_models(reference, candidate, batches: list[ClozeBatch]) -> dict[str, Any]:
    """Top-1 agreement and top-5 overlap of ``candidate`` vs ``reference`` (callables
    ``(ids, mask, positions) -> logits``), and both models' cloze accuracy."""
    agree, overlap, ref_hits, cand_hits, known, n = 0, 0.0, 0, 0, 0, 0
    max_diff = 0.0
    for b in batches:
        ref = reference(b.input_ids, b.attention_mask, b.mask_positions)
        got = candidate(b.input_ids, b.attention_mask, b.mask_positions)
        max_diff = max(max_diff, float(np.max(np.abs(ref - got))))
        ref5 = np.argsort(-ref, axis=-1)[..., :5]
        got5 = np.argsort(-got, axis=-1)[..., :5]
        for r5, g5, answer in zip(ref5.reshape(-1, 5), got5.reshape(-1, 5), b.answers.reshape(-1)):
            agree += int(r5[0] == g5[0])
            overlap += len(set(r5.tolist()) & set(g5.tolist())) / 5
            ref_hits += int(r5[0] == answer)
            cand_hits += int(g5[0] == answer)
            known += int(answer >= 0)
            n += 1
    if n == 0:
        return {"masked_positions": 0}
    result = {
        "masked_positions": n,
        "top1_agreement": agree / n,
        "top5_overlap": overlap / n,
        "max_abs_logit_diff": max_diff,
    }
    if known == n:  # accuracy only where the masked token is known (real text)
        result["reference_top1_accuracy"] = ref_hits / n
        result["candidate_top1_accuracy"] = cand_hits / n
    return result


def session_fn(session):
    """Wrap an ONNX session as ``(ids, mask, positions) -> logits``."""
    return lambda ids, mask, pos: run_session(session, ids, mask, pos)


def check_bundle_files(bundle: str | Path):
    """Load a bundle's manifest and check every listed file's size and sha256."""
    from edge.manifest import Manifest, ManifestError, file_entry

    bundle = Path(bundle)
    try:
        manifest = Manifest.load(bundle)
    except ManifestError as exc:
        raise ToolError(str(exc)) from exc
    for name, entry in manifest.files.items():
        path = bundle / name
        if not path.is_file():
            raise ToolError(f"{path}: listed in the manifest but missing")
        actual = file_entry(path)
        if (actual.size, actual.sha256) != (entry.size, entry.sha256):
            raise ToolError(f"{path}: expected size {entry.size} sha256 {entry.sha256[:12]}…, "
                            f"found size {actual.size} sha256 {actual.sha256[:12]}…")
    return manifest


def verify_bundle(bundle: str | Path, ckpt, corpus_texts: list[str] | None = None, samples: int = 100) -> dict[str, Any]:
    """Check a written bundle against the (trimmed) checkpoint it was built from:
    file hashes, vocabulary and special ids, and logits (parity for an FP32 bundle,
    agreement with the PyTorch model for a quantized one). Raises ToolError."""
    from tokenizers import Tokenizer

    from edge.manifest import MODEL_FILE, TOKENIZER_FILE

    bundle = Path(bundle)
    manifest = check_bundle_files(bundle)
    tokenizer = Tokenizer.from_file(str(bundle / TOKENIZER_FILE))
    if tokenizer.get_vocab() != ckpt.tokenizer.get_vocab():
        raise ToolError(f"{bundle / TOKENIZER_FILE}: vocabulary differs from the checkpoint's "
                        f"({tokenizer.get_vocab_size()} vs {len(ckpt.tokenizer.get_vocab())} tokens)")
    special = ckpt.special_ids()
    if manifest.special_ids != special or manifest.vocab_size != ckpt.model.config.vocab_size:
        raise ToolError(f"{bundle}: manifest special ids / vocab size do not match the checkpoint")
    session = ort_session(bundle / MODEL_FILE)
    result: dict[str, Any] = {"bundle": str(bundle), "files": "ok"}
    if manifest.quantization is None:
        parity = check_parity(ckpt.model, session, special)
        result["parity"] = parity.as_dict()
        if not parity.passed:
            raise ToolError(f"{bundle / MODEL_FILE}: FP32 parity failed: max|diff| {parity.max_abs_diff:.3g} "
                            f"> {parity.tolerance:.3g}")
    texts = corpus_texts or []
    batches = cloze_batches(ckpt.tokenizer, texts, special, n_samples=samples,
                             max_length=min(64, ckpt.model.config.max_position_embeddings)) if texts else []
    if not batches:  # no corpus: seeded synthetic sequences still compare the logits
        batches = [ClozeBatch(*seeded_inputs(ckpt.model.config.vocab_size, special, 4, 24, 2, 100 + k),
                              answers=np.full((4, 2), -1, dtype=np.int64)) for k in range(4)]
        result["inputs"] = "seeded random tokens (no corpus)"
    result["vs_pytorch"] = compare_models(lambda *a: torch_logits(ckpt.model, *a), session_fn(session), batches)
    return result


# -- command line --------------------------------------------------------------------

def add_arguments(parser) -> None:
    """Options of ``python -m tools verify``."""
    from tools.bundle.corpus_counts import default_corpus

    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder to check")
    parser.add_argument("--checkpoint", required=True,
                        help="the (trimmed) checkpoint folder the bundle was built from; for a --random-init "
                             "build, the source folder with --random-init --seed as used")
    parser.add_argument("--random-init", action="store_true", help="rebuild the seeded random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=None,
                        help="with --random-init: trim the rebuilt model to this size, as the build did "
                             "(default: the bundle's vocab_size)")
    parser.add_argument("--corpus", type=Path, default=default_corpus(), help="corpus for held-apart test lines")
    parser.add_argument("--samples", type=int, default=100, help="masked lines to compare")


def run(args) -> int:
    """Verify a bundle and print the report as JSON."""
    import json

    from tools.bundle.checkpoint import load_checkpoint
    from tools.bundle.corpus_counts import corpus_stats
    from tools.bundle.trim_vocab import plan_trim, trim_checkpoint

    ckpt = load_checkpoint(args.checkpoint, random_init=args.random_init, seed=args.seed)
    stats = corpus_stats(args.corpus) if args.corpus else None
    if args.random_init:
        # The bundle was trimmed after the random init; repeat the same trim (same corpus).
        target = args.vocab or check_bundle_files(args.bundle).vocab_size
        trim_checkpoint(ckpt, plan_trim(ckpt.vocab, target, stats, ckpt.tokenizer))
    report = verify_bundle(args.bundle, ckpt, stats.test_texts if stats else None, args.samples)
    print(json.dumps(report, ensure_ascii=False, indent=2))
    log.info("bundle %s verified", args.bundle)
    return 0
