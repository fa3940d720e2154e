"""What a bundle's manifest says about where its model came from, for ``tools build``.

The fields a quantized bundle and its FP32 twin share: the source checkpoint and
revision, its architecture, the vocabulary trim, whether the weights are random, the
tool version, and (for a checkpoint this project trained) a summary of its
``training.json``.
"""

from __future__ import annotations

from typing import Any

import edge
from edge.manifest import Architecture
from tools.bundle.checkpoint import architecture_of, read_training_record

# Fields of a ``training.json`` (written by ``tools pretrain`` / ``tools distill``)
# that the manifest keeps: enough to say how the model was made.
TRAINING_FIELDS = ("objective", "teacher", "teacher_shape", "layer_map", "init", "augment", "shape", "params",
                   "seq_len", "seq_schedule", "batch_size", "lr", "seed", "steps", "tokens_seen", "train_minutes",
                   "device", "threads", "corpus", "phases", "total_train_minutes", "total_tokens_seen", "total_steps")


def manifest_fields(ckpt, source: str, special: dict[str, int], plan, notes: str) -> dict[str, Any]:
    """The manifest fields a quantized bundle and its FP32 twin share."""
    config = ckpt.model.config
    return dict(
        training=training_summary(source),
        source=ckpt.source, source_revision=ckpt.revision, architecture=Architecture(**architecture_of(config)),
        vocab_size=config.vocab_size, special_ids=special, max_length=config.max_position_embeddings,
        random_init=ckpt.random_init, tool_version=edge.__version__, vocab=plan.info(),
        notes=notes or (f"RANDOM WEIGHTS (torch seed {ckpt.seed}): for speed/size benchmarks only; "
                        "answers are meaningless." if ckpt.random_init else ""),
    )


def training_summary(source) -> dict | None:
    """The training record of a checkpoint folder this project trained (else None)."""
    info = read_training_record(source)
    if info is None:
        return None
    summary = {k: info[k] for k in TRAINING_FIELDS if k in info}
    meta = info.get("corpus_meta") or {}
    summary.update({k: meta[k] for k in ("train_documents", "test_documents", "train_tokens") if k in meta})
    last = info.get("last") or {}
    summary.update({f"final_{k}": last[k] for k in ("loss", "mlm_acc", "soft_ce", "teacher_agree") if k in last})
    return summary
