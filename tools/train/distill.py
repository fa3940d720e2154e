"""``python -m tools distill``: TinyBERT-style distillation of a compact student.

Teacher: any masked-LM checkpoint the toolchain loads (a hub id or preset such as
``bert-base-chinese`` on a workstation with internet, or a folder such as the model
``tools pretrain`` trained here). Student: a ``BertForMaskedLM`` of the shape given
by ``--student-shape``, initialised at random or from every k-th teacher layer.

Losses (Jiao et al., 2019, "TinyBERT"), with student layer m ← teacher layer g(m) =
m·N/M (uniform mapping; N teacher, M student layers):

* stage ``intermediate``: embedding-output MSE through a learned projection
  W_e (student width → teacher width), hidden-state MSE of each mapped layer through
  a learned projection W_h, and MSE of the unnormalised attention scores QKᵀ/√d of
  each mapped layer, averaged over heads;
* stage ``prediction``: soft cross-entropy between the teacher's and the student's
  vocabulary distributions at the masked positions, with temperature ``--temperature``.

``--stage both`` (the default) runs the two one after the other, splitting the time
budget by ``--intermediate-share``. Data: the corpora of ``--data`` with whole-word
masking, prepared and cached exactly as ``tools pretrain`` does; ``--augment P``
replaces a share P of the single-character words by a word the teacher proposes for
that position (TinyBERT's data augmentation, applied on the fly).

The result is an ordinary Hugging Face checkpoint folder (``RUN_DIR/checkpoint``) with
the same ``training.json`` record as ``pretrain`` writes, so ``tools build`` makes a
bundle of it and ``tools evaluate`` compares it with the teacher.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools import ToolError
from tools.train import wwm
from tools.train.batches import MASK_UNITS, Batches, lr_factor, make_optimizer
from tools.train.distill_losses import Distiller, layer_map
from tools.train.model_init import SHAPE_HELP, make_config, parse_shape
from tools.train.pretrain import DEFAULT_DATA, save_checkpoint

log = logging.getLogger(__name__)

STAGES = ("intermediate", "prediction", "both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``distill``."""
    parser.add_argument("--teacher", required=True,
                        help="masked-LM checkpoint: hub id, preset name (see 'tools presets') or folder")
    parser.add_argument("--revision", default=None, help="hub revision of the teacher")
    parser.add_argument("--run-dir", type=Path, required=True, help="output folder (checkpoint/, logs)")
    parser.add_argument("--student-shape", default="2x128x4x512", help=SHAPE_HELP)
    parser.add_argument("--init", choices=("random", "teacher-layers"), default="random",
                        help="student initialisation: random, or embeddings + every k-th teacher layer "
                             "(needs the teacher's hidden size)")
    parser.add_argument("--stage", choices=STAGES, default="both",
                        help="intermediate-layer distillation, prediction-layer distillation, or both in turn")
    parser.add_argument("--intermediate-share", type=float, default=0.5,
                        help="with --stage both: share of the time budget for the intermediate stage")
    parser.add_argument("--temperature", type=float, default=1.0, help="soft cross-entropy temperature")
    parser.add_argument("--augment", type=float, default=0.0, metavar="P",
                        help="replace this share of single-character words by teacher proposals (0: off)")
    parser.add_argument("--augment-top-k", type=int, default=5, help="proposals drawn from the teacher's top k")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus folder or file")
    parser.add_argument("--base-vocab", type=Path, default=None,
                        help="vocabulary to trim for the student (default: the teacher's vocab.txt)")
    parser.add_argument("--min-freq", type=int, default=2, help="keep tokens used at least this often")
    parser.add_argument("--test-fraction", type=float, default=0.02, help="held-apart share of documents")
    parser.add_argument("--seq-len", type=int, default=64, help="training sequence length")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW), each stage")
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up share of each stage")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--mask-prob", type=float, default=0.15)
    parser.add_argument("--mask-unit", choices=MASK_UNITS, default="word",
                        help="whole-word masking, character masking, or each on half the sequences")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="time budget for all stages")
    parser.add_argument("--max-steps", type=int, default=None, help="step budget for all stages (tests)")
    parser.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda …)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for a GPU)")


# --------------------------------------------------------------------- mapping
def vocab_map(student_tokens: list[str], teacher_vocab: dict[str, int]) -> np.ndarray:
    """Teacher id of every student token (the student vocabulary is a trimmed copy)."""
    missing = [t for t in student_tokens if t not in teacher_vocab]
    if missing:
        raise ToolError(f"{len(missing)} student tokens are not in the teacher's vocabulary "
                        f"(e.g. {missing[:5]}); use --base-vocab with the teacher's vocab.txt")
    return np.array([teacher_vocab[t] for t in student_tokens], dtype=np.int64)


def init_from_teacher(student, teacher, layers: list[int], to_teacher) -> None:
    """Copy the teacher's embeddings (rows of the student's tokens), the mapped layers
    and the MLM head transform into the student (same hidden size required)."""
    import torch

    s_bert, t_bert = student.base_model, teacher.base_model
    if student.config.hidden_size != teacher.config.hidden_size:
        raise ToolError(f"--init teacher-layers needs the teacher's hidden size {teacher.config.hidden_size} "
                        f"(student: {student.config.hidden_size})")
    with torch.no_grad():
        s_emb, t_emb = s_bert.embeddings, t_bert.embeddings
        s_emb.word_embeddings.weight.copy_(t_emb.word_embeddings.weight[to_teacher])
        n_pos = min(s_emb.position_embeddings.weight.shape[0], t_emb.position_embeddings.weight.shape[0])
        s_emb.position_embeddings.weight[:n_pos].copy_(t_emb.position_embeddings.weight[:n_pos])
        s_emb.token_type_embeddings.weight.copy_(t_emb.token_type_embeddings.weight[:2])
        s_emb.LayerNorm.load_state_dict(t_emb.LayerNorm.state_dict())
        for m, g in enumerate(layers):
            s_layer, t_layer = s_bert.encoder.layer[m], t_bert.encoder.layer[g - 1]
            if s_layer.state_dict().keys() != t_layer.state_dict().keys() or any(
                    a.shape != b.shape for a, b in zip(s_layer.state_dict().values(), t_layer.state_dict().values())):
                raise ToolError("--init teacher-layers needs the teacher's heads and intermediate size")
            s_layer.load_state_dict(t_layer.state_dict())
        s_head, t_head = student.cls.predictions, teacher.cls.predictions
        s_head.transform.load_state_dict(t_head.transform.state_dict())
        s_head.bias.copy_(t_head.bias[to_teacher])


# ------------------------------------------------------------------ augmentation
def augment_words(teacher, to_teacher, ids: np.ndarray, flags: np.ndarray, attn: np.ndarray, share: float,
                  top_k: int, rng: np.random.Generator, mask_id: int, never: list[int]) -> np.ndarray:
    """Replace ``share`` of the single-character words by a teacher proposal.

    TinyBERT's augmentation for single-piece words: mask the word, ask the teacher
    for its top-k fillers there, take one at random. All chosen positions of a batch
    are masked and predicted together in one teacher pass (one word in ~1/share).
    ``to_teacher`` maps student ids to teacher ids (tensor or array)."""
    import torch

    if share <= 0:
        return ids
    real = attn.astype(bool) & ~np.isin(ids, never)
    next_starts = np.ones_like(flags, dtype=bool)
    next_starts[:, :-1] = flags[:, 1:].astype(bool) | ~real[:, 1:]
    single = real & flags.astype(bool) & next_starts
    chosen = single & (rng.random(ids.shape) < share)
    if not chosen.any():
        return ids
    masked = ids.copy()
    masked[chosen] = mask_id
    device = next(teacher.parameters()).device
    to_teacher = torch.as_tensor(to_teacher, device=device)  # no copy when already there
    with torch.no_grad():
        inputs = to_teacher[torch.as_tensor(masked, device=device)]
        hidden = teacher.base_model(input_ids=inputs, attention_mask=torch.as_tensor(attn, device=device))
        rows = torch.as_tensor(chosen, device=device)
        logits = teacher.cls(hidden.last_hidden_state[rows]).float()[:, to_teacher]
        logits[:, torch.as_tensor(never, device=device)] = -float("inf")
        top = logits.topk(top_k, dim=-1).indices.cpu().numpy()
    pick = top[np.arange(len(top)), rng.integers(0, top_k, size=len(top))]
    out = ids.copy()
    out[chosen] = pick
    return out


# ------------------------------------------------------------------------- run
def _load_teacher(args):
    from tools.bundle.checkpoint import load_checkpoint, resolve_source

    source = resolve_source(args.teacher)
    teacher = load_checkpoint(source, revision=args.revision)
    if teacher.random_init:
        log.warning("the teacher %s has RANDOM weights: distilling it teaches nothing", source)
    if not hasattr(teacher.model, "cls") or not hasattr(teacher.model.base_model, "encoder"):
        raise ToolError(f"{source}: distillation needs a BERT-type masked LM (…ForMaskedLM with .cls)")
    return source, teacher


def _teacher_vocab_file(source: str, tokenizer, run_dir: Path) -> Path:
    """The teacher's vocabulary as a vocab.txt (written from the tokenizer if needed)."""
    folder = Path(source)
    if (folder / "vocab.txt").is_file():
        return folder / "vocab.txt"
    vocab = tokenizer.get_vocab()
    path = run_dir / "teacher_vocab.txt"
    wwm.write_vocab([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])], path)
    return path


def _check_options(args: argparse.Namespace) -> None:
    """Refuse option values that cannot make a run, before anything is loaded."""
    if args.stage == "both" and not (0 < args.intermediate_share < 1):
        raise ToolError("--intermediate-share must be between 0 and 1")
    if args.temperature <= 0:
        raise ToolError("--temperature must be positive")
    if not (0 <= args.augment < 1):
        raise ToolError("--augment must be in [0, 1)")
    parse_shape(args.student_shape)


@dataclass
class _Setup:
    """Everything a distillation run trains with: models, data, and the stage plan."""

    source: str
    teacher: Any
    student: Any
    tokenizer: Any
    distiller: Distiller
    batches: Batches
    layers: list[int]
    meta: dict
    params: int
    vocab_size: int
    device: Any
    stages: list[str]
    shares: list[float]


def _set_up(args: argparse.Namespace, run_dir: Path) -> _Setup:
    """Load the teacher, prepare the corpus in the student's vocabulary, make the student."""
    import torch
    from transformers import BertForMaskedLM

    source, teacher_ckpt = _load_teacher(args)
    teacher = teacher_ckpt.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    base_vocab = args.base_vocab or _teacher_vocab_file(source, teacher_ckpt.tokenizer, run_dir)
    data_dir = run_dir / "data"
    meta = wwm.prepare_corpus(args.data, data_dir, base_vocab, args.test_fraction, args.min_freq)
    tokenizer = wwm.make_tokenizer(data_dir / "vocab.txt")
    student_tokens = wwm.read_vocab(data_dir / "vocab.txt")
    to_teacher = vocab_map(student_tokens, teacher_ckpt.tokenizer.get_vocab())
    prepared = wwm.load_prepared(data_dir)

    max_position = teacher.config.max_position_embeddings
    if args.seq_len > max_position:
        raise ToolError(f"--seq-len {args.seq_len} exceeds the teacher's {max_position} positions")
    config = make_config(args.student_shape, len(student_tokens), max_position, 0.0, tokenizer.pad_token_id)
    student = BertForMaskedLM(config)
    layers = layer_map(config.num_hidden_layers, teacher.config.num_hidden_layers)
    if args.init == "teacher-layers":
        init_from_teacher(student, teacher, layers, torch.as_tensor(to_teacher))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError(f"--device {args.device}: no CUDA device is available")
    distiller = Distiller(teacher, student, to_teacher, args.temperature).to(device)
    batches = Batches(prepared, tokenizer, args.seq_len, args.batch_size, args.seed, args.mask_prob,
                      mask_unit=args.mask_unit)
    stages = ["intermediate", "prediction"] if args.stage == "both" else [args.stage]
    shares = ([args.intermediate_share, 1 - args.intermediate_share] if len(stages) == 2 else [1.0])
    params = sum(p.numel() for p in student.parameters())
    return _Setup(source, teacher, student, tokenizer, distiller, batches, layers, meta, params,
                  len(student_tokens), device, stages, shares)


class _StageLog:
    """Averages of the losses over the steps since the last progress line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n, self.tokens, self.t = 0, 0, time.monotonic()

    def add(self, tokens: int, losses: dict[str, float]) -> None:
        """Count one step."""
        self.n += 1
        self.tokens += tokens
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def line(self, stage: str, state: dict, progress: float, keys: list[str]) -> dict:
        """The progress record of the window, which then starts again."""
        now = time.monotonic()
        line = {"stage": stage, "step": state["step"], **{k: round(self.sums[k] / self.n, 4) for k in keys},
                "tokens_per_s": round(self.tokens / max(now - self.t, 1e-9), 1),
                "minutes": round(state["elapsed"] / 60, 2), "stage_progress": round(progress, 4)}
        self.sums, self.n, self.tokens, self.t = {}, 0, 0, now
        return line


def _train_stage(args: argparse.Namespace, setup: _Setup, stage: str, share: float, optimizer,
                 state: dict, history: list[dict], metrics, stop: threading.Event, aug_rng) -> None:
    """Train one stage for its share of the time (and step) budget, or until ``stop``."""
    import torch

    setup.student.train()
    trainable = setup.distiller.trainable(stage)
    autocast = torch.autocast(device_type=setup.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    budget_s = args.max_minutes * 60 * share
    budget_steps = max(1, round(args.max_steps * share)) if args.max_steps else None
    stage_start, stage_steps = state["elapsed"], 0
    window = _StageLog()

    def progress() -> float:
        p = (state["elapsed"] - stage_start) / budget_s if budget_s > 0 else 1.0
        return max(p, stage_steps / budget_steps) if budget_steps else p

    log.info("stage %s: %.1f min%s", stage, budget_s / 60, f", {budget_steps} steps" if budget_steps else "")
    while progress() < 1.0 and not stop.is_set():
        t0 = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(progress(), args.warmup)
        ids, flags, attn = setup.batches.unmasked(state["step"])
        if args.augment > 0:
            ids = augment_words(setup.teacher, setup.distiller.to_teacher, ids, flags, attn, args.augment,
                                args.augment_top_k, aug_rng, setup.tokenizer.mask_token_id, setup.batches.never)
        inputs, labels = setup.batches.mask(ids, flags, state["step"])
        inputs, attn_t, labels = (torch.from_numpy(x).to(setup.device) for x in (inputs, attn, labels))
        with autocast:
            loss, parts = setup.distiller.loss(stage, inputs, attn_t, labels)
        if not math.isfinite(loss.item()):
            raise ToolError(f"loss became {loss.item()} at step {state['step']} ({stage}); lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        stage_steps += 1
        state["tokens"] += int(attn.sum())
        state["masked"] += int((labels != -100).sum())
        state["elapsed"] += time.monotonic() - t0
        window.add(int(attn.sum()), {"loss": loss.item(), **parts})
        if stage_steps % args.log_every == 0 or progress() >= 1.0:
            line = window.line(stage, state, progress(), ["loss", *parts])
            log.info("%s step %d %s %.0f tok/s %.1f min (%.0f%% of stage)", stage, line["step"],
                     " ".join(f"{k} {line[k]:.4f}" for k in ["loss", *parts]), line["tokens_per_s"],
                     line["minutes"], 100 * min(1.0, line["stage_progress"]))
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
            history.append(line)


def _run_info(args: argparse.Namespace, setup: _Setup, state: dict, history: list[dict]) -> dict:
    """The ``training.json`` record of the run."""
    import torch

    teacher = setup.teacher.config
    return {"objective": "TinyBERT distillation: " + " then ".join(
                "embedding/hidden/attention MSE" if s == "intermediate" else
                f"soft cross-entropy at masked positions (T={args.temperature})" for s in setup.stages),
            "teacher": setup.source, "teacher_shape": f"{teacher.num_hidden_layers}x{teacher.hidden_size}x"
                                                      f"{teacher.num_attention_heads}x{teacher.intermediate_size}",
            "layer_map": setup.layers, "init": args.init, "augment": args.augment, "mask_unit": args.mask_unit,
            "corpus": str(args.data), "corpus_meta": setup.meta, "shape": args.student_shape,
            "params": setup.params, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "steps": state["step"], "tokens_seen": state["tokens"],
            "masked_seen": state["masked"], "train_minutes": round(state["elapsed"] / 60, 2),
            "device": str(setup.device), "threads": torch.get_num_threads(),
            "last": history[-1] if history else {}}


def run(args: argparse.Namespace) -> int:
    """Distil the teacher into the student within the time / step budget."""
    import torch

    _check_options(args)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "state.pt").exists():
        raise ToolError(f"{run_dir} already holds a run (state.pt); use another --run-dir")
    setup = _set_up(args, run_dir)
    log.info("teacher %s (%d layers, hidden %d); student %s: %.2f M parameters, vocab %d; layer map %s; "
             "init %s; stages %s; budget %.1f min%s", setup.source, setup.teacher.config.num_hidden_layers,
             setup.teacher.config.hidden_size, args.student_shape, setup.params / 1e6, setup.vocab_size,
             setup.layers, args.init, "+".join(setup.stages), args.max_minutes,
             f", {args.max_steps} steps" if args.max_steps else "")

    aug_rng = np.random.default_rng([args.seed, 7])
    state = {"step": 0, "elapsed": 0.0, "tokens": 0, "masked": 0}
    history: list[dict] = []
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    metrics = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
    optimizer = None
    try:
        for stage, share in zip(setup.stages, setup.shares):
            # made here, not in the stage, so an interrupted stage saves its own optimizer state
            optimizer = make_optimizer(setup.distiller.trainable(stage), args.lr, args.weight_decay)
            _train_stage(args, setup, stage, share, optimizer, state, history, metrics, stop, aug_rng)
            if stop.is_set():
                log.warning("SIGTERM: saving the student at step %d and stopping", state["step"])
                break
    except KeyboardInterrupt:
        log.warning("interrupted: saving the student at step %d", state["step"])
    finally:
        metrics.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    setup.student.eval()
    info = _run_info(args, setup, state, history)
    path = save_checkpoint(run_dir, setup.student.to("cpu"), setup.tokenizer, optimizer, state, info)
    log.info("done: %d steps in %.1f min → %s", state["step"], state["elapsed"] / 60, path)
    return 0
