"""``python -m tools pretrain``: train a compact Chinese BERT masked-LM from scratch.

Whole-word masking (jieba words, BERT-wwm: 15% of tokens, 80/10/10) on the corpora
of ``../shared/data`` (see :mod:`tools.train.wwm` for the data preparation and cache).
Training is bounded by wall-clock time (``--max-minutes``, total over resumes): the
learning rate warms up and then decays linearly over the *fraction of the time
budget used* (or of ``--max-steps`` when given, whichever is further along), so a
run always ends at a small learning rate however fast the machine is. Checkpoints
are written every ``--checkpoint-minutes`` and at the end as a normal Hugging Face
folder (``config.json``, ``model.safetensors``, ``vocab.txt``, ``tokenizer.json``)
that ``python -m tools build --source`` loads like any checkpoint; ``--resume``
continues from it.

Run folder layout (``--run-dir``)::

    data/        prepared corpus cache (ids.npy, word_start.npy, vocab.txt, prep.json)
                 and data/test_passages.txt, the held-apart passages for evaluation
    checkpoint/  the latest HF checkpoint (+ training.json: what it was trained on)
    state.pt     optimizer state, step, elapsed time, tokens seen (for --resume)
    metrics.jsonl  one JSON object per progress line

Only the time-based schedule is not bit-reproducible (it depends on speed); with
``--max-steps`` and a time budget that is not reached, runs are deterministic for a
given seed on the same machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np

from tools import ToolError
from tools.train import wwm
from tools.bundle.checkpoint import TRAINING_FILE, read_training_record

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data"
DEFAULT_BASE_VOCAB = SHARED / "models" / "bert-base-chinese" / "vocab.txt"
MASK_UNITS = ("word", "char", "mixed")
SHAPE_HELP = "LAYERSxHIDDENxHEADSxINTERMEDIATE, e.g. 4x256x4x1024"
DEFAULT_SHAPE = "4x256x4x1024"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``pretrain``."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus folder or file")
    parser.add_argument("--base-vocab", type=Path, default=DEFAULT_BASE_VOCAB,
                        help="bert-base-chinese vocab.txt the kept vocabulary is taken from")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "default", help="run folder")
    parser.add_argument("--shape", default=None,
                        help=f"{SHAPE_HELP} (default {DEFAULT_SHAPE}; with --init-from: the checkpoint's shape, "
                             "or the same with more layers to grow it by stacking its layers)")
    parser.add_argument("--max-position", type=int, default=128, help="max_position_embeddings")
    parser.add_argument("--seq-len", type=int, default=128, help="training sequence length (with [CLS]/[SEP])")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per step (at --seq-len)")
    parser.add_argument("--seq-schedule", default="",
                        help="sequence-length warm-up, e.g. '16:0.3,32:0.7': length 16 until 30%% of the "
                             "budget, 32 until 70%%, then --seq-len; tokens per step stay the same")
    parser.add_argument("--lr", type=float, default=8e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of the budget")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="hidden/attention dropout (0: a short run under-fits, it does not over-fit)")
    parser.add_argument("--mask-prob", type=float, default=0.15)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this checkpoint's weights (fresh optimizer and schedules); with a smaller "
                             "--max-position its position table is cut to that length; with a --shape of more "
                             "layers it is grown by stacking")
    parser.add_argument("--mask-unit", choices=MASK_UNITS, default="word",
                        help="mask whole jieba words (BERT-wwm), single tokens (original BERT), or each on "
                             "half the sequences")
    parser.add_argument("--max-minutes", type=float, default=80.0, help="training time budget, total over resumes")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="save and stop at this step without changing the schedule (resume later)")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0, help="save every N minutes")
    parser.add_argument("--log-every", type=int, default=20, help="progress line every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint + state.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-seed", action="store_true",
                        help="allow --init-from a checkpoint already trained with this seed, length and batch size "
                             "(its batches and blanks would be replayed)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:0 …)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (a GPU, or a CPU with AVX512-BF16: 1.4x the tokens/s "
                             "of FP32 for 8x128 on a 2-core Zen 5)")
    parser.add_argument("--min-freq", type=int, default=2, help="keep tokens used at least this often")
    parser.add_argument("--max-vocab", type=int, default=None, help="cap on the kept vocabulary size")
    parser.add_argument("--test-fraction", type=float, default=0.02, help="held-apart share of documents")
    parser.add_argument("--prepare-only", action="store_true", help="prepare (and cache) the data, then stop")
    parser.add_argument("--measure", metavar="SHAPES", default=None,
                        help="comma-separated shapes: measure training tokens/s of each, then stop")
    parser.add_argument("--measure-seconds", type=float, default=20.0, help="time per shape for --measure")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """Parse ``LxHxAxI`` (layers, hidden, heads, intermediate)."""
    try:
        layers, hidden, heads, inter = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ToolError(f"--shape {text!r}: expected {SHAPE_HELP}") from None
    if min(layers, hidden, heads, inter) <= 0 or hidden % heads:
        raise ToolError(f"--shape {text!r}: sizes must be positive and hidden divisible by heads")
    return layers, hidden, heads, inter


def make_config(shape: str, vocab_size: int, max_position: int, dropout: float, pad_id: int):
    """A ``BertConfig`` of the given shape."""
    from transformers import BertConfig

    layers, hidden, heads, inter = parse_shape(shape)
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inter,
                      max_position_embeddings=max_position, type_vocab_size=2,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                      pad_token_id=pad_id, architectures=["BertForMaskedLM"])


def masked_lm_loss(model, input_ids, attention_mask, labels):
    """Loss and (correct, total) over masked tokens; the vocabulary projection runs
    only at masked positions (15% of the tokens), which is what the bundle does too."""
    import torch.nn.functional as F

    hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    selected = labels != -100
    logits = model.cls(hidden[selected]).float()
    target = labels[selected]
    loss = F.cross_entropy(logits, target)
    correct = (logits.argmax(-1) == target).sum()
    return loss, correct, target.numel()


def parse_seq_schedule(text: str, final_len: int) -> list[tuple[int, float]]:
    """``'16:0.3,32:0.7'`` → ``[(16, 0.3), (32, 0.7), (final_len, 1.0)]``.

    Short sequences first: at the start attention is nearly uniform, so in a short
    sequence the average over the context already says something about the blank and
    the model leaves the unigram plateau sooner (measured here: 2×128 model, loss 5.36
    after 1,200 steps at length 16 against 5.95 at length 64, same tokens per step)."""
    phases: list[tuple[int, float]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            length, until = part.split(":")
            phase = (int(length), float(until))
        except ValueError:
            raise ToolError(f"--seq-schedule: {part!r} is not LENGTH:FRACTION") from None
        if not (3 <= phase[0] <= final_len) or not (0 < phase[1] < 1):
            raise ToolError(f"--seq-schedule: {part!r} needs 3 ≤ LENGTH ≤ --seq-len and 0 < FRACTION < 1")
        if phases and (phase[1] <= phases[-1][1]):
            raise ToolError("--seq-schedule: fractions must increase")
        phases.append(phase)
    return phases + [(final_len, 1.0)]


def seq_len_at(schedule: list[tuple[int, float]], progress: float) -> int:
    """The sequence length the schedule prescribes at ``progress`` (0–1)."""
    for length, until in schedule:
        if progress < until:
            return length
    return schedule[-1][0]


def shape_of(config) -> str:
    """The ``LxHxAxI`` shape string of a ``BertConfig``."""
    return (f"{config.num_hidden_layers}x{config.hidden_size}x{config.num_attention_heads}"
            f"x{config.intermediate_size}")


def grow_layers(model, layers: int):
    """A deeper copy of ``model`` with ``layers`` encoder layers, stacked on top of its
    own (progressive stacking: Gong et al. 2019, "Efficient training of BERT by
    progressively stacking"). Added layer i starts as a copy of layer i mod n, except
    that its two residual branches' output projections are zero and its LayerNorms
    plain (weight 1, bias 0): it then only re-normalises what it is given, so the grown
    model starts with about the shallow one's loss (growing the phase-5 4×128 to 6
    layers: 3.86 before and after; plain copies, to 8 layers: 6.9), and its query/key/value
    and feed-forward input weights already hold learned features. Embeddings and the
    masked-LM head are copied."""
    import copy

    import torch
    from transformers import BertForMaskedLM

    n = model.config.num_hidden_layers
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    grown = BertForMaskedLM(config)
    # Embeddings, layers 0..n-1 and the head by name; only the added layers are missing.
    missing = grown.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(key.startswith("bert.encoder.layer.") for key in missing), missing
    with torch.no_grad():
        for index in range(n, layers):
            layer = grown.bert.encoder.layer[index]
            layer.load_state_dict(model.bert.encoder.layer[index % n].state_dict())
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                norm.weight.fill_(1.0)
                norm.bias.zero_()
    return grown


def map_vocabulary(model, folder: Path, have: list[str], tokens: list[str]) -> None:
    """Re-index ``model`` (in place) from its checkpoint's vocabulary ``have`` to
    ``tokens``: each token's embedding row and output bias are taken from the row of
    the same token (:func:`tools.bundle.trim_vocab.trim_model`), so that training can go on
    over data prepared with a different kept vocabulary (e.g. a model recovered from a
    bundle, whose vocabulary was chosen from another preparation of the corpus). Every
    token must be in the checkpoint, in the same relative order (both are taken from
    bert-base-chinese's vocabulary in its order)."""
    from tools.bundle.trim_vocab import trim_model

    if len(have) != model.config.vocab_size:
        raise ToolError(f"--init-from {folder}: vocab.txt has {len(have)} tokens, the model "
                        f"{model.config.vocab_size} embedding rows")
    index = {t: i for i, t in enumerate(have)}
    missing = [t for t in tokens if t not in index]
    if missing:
        raise ToolError(f"--init-from {folder}: {len(missing)} tokens of the prepared data are not in its "
                        f"vocabulary (e.g. {missing[:5]})")
    try:
        trim_model(model, [index[t] for t in tokens])
    except ValueError as exc:
        raise ToolError(f"--init-from {folder}: its vocabulary orders the tokens differently ({exc})") from exc
    log.info("vocabulary mapped by token: %d → %d rows (%d dropped)", len(have), len(tokens),
             len(have) - len(tokens))


def init_from_checkpoint(folder: Path, tokens: list[str], max_position: int, shape: str | None = None):
    """Weights of an earlier run to continue from, re-indexed by token when its
    vocabulary is not ``tokens`` (the prepared data's), with the position table cut
    to ``max_position`` when that is shorter, and grown to ``shape`` by stacking its
    layers when that asks for more layers of the same width."""
    import torch
    from transformers import BertForMaskedLM

    if not (Path(folder) / "config.json").is_file():
        raise ToolError(f"--init-from {folder}: no config.json (not a checkpoint folder)")
    model = BertForMaskedLM.from_pretrained(folder)
    have = wwm.read_vocab(Path(folder) / "vocab.txt")
    if have != list(tokens):
        map_vocabulary(model, folder, have, list(tokens))
    old = model.config.max_position_embeddings
    if max_position > old:
        raise ToolError(f"--init-from {folder}: has {old} positions, --max-position {max_position} asks for more")
    if max_position < old:
        emb = model.bert.embeddings
        table = torch.nn.Embedding(max_position, model.config.hidden_size)
        with torch.no_grad():
            table.weight.copy_(emb.position_embeddings.weight[:max_position])
        emb.position_embeddings = table
        model.config.max_position_embeddings = max_position
    log.info("starting from %s (%d positions → %d)", folder, old, max_position)
    have = shape_of(model.config)
    if shape and parse_shape(shape) != parse_shape(have):
        layers, *width = parse_shape(shape)
        n, *have_width = parse_shape(have)
        if width != have_width or layers < n:
            raise ToolError(f"--init-from {folder}: its shape is {have}; --shape {shape} can only add layers to it "
                            "(same hidden, heads and intermediate sizes)")
        log.info("growing %s → %s: added layer i starts as layer i mod %d with zero output projections",
                 have, shape, n)
        model = grow_layers(model, layers)
    return model


# What each phase of a chain of runs (--init-from) records about itself.
PHASE_FIELDS = ("objective", "shape", "init_from", "seq_len", "seq_schedule", "batch_size", "lr", "seed", "steps",
                "tokens_seen", "train_minutes", "device")


def earlier_phases(folder: Path | None) -> list[dict]:
    """The training phases behind the checkpoint a run continues from (oldest first),
    read from its training.json; [] for a fresh run or a checkpoint with no record
    (e.g. one from the hub), whose training is then not counted in the totals."""
    info = read_training_record(folder) if folder is not None else None
    if info is None:
        return []
    if info.get("phases"):
        # Phases recorded before the shape was a phase field all had the record's shape
        # (a chain could not change shape then).
        return [{**phase, "shape": phase.get("shape") or info.get("shape")} for phase in info["phases"]]
    return [{k: info.get(k) for k in PHASE_FIELDS}]  # a record written before phases were kept


def replayed_phase(earlier: list[dict], seed: int, seq_len: int, batch_size: int,
                   seq_schedule: str | None) -> int | None:
    """Index (1-based) of an earlier phase whose batches a run would replay, or None.

    The seed fixes both the chunk order and every mask (``Batches``), so a phase with
    the same seed, length and batch size (neither with a length schedule) sees the same
    batches with the same blanks, step for step: the model learns those blanks and its
    logged loss falls without it getting better (phase 9 of the default model)."""
    if seq_schedule:
        return None
    for i, phase in enumerate(earlier, 1):
        if (phase.get("seed") == seed and phase.get("seq_len") == seq_len
                and phase.get("batch_size") == batch_size and not phase.get("seq_schedule")):
            return i
    return None


def with_phases(info: dict, earlier: list[dict]) -> dict:
    """``info`` plus ``phases`` (earlier ones + this run) and the totals over them, so a
    model trained in several runs says how long it was trained in all."""
    phases = earlier + [{k: info.get(k) for k in PHASE_FIELDS}]
    return {**info, "phases": phases,
            "total_train_minutes": round(sum(p.get("train_minutes") or 0 for p in phases), 2),
            "total_tokens_seen": sum(p.get("tokens_seen") or 0 for p in phases),
            "total_steps": sum(p.get("steps") or 0 for p in phases)}


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up to 1 over ``warmup`` of the progress, then linear decay to 0."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    return max(0.0, (1.0 - progress) / max(1e-9, 1.0 - warmup))


class Batches:
    """Seeded, resumable batches: chunk order is a permutation per epoch, masks are
    drawn from a generator seeded by (seed, step)."""

    def __init__(self, prepared: wwm.Prepared, tokenizer, seq_len: int, batch_size: int, seed: int,
                 mask_prob: float, mask_unit: str = "word"):
        self.prepared = prepared
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.mask_prob = mask_prob
        if mask_unit not in MASK_UNITS:
            raise ValueError(f"mask_unit must be one of {MASK_UNITS}, got {mask_unit!r}")
        self.mask_unit = mask_unit
        self.starts = wwm.chunk_starts(len(prepared), seq_len - 2)
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer.get_vocab())
        self.never = [tokenizer.convert_tokens_to_ids(t) for t in wwm.SPECIALS]
        self.random_ids = np.setdiff1d(np.arange(self.vocab_size), self.never)
        self._epoch = -1
        self._order = None

    def steps_per_epoch(self) -> int:
        """Steps in one pass over the chunks (the last partial batch wraps over)."""
        return max(1, math.ceil(len(self.starts) / self.batch_size))

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))
            self._epoch = epoch
        return self._order

    def unmasked(self, step: int):
        """The sequences of ``step`` before masking: (ids, word_start flags, attention mask)."""
        per_epoch = self.steps_per_epoch()
        epoch, index = divmod(step, per_epoch)
        order = self._order_of(epoch)
        picks = order[np.arange(index * self.batch_size, (index + 1) * self.batch_size) % len(order)]
        ids, flags, attn = wwm.make_batch(self.prepared, self.starts[picks], self.seq_len,
                                          self.cls_id, self.sep_id, self.pad_id)
        if self.mask_unit == "mixed":
            # Half the rows (seeded per step) with character masking: whole-word masking
            # alone never shows a word with one character visible and one masked
            # (咖[MASK] → 啡), which is exactly what a user's single-character blank is.
            rows = np.random.default_rng([self.seed, 2_000_003, step]).random(len(flags)) < 0.5
            flags[rows] = 1
        elif self.mask_unit == "char":
            flags[:] = 1  # every token a word of its own: token-level masking
        return ids, flags, attn

    def mask(self, ids: np.ndarray, flags: np.ndarray, step: int):
        """Whole-word mask ``ids`` with the generator of ``step``: (inputs, labels)."""
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        return wwm.mask_batch(ids, flags, rng, self.mask_id, self.vocab_size, self.never,
                              self.mask_prob, self.random_ids)

    def get(self, step: int):
        """The masked batch of ``step`` (deterministic): (inputs, attention mask, labels)."""
        ids, flags, attn = self.unmasked(step)
        inputs, labels = self.mask(ids, flags, step)
        return inputs, attn, labels


def _optimizer(named_parameters, lr: float, weight_decay: float):
    """AdamW as BERT is trained: biases and LayerNorm weights not decayed."""
    import torch

    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        # Biases and LayerNorm weights are not decayed (BERT recipe).
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, state: dict, training_info: dict) -> Path:
    """Write ``checkpoint/`` (HF folder) and ``state.pt`` atomically (tmp + rename)."""
    import torch

    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # transformers 5 writes only tokenizer.json; keep the plain vocab.txt too.
    wwm.write_vocab([t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])],
                    tmp / "vocab.txt")
    (tmp / TRAINING_FILE).write_text(json.dumps(training_info, ensure_ascii=False, indent=2), encoding="utf-8")
    old = run_dir / "checkpoint.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    torch.save({"optimizer": optimizer.state_dict(), **state}, run_dir / "state.pt.tmp")
    os.replace(run_dir / "state.pt.tmp", run_dir / "state.pt")
    return final


def measure_shapes(args, prepared: wwm.Prepared, tokenizer) -> list[dict]:
    """Train each candidate shape for ``--measure-seconds`` and report tokens/s."""
    import torch
    from transformers import BertForMaskedLM

    results = []
    batches = Batches(prepared, tokenizer, args.seq_len, args.batch_size, args.seed, args.mask_prob,
                      mask_unit=args.mask_unit)
    for shape in args.measure.split(","):
        torch.manual_seed(args.seed)
        config = make_config(shape.strip(), len(tokenizer.get_vocab()), args.max_position, args.dropout,
                             tokenizer.pad_token_id)
        model = BertForMaskedLM(config).to(args.device)
        model.train()
        opt = _optimizer(model.named_parameters(), args.lr, args.weight_decay)
        params = sum(p.numel() for p in model.parameters())
        step, tokens, started = 0, 0, None
        while True:
            inputs, attn, labels = (torch.from_numpy(x).to(args.device) for x in batches.get(step))
            loss, _c, _n = masked_lm_loss(model, inputs, attn, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == 2:  # the first steps allocate; time from here
                started = time.monotonic()
            elif started is not None:
                tokens += int(attn.sum())
                if time.monotonic() - started >= args.measure_seconds:
                    break
        seconds = time.monotonic() - started
        result = {"shape": shape.strip(), "params": params, "steps": step - 2,
                  "tokens_per_s": round(tokens / seconds, 1), "s_per_step": round(seconds / max(step - 2, 1), 3)}
        log.info("measure %s: %.2f M params, %.0f tokens/s, %.2f s/step", result["shape"], params / 1e6,
                 result["tokens_per_s"], result["s_per_step"])
        results.append(result)
    (args.run_dir / "measure.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


def run(args: argparse.Namespace) -> int:
    """Prepare the data (cached), then train until the time or step budget is used."""
    import torch
    from transformers import BertForMaskedLM

    torch.set_num_threads(max(1, args.threads))
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.seq_len > args.max_position:
        raise ToolError(f"--seq-len {args.seq_len} exceeds --max-position {args.max_position}")
    if not (0 < args.mask_prob < 1):
        raise ToolError("--mask-prob must be between 0 and 1")
    if args.shape:
        parse_shape(args.shape)
    data_dir = run_dir / "data"
    meta = wwm.prepare_corpus(args.data, data_dir, args.base_vocab, args.test_fraction,
                              args.min_freq, args.max_vocab)
    if args.prepare_only:
        return 0
    tokenizer = wwm.make_tokenizer(data_dir / "vocab.txt")
    prepared = wwm.load_prepared(data_dir)
    if args.measure:
        measure_shapes(args, prepared, tokenizer)
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError(f"--device {args.device}: no CUDA device is available")
    torch.manual_seed(args.seed)
    ckpt_dir, state_path = run_dir / "checkpoint", run_dir / "state.pt"
    earlier = earlier_phases(args.init_from)  # read once: the seed check and the phase record
    state = {"step": 0, "elapsed": 0.0, "tokens": 0, "masked": 0}
    if args.resume:
        if not (ckpt_dir / "config.json").is_file() or not state_path.is_file():
            raise ToolError(f"--resume: {ckpt_dir} or {state_path} is missing; start without --resume")
        model = BertForMaskedLM.from_pretrained(ckpt_dir)
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        for key in state:
            state[key] = saved[key]
        log.info("resuming %s at step %d (%.1f min trained, %.2f M tokens)", ckpt_dir, state["step"],
                 state["elapsed"] / 60, state["tokens"] / 1e6)
    else:
        if state_path.exists():
            raise ToolError(f"{run_dir} already holds a run (state.pt); use --resume or another --run-dir")
        if args.init_from:
            replayed = replayed_phase(earlier, args.seed, args.seq_len, args.batch_size, args.seq_schedule)
            if replayed and not args.reuse_seed:
                raise ToolError(f"--seed {args.seed}: {args.init_from} was trained with seed {args.seed}, length "
                                f"{args.seq_len} and batch size {args.batch_size} in its phase {replayed}; this run "
                                "would replay those batches with the same blanks. Pick another --seed "
                                "(or pass --reuse-seed)")
            tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
            model = init_from_checkpoint(args.init_from, tokens, args.max_position, args.shape)
        else:
            config = make_config(args.shape or DEFAULT_SHAPE, len(tokenizer.get_vocab()), args.max_position,
                                 args.dropout, tokenizer.pad_token_id)
            model = BertForMaskedLM(config)
    args.shape = shape_of(model.config)  # what is trained, whichever way it was made
    model.to(device)
    model.train()
    optimizer = _optimizer(model.named_parameters(), args.lr, args.weight_decay)
    if args.resume:
        optimizer.load_state_dict(saved["optimizer"])
    params = sum(p.numel() for p in model.parameters())
    schedule = parse_seq_schedule(args.seq_schedule, args.seq_len)
    batch_tokens = args.batch_size * args.seq_len
    phases: dict[int, Batches] = {}

    def batches_for(seq_len: int) -> Batches:
        if seq_len not in phases:
            phases[seq_len] = Batches(prepared, tokenizer, seq_len, max(1, batch_tokens // seq_len), args.seed,
                                      args.mask_prob, mask_unit=args.mask_unit)
        return phases[seq_len]

    batches = batches_for(args.seq_len)
    budget = args.max_minutes * 60
    log.info("model %s: %.2f M parameters, vocab %d; %d tokens, %d chunks of %d, %d steps/epoch; "
             "budget %.1f min%s, device %s, threads %d", args.shape, params / 1e6, len(tokenizer.get_vocab()),
             len(prepared), len(batches.starts), args.seq_len, batches.steps_per_epoch(), args.max_minutes,
             f", max {args.max_steps} steps" if args.max_steps else "", device, torch.get_num_threads())

    def progress() -> float:
        p = state["elapsed"] / budget if budget > 0 else 1.0
        if args.max_steps:
            p = max(p, state["step"] / args.max_steps)
        return p

    def training_info() -> dict:
        unit = {"word": "whole-word (jieba)", "char": "token",
                "mixed": "whole-word (jieba) on half the sequences, token on the other half"}[args.mask_unit]
        return with_phases({"objective": f"masked LM, {unit} masking, {args.mask_prob:.0%} / 80-10-10",
                "init_from": str(args.init_from) if args.init_from else None,
                "corpus": str(args.data), "corpus_meta": meta, "shape": args.shape, "params": params,
                "seq_len": args.seq_len, "seq_schedule": args.seq_schedule or None,
                "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "steps": state["step"], "tokens_seen": state["tokens"], "masked_seen": state["masked"],
                "train_minutes": round(state["elapsed"] / 60, 2), "device": str(device),
                "threads": torch.get_num_threads(), "last": last_line}, earlier)

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
    metrics = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
    window = {"loss": 0.0, "correct": 0, "masked": 0, "tokens": 0, "steps": 0, "t": time.monotonic()}
    last_line: dict = {}
    last_save = time.monotonic()
    # SIGTERM (kill, systemd, a job runner) stops after the current step and saves,
    # like Ctrl-C does, so --resume loses nothing.
    stop_requested = threading.Event()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    try:
        while progress() < 1.0 and (args.stop_at_step is None or state["step"] < args.stop_at_step):
            if stop_requested.is_set():
                log.warning("SIGTERM: saving a checkpoint at step %d and stopping", state["step"])
                break
            t_step = time.monotonic()
            lr = args.lr * lr_factor(progress(), args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seq_len = seq_len_at(schedule, progress())
            batch_source = batches_for(seq_len)
            inputs, attn, labels = (torch.from_numpy(x).to(device) for x in batch_source.get(state["step"]))
            with autocast:
                loss, correct, n_masked = masked_lm_loss(model, inputs, attn, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss.item()):
                raise ToolError(f"loss became {loss.item()} at step {state['step']}; lower --lr")
            n_tokens = int(attn.sum())
            state["step"] += 1
            state["tokens"] += n_tokens
            state["masked"] += n_masked
            state["elapsed"] += time.monotonic() - t_step
            window["loss"] += loss.item()
            window["correct"] += int(correct)
            window["masked"] += n_masked
            window["tokens"] += n_tokens
            window["steps"] += 1
            if state["step"] % args.log_every == 0 or progress() >= 1.0:
                now = time.monotonic()
                last_line = {"step": state["step"], "loss": round(window["loss"] / window["steps"], 4),
                             "mlm_acc": round(window["correct"] / max(window["masked"], 1), 4),
                             "tokens_per_s": round(window["tokens"] / max(now - window["t"], 1e-9), 1),
                             "lr": lr, "seq_len": seq_len, "epoch": round(state["tokens"] / len(prepared), 3),
                             "tokens_seen": state["tokens"], "minutes": round(state["elapsed"] / 60, 2),
                             "progress": round(progress(), 4)}
                log.info("step %(step)d loss %(loss).4f acc %(mlm_acc).4f %(tokens_per_s).0f tok/s "
                         "lr %(lr).2e len %(seq_len)d epoch %(epoch).3f %(minutes).1f min (%(progress).1f%%)",
                         {**last_line, "progress": 100 * last_line["progress"]})
                metrics.write(json.dumps(last_line) + "\n")
                metrics.flush()
                window = {"loss": 0.0, "correct": 0, "masked": 0, "tokens": 0, "steps": 0, "t": now}
            if time.monotonic() - last_save >= args.checkpoint_minutes * 60:
                save_checkpoint(run_dir, model, tokenizer, optimizer, state, training_info())
                log.info("checkpoint saved at step %d → %s", state["step"], ckpt_dir)
                last_save = time.monotonic()
    except KeyboardInterrupt:
        log.warning("interrupted: saving a checkpoint at step %d", state["step"])
    finally:
        metrics.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    path = save_checkpoint(run_dir, model, tokenizer, optimizer, state, training_info())
    log.info("done: %d steps, %.2f M tokens in %.1f min; final %s → %s", state["step"], state["tokens"] / 1e6,
             state["elapsed"] / 60, json.dumps(last_line), path)
    return 0
