"""``python -m tools mlm-loss``: masked-LM loss of checkpoints on the same masks.

The training log's loss is over the training objective (whole-word and character
masking, 80/10/10 replacement, dropout on) and moves with the learning rate, so it
cannot say whether a later phase really learned more. This command scores each
checkpoint on *identical* blanks — 15% of the characters of each passage replaced by
[MASK], drawn once from a fixed seed, dropout off — on a text file (one passage per
line, e.g. a run's ``data/test_passages.txt``) and, optionally, on a sample of the
training token stream (a run's ``data/ids.npy``), so held-apart and training loss can
be compared across checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from tools import ToolError

log = logging.getLogger(__name__)
MASK_RATE = 0.15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``tools mlm-loss``."""
    parser.add_argument("--checkpoint", action="append", required=True, type=Path,
                        help="Hugging Face BertForMaskedLM folder (repeatable; the first one's tokenizer is used)")
    parser.add_argument("--text", type=Path, required=True, help="passages, one per line (held-apart text)")
    parser.add_argument("--train-ids", type=Path, help="a run's data/ids.npy: also score chunks of the training stream")
    parser.add_argument("--train-chunks", type=int, default=4000, help="chunks drawn from --train-ids")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sequence, [CLS] and [SEP] included")
    parser.add_argument("--seed", type=int, default=1, help="seed of the masks (the same for every checkpoint)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def read_passages(path: Path, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids ([CLS] … [SEP]) of each non-empty line of ``path``."""
    if not path.is_file():
        raise ToolError(f"{path}: no such text file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ToolError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    seqs = [tokenizer(line, truncation=True, max_length=max_length)["input_ids"] for line in lines if line]
    seqs = [s for s in seqs if len(s) > 2]
    if not seqs:
        raise ToolError(f"{path}: no passages (one per line expected)")
    return seqs


def sample_training_chunks(path: Path, n: int, max_length: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """``n`` chunks of the training token stream ``path`` (ids.npy), framed as [CLS] … [SEP]."""
    if not path.is_file():
        raise ToolError(f"{path}: no such token file")
    try:
        ids = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise ToolError(f"{path}: not a .npy token array ({exc})") from None
    body = max_length - 2
    if ids.ndim != 1 or len(ids) <= body:
        raise ToolError(f"{path}: expected a 1-D token stream longer than {body} tokens, got shape {ids.shape}")
    starts = np.random.default_rng(0).integers(0, len(ids) - body, n)
    return [[cls_id, *map(int, ids[s:s + body]), sep_id] for s in starts]


def masked_batches(seqs: list[list[int]], mask_id: int, seed: int, batch_size: int = 64):
    """Yield (input_ids, attention_mask, labels) with 15% of the non-special tokens
    masked; the masks depend only on ``seed`` and the sequences, not on the model."""
    import torch

    rng = np.random.default_rng(seed)
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i:i + batch_size]
        length = max(map(len, batch))
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        att = torch.zeros_like(ids)
        for j, s in enumerate(batch):
            ids[j, :len(s)] = torch.tensor(s)
            att[j, :len(s)] = 1
        masked = torch.from_numpy(rng.random(ids.shape) < MASK_RATE) & (att == 1)
        masked[:, 0] = False                                       # [CLS]
        masked[torch.arange(len(batch)), att.sum(1) - 1] = False   # [SEP]
        labels = torch.full_like(ids, -100)
        labels[masked] = ids[masked]
        ids[masked] = mask_id
        yield ids, att, labels


def mean_loss(model, seqs: list[list[int]], mask_id: int, seed: int) -> tuple[float, int]:
    """(mean cross-entropy per masked token, number of masked tokens) of ``model``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, att, labels in masked_batches(seqs, mask_id, seed):
            n = int((labels != -100).sum())
            if n:
                total += model(input_ids=ids, attention_mask=att, labels=labels).loss.item() * n
                count += n
    return total / max(count, 1), count


def run(args: argparse.Namespace) -> int:
    """Score every checkpoint on the same masks; log (and optionally print) the losses."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    if args.threads:
        torch.set_num_threads(args.threads)
    for ckpt in args.checkpoint:
        if not (ckpt / "config.json").is_file():
            raise ToolError(f"{ckpt}: not a checkpoint folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint[0])
    sets = {"held_apart": read_passages(args.text, tokenizer, args.max_length)}
    if args.train_ids:
        sets["train_sample"] = sample_training_chunks(args.train_ids, args.train_chunks, args.max_length,
                                                      tokenizer.cls_token_id, tokenizer.sep_token_id)
    results = []
    for ckpt in args.checkpoint:
        model = BertForMaskedLM.from_pretrained(ckpt).eval()
        row = {"checkpoint": str(ckpt), "layers": model.config.num_hidden_layers}
        for name, seqs in sets.items():
            loss, n = mean_loss(model, seqs, tokenizer.mask_token_id, args.seed)
            row[f"{name}_loss"], row[f"{name}_masked"] = round(loss, 4), n
        log.info("%s", json.dumps(row))
        results.append(row)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0
