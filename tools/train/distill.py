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
from pathlib import Path

import numpy as np

from tools import ToolError
from tools.train import wwm
from tools.train.batches import MASK_UNITS, Batches, lr_factor, make_optimizer
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
def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Uniform mapping g(m) = m·N/M for m = 1..M (1-based teacher layer numbers)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ToolError("layer counts must be positive")
    if student_layers > teacher_layers:
        raise ToolError(f"the student has more layers ({student_layers}) than the teacher ({teacher_layers})")
    return [m * teacher_layers // student_layers for m in range(1, student_layers + 1)]


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


# ----------------------------------------------------------------------- losses
def attention_scores(bert, hidden_states, layer_numbers: list[int]):
    """Unnormalised attention scores QKᵀ/√d of the given (1-based) layers, recomputed
    from each layer's input: [batch, heads, seq, seq] per layer."""
    scores = []
    for number in layer_numbers:
        attn = bert.encoder.layer[number - 1].attention.self
        x = hidden_states[number - 1]
        b, s, _ = x.shape
        q = attn.query(x).view(b, s, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
        k = attn.key(x).view(b, s, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
        scores.append(q @ k.transpose(-1, -2) / math.sqrt(attn.attention_head_size))
    return scores


def attention_loss(student_scores, teacher_scores, attention_mask):
    """MSE of the scores over real (query, key) pairs, averaged over heads and layers.
    With fewer student heads, teacher heads are averaged in groups to match."""
    import torch.nn.functional as F

    pair = (attention_mask[:, None, :, None] * attention_mask[:, None, None, :]).float()
    total = 0.0
    for s, t in zip(student_scores, teacher_scores):
        if t.shape[1] != s.shape[1]:
            if t.shape[1] % s.shape[1]:
                raise ToolError(f"teacher heads ({t.shape[1]}) are not a multiple of student heads ({s.shape[1]})")
            t = t.view(t.shape[0], s.shape[1], t.shape[1] // s.shape[1], *t.shape[2:]).mean(2)
        err = F.mse_loss(s, t, reduction="none") * pair
        total = total + err.sum() / (pair.sum() * s.shape[1])
    return total / max(len(student_scores), 1)


def hidden_loss(student_hidden, teacher_hidden, projection, attention_mask):
    """MSE between the projected student states and the teacher's, over real tokens."""
    keep = attention_mask.bool()
    return ((projection(student_hidden)[keep] - teacher_hidden[keep]) ** 2).mean()


def soft_cross_entropy(student_logits, teacher_logits, temperature: float):
    """−Σ softmax(z_T/t) · log_softmax(z_S/t), averaged over positions."""
    import torch.nn.functional as F

    target = F.softmax(teacher_logits / temperature, dim=-1)
    return -(target * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


class Distiller:
    """Teacher + student + projections; computes the loss of one stage on one batch."""

    def __init__(self, teacher, student, to_teacher: np.ndarray, temperature: float):
        import torch

        self.teacher, self.student = teacher, student
        self.to_teacher = torch.as_tensor(to_teacher)
        self.temperature = temperature
        self.layers = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
        self.proj_embedding = torch.nn.Linear(d_s, d_t, bias=False)
        self.proj_hidden = torch.nn.Linear(d_s, d_t, bias=False)

    def to(self, device):
        """Move every part to ``device``."""
        for part in (self.teacher, self.student, self.proj_embedding, self.proj_hidden):
            part.to(device)
        self.to_teacher = self.to_teacher.to(device)
        return self

    def trainable(self, stage: str) -> list:
        """(name, parameter) pairs trained in ``stage`` (projections only in the intermediate one)."""
        params = list(self.student.named_parameters())
        if stage == "intermediate":
            params += [(f"proj_embedding.{n}", p) for n, p in self.proj_embedding.named_parameters()]
            params += [(f"proj_hidden.{n}", p) for n, p in self.proj_hidden.named_parameters()]
        return params

    def loss(self, stage: str, inputs, attention_mask, labels) -> tuple:
        """Loss of ``stage`` on one batch, with a dict of its parts (floats)."""
        import torch

        teacher_inputs = self.to_teacher[inputs]
        hidden = stage == "intermediate"  # the prediction stage needs the last layer only
        with torch.no_grad():
            t_out = self.teacher.base_model(input_ids=teacher_inputs, attention_mask=attention_mask,
                                            output_hidden_states=hidden)
        s_out = self.student.base_model(input_ids=inputs, attention_mask=attention_mask, output_hidden_states=hidden)
        if stage == "intermediate":
            t_h, s_h = t_out.hidden_states, s_out.hidden_states
            emb = hidden_loss(s_h[0], t_h[0], self.proj_embedding, attention_mask)
            hid = sum(hidden_loss(s_h[m + 1], t_h[g], self.proj_hidden, attention_mask)
                      for m, g in enumerate(self.layers)) / len(self.layers)
            with torch.no_grad():
                t_scores = attention_scores(self.teacher.base_model, t_h, self.layers)
            s_scores = attention_scores(self.student.base_model, s_h, list(range(1, len(self.layers) + 1)))
            att = attention_loss(s_scores, t_scores, attention_mask)
            total = emb + hid + att
            return total, {"emb": emb.item(), "hidden": hid.item(), "attn": att.item()}
        selected = labels != -100
        with torch.no_grad():
            t_logits = self.teacher.cls(t_out.last_hidden_state[selected]).float()[:, self.to_teacher]
        s_logits = self.student.cls(s_out.last_hidden_state[selected]).float()
        soft = soft_cross_entropy(s_logits, t_logits, self.temperature)
        target = labels[selected]
        acc = (s_logits.argmax(-1) == target).float().mean().item() if target.numel() else 0.0
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item() if target.numel() else 0.0
        return soft, {"soft_ce": soft.item(), "mlm_acc": acc, "teacher_agree": agree}


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


def run(args: argparse.Namespace) -> int:
    """Distil the teacher into the student within the time / step budget."""
    import torch
    from transformers import BertForMaskedLM

    if args.stage == "both" and not (0 < args.intermediate_share < 1):
        raise ToolError("--intermediate-share must be between 0 and 1")
    if args.temperature <= 0:
        raise ToolError("--temperature must be positive")
    if not (0 <= args.augment < 1):
        raise ToolError("--augment must be in [0, 1)")
    parse_shape(args.student_shape)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "state.pt").exists():
        raise ToolError(f"{run_dir} already holds a run (state.pt); use another --run-dir")

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
    never = batches.never
    stages = ["intermediate", "prediction"] if args.stage == "both" else [args.stage]
    shares = ([args.intermediate_share, 1 - args.intermediate_share] if len(stages) == 2 else [1.0])
    params = sum(p.numel() for p in student.parameters())
    log.info("teacher %s (%d layers, hidden %d); student %s: %.2f M parameters, vocab %d; layer map %s; "
             "init %s; stages %s; budget %.1f min%s", source, teacher.config.num_hidden_layers,
             teacher.config.hidden_size, args.student_shape, params / 1e6, len(student_tokens), layers, args.init,
             "+".join(stages), args.max_minutes, f", {args.max_steps} steps" if args.max_steps else "")

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
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
        for stage, share in zip(stages, shares):
            student.train()
            trainable = distiller.trainable(stage)
            optimizer = make_optimizer(trainable, args.lr, args.weight_decay)
            budget_s = args.max_minutes * 60 * share
            budget_steps = max(1, round(args.max_steps * share)) if args.max_steps else None
            stage_start, stage_steps = state["elapsed"], 0
            window: dict = {"n": 0, "tokens": 0, "t": time.monotonic()}

            def progress() -> float:
                p = (state["elapsed"] - stage_start) / budget_s if budget_s > 0 else 1.0
                return max(p, stage_steps / budget_steps) if budget_steps else p

            log.info("stage %s: %.1f min%s", stage, budget_s / 60, f", {budget_steps} steps" if budget_steps else "")
            while progress() < 1.0 and not stop.is_set():
                t0 = time.monotonic()
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * lr_factor(progress(), args.warmup)
                ids, flags, attn = batches.unmasked(state["step"])
                if args.augment > 0:
                    ids = augment_words(teacher, distiller.to_teacher, ids, flags, attn, args.augment,
                                        args.augment_top_k,
                                        aug_rng, tokenizer.mask_token_id, never)
                inputs, labels = batches.mask(ids, flags, state["step"])
                inputs, attn_t, labels = (torch.from_numpy(x).to(device) for x in (inputs, attn, labels))
                with autocast:
                    loss, parts = distiller.loss(stage, inputs, attn_t, labels)
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
                window["n"] += 1
                window["tokens"] += int(attn.sum())
                for key, value in {"loss": loss.item(), **parts}.items():
                    window[key] = window.get(key, 0.0) + value
                if stage_steps % args.log_every == 0 or progress() >= 1.0:
                    now = time.monotonic()
                    line = {"stage": stage, "step": state["step"],
                            **{k: round(window[k] / window["n"], 4) for k in ["loss", *parts]},
                            "tokens_per_s": round(window["tokens"] / max(now - window["t"], 1e-9), 1),
                            "minutes": round(state["elapsed"] / 60, 2), "stage_progress": round(progress(), 4)}
                    log.info("%s step %d %s %.0f tok/s %.1f min (%.0f%% of stage)", stage, line["step"],
                             " ".join(f"{k} {line[k]:.4f}" for k in ["loss", *parts]), line["tokens_per_s"],
                             line["minutes"], 100 * min(1.0, line["stage_progress"]))
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                    history.append(line)
                    window = {"n": 0, "tokens": 0, "t": now}
            if stop.is_set():
                log.warning("SIGTERM: saving the student at step %d and stopping", state["step"])
                break
    except KeyboardInterrupt:
        log.warning("interrupted: saving the student at step %d", state["step"])
    finally:
        metrics.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    student.eval()
    info = {"objective": "TinyBERT distillation: " + " then ".join(
                "embedding/hidden/attention MSE" if s == "intermediate" else
                f"soft cross-entropy at masked positions (T={args.temperature})" for s in stages),
            "teacher": source, "teacher_shape": f"{teacher.config.num_hidden_layers}x{teacher.config.hidden_size}x"
                                                f"{teacher.config.num_attention_heads}x{teacher.config.intermediate_size}",
            "layer_map": layers, "init": args.init, "augment": args.augment, "mask_unit": args.mask_unit,
            "corpus": str(args.data), "corpus_meta": meta, "shape": args.student_shape, "params": params,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "steps": state["step"], "tokens_seen": state["tokens"], "masked_seen": state["masked"],
            "train_minutes": round(state["elapsed"] / 60, 2), "device": str(device),
            "threads": torch.get_num_threads(), "last": history[-1] if history else {}}
    path = save_checkpoint(run_dir, student.to("cpu"), tokenizer, optimizer, state, info)
    log.info("done: %d steps in %.1f min → %s", state["step"], state["elapsed"] / 60, path)
    return 0
