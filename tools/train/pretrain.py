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


from tools import ToolError
from tools.bundle.checkpoint import TRAINING_FILE
from tools.train import wwm
from tools.train.batches import (MASK_UNITS, Batches, lr_factor, make_optimizer, masked_lm_loss, parse_seq_schedule,
                                 seq_len_at)
from tools.train.model_init import (DEFAULT_SHAPE, SHAPE_HELP, earlier_phases, init_from_checkpoint, make_config,
                                    parse_shape, replayed_phase, shape_of, with_phases)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data"
DEFAULT_BASE_VOCAB = SHARED / "models" / "bert-base-chinese" / "vocab.txt"


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
        opt = make_optimizer(model.named_parameters(), args.lr, args.weight_decay)
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

    torch.set_num_threads(max(1, args.threads))
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_options(args)
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
    earlier = earlier_phases(args.init_from)  # read once: the seed check and the phase record
    model, state, saved = _starting_model(args, tokenizer, earlier)
    args.shape = shape_of(model.config)  # what is trained, whichever way it was made
    trainer = Trainer(args, model, tokenizer, prepared, device, state, meta, earlier)
    if saved is not None:
        trainer.optimizer.load_state_dict(saved["optimizer"])
    return trainer.train()


def _check_options(args: argparse.Namespace) -> None:
    if args.seq_len > args.max_position:
        raise ToolError(f"--seq-len {args.seq_len} exceeds --max-position {args.max_position}")
    if not (0 < args.mask_prob < 1):
        raise ToolError("--mask-prob must be between 0 and 1")
    if args.shape:
        parse_shape(args.shape)


def _starting_model(args: argparse.Namespace, tokenizer, earlier: list[dict]):
    """(model, state, saved state or None): resumed from the run's checkpoint, grown from
    ``--init-from``, or fresh of ``--shape``."""
    import torch
    from transformers import BertForMaskedLM

    ckpt_dir, state_path = args.run_dir / "checkpoint", args.run_dir / "state.pt"
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
        return model, state, saved
    if state_path.exists():
        raise ToolError(f"{args.run_dir} already holds a run (state.pt); use --resume or another --run-dir")
    if args.init_from:
        replayed = replayed_phase(earlier, args.seed, args.seq_len, args.batch_size, args.seq_schedule)
        if replayed and not args.reuse_seed:
            raise ToolError(f"--seed {args.seed}: {args.init_from} was trained with seed {args.seed}, length "
                            f"{args.seq_len} and batch size {args.batch_size} in its phase {replayed}; this run "
                            "would replay those batches with the same blanks. Pick another --seed "
                            "(or pass --reuse-seed)")
        tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
        return init_from_checkpoint(args.init_from, tokens, args.max_position, args.shape), state, None
    config = make_config(args.shape or DEFAULT_SHAPE, len(tokenizer.get_vocab()), args.max_position,
                         args.dropout, tokenizer.pad_token_id)
    return BertForMaskedLM(config), state, None


class Trainer:
    """One pretraining run: steps until the time (or step) budget is used, with the
    learning rate and sequence length on their schedules, a progress line every
    ``--log-every`` steps (also to ``metrics.jsonl``), a checkpoint every
    ``--checkpoint-minutes``, and a checkpoint at the end, on Ctrl-C or on SIGTERM."""

    def __init__(self, args: argparse.Namespace, model, tokenizer, prepared: wwm.Prepared, device, state: dict,
                 meta: dict, earlier: list[dict]):
        import torch

        self.args, self.model, self.tokenizer, self.prepared = args, model, tokenizer, prepared
        self.device, self.state, self.meta, self.earlier = device, state, meta, earlier
        model.to(device)
        model.train()
        self.optimizer = make_optimizer(model.named_parameters(), args.lr, args.weight_decay)
        self.params = sum(p.numel() for p in model.parameters())
        self.schedule = parse_seq_schedule(args.seq_schedule, args.seq_len)
        self.batch_tokens = args.batch_size * args.seq_len
        self.budget = args.max_minutes * 60
        self.autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
        self.last_line: dict = {}
        self._batches: dict[int, Batches] = {}

    def batches_for(self, seq_len: int) -> Batches:
        """The batches of one sequence length (the schedule moves between a few)."""
        if seq_len not in self._batches:
            a = self.args
            self._batches[seq_len] = Batches(self.prepared, self.tokenizer, seq_len, max(1, self.batch_tokens // seq_len),
                                             a.seed, a.mask_prob, mask_unit=a.mask_unit)
        return self._batches[seq_len]

    def progress(self) -> float:
        """How far along the budget is, 0..1 (time, or steps where that is further)."""
        p = self.state["elapsed"] / self.budget if self.budget > 0 else 1.0
        if self.args.max_steps:
            p = max(p, self.state["step"] / self.args.max_steps)
        return p

    def training_info(self) -> dict:
        """The ``training.json`` record of this run (and of the phases before it)."""
        import torch

        a, state = self.args, self.state
        unit = {"word": "whole-word (jieba)", "char": "token",
                "mixed": "whole-word (jieba) on half the sequences, token on the other half"}[a.mask_unit]
        return with_phases({"objective": f"masked LM, {unit} masking, {a.mask_prob:.0%} / 80-10-10",
                            "init_from": str(a.init_from) if a.init_from else None,
                            "corpus": str(a.data), "corpus_meta": self.meta, "shape": a.shape, "params": self.params,
                            "seq_len": a.seq_len, "seq_schedule": a.seq_schedule or None,
                            "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
                            "steps": state["step"], "tokens_seen": state["tokens"], "masked_seen": state["masked"],
                            "train_minutes": round(state["elapsed"] / 60, 2), "device": str(self.device),
                            "threads": torch.get_num_threads(), "last": self.last_line}, self.earlier)

    def step(self) -> tuple[float, int, int, int, float, int]:
        """One optimizer step: (loss, correct, masked, tokens, lr, sequence length)."""
        import torch

        a, state = self.args, self.state
        started = time.monotonic()
        lr = a.lr * lr_factor(self.progress(), a.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seq_len = seq_len_at(self.schedule, self.progress())
        inputs, attn, labels = (torch.from_numpy(x).to(self.device) for x in self.batches_for(seq_len).get(state["step"]))
        with self.autocast:
            loss, correct, n_masked = masked_lm_loss(self.model, inputs, attn, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise ToolError(f"loss became {loss.item()} at step {state['step']}; lower --lr")
        n_tokens = int(attn.sum())
        state["step"] += 1
        state["tokens"] += n_tokens
        state["masked"] += n_masked
        state["elapsed"] += time.monotonic() - started
        return loss.item(), int(correct), n_masked, n_tokens, lr, seq_len

    def _progress_line(self, window: dict, lr: float, seq_len: int, now: float) -> dict:
        state = self.state
        line = {"step": state["step"], "loss": round(window["loss"] / window["steps"], 4),
                "mlm_acc": round(window["correct"] / max(window["masked"], 1), 4),
                "tokens_per_s": round(window["tokens"] / max(now - window["t"], 1e-9), 1),
                "lr": lr, "seq_len": seq_len, "epoch": round(state["tokens"] / len(self.prepared), 3),
                "tokens_seen": state["tokens"], "minutes": round(state["elapsed"] / 60, 2),
                "progress": round(self.progress(), 4)}
        log.info("step %(step)d loss %(loss).4f acc %(mlm_acc).4f %(tokens_per_s).0f tok/s "
                 "lr %(lr).2e len %(seq_len)d epoch %(epoch).3f %(minutes).1f min (%(progress).1f%%)",
                 {**line, "progress": 100 * line["progress"]})
        return line

    def train(self) -> int:
        """Run to the end of the budget (or ``--stop-at-step``); save; return 0."""
        import torch

        a, state, run_dir = self.args, self.state, self.args.run_dir
        first = self.batches_for(a.seq_len)
        log.info("model %s: %.2f M parameters, vocab %d; %d tokens, %d chunks of %d, %d steps/epoch; "
                 "budget %.1f min%s, device %s, threads %d", a.shape, self.params / 1e6, len(self.tokenizer.get_vocab()),
                 len(self.prepared), len(first.starts), a.seq_len, first.steps_per_epoch(), a.max_minutes,
                 f", max {a.max_steps} steps" if a.max_steps else "", self.device, torch.get_num_threads())
        metrics = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        window = {"loss": 0.0, "correct": 0, "masked": 0, "tokens": 0, "steps": 0, "t": time.monotonic()}
        last_save = time.monotonic()
        # SIGTERM (kill, systemd, a job runner) stops after the current step and saves,
        # like Ctrl-C does, so --resume loses nothing.
        stop_requested = threading.Event()
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
        try:
            while self.progress() < 1.0 and (a.stop_at_step is None or state["step"] < a.stop_at_step):
                if stop_requested.is_set():
                    log.warning("SIGTERM: saving a checkpoint at step %d and stopping", state["step"])
                    break
                loss, correct, n_masked, n_tokens, lr, seq_len = self.step()
                for key, value in (("loss", loss), ("correct", correct), ("masked", n_masked),
                                   ("tokens", n_tokens), ("steps", 1)):
                    window[key] += value
                if state["step"] % a.log_every == 0 or self.progress() >= 1.0:
                    now = time.monotonic()
                    self.last_line = self._progress_line(window, lr, seq_len, now)
                    metrics.write(json.dumps(self.last_line) + "\n")
                    metrics.flush()
                    window = {"loss": 0.0, "correct": 0, "masked": 0, "tokens": 0, "steps": 0, "t": now}
                if time.monotonic() - last_save >= a.checkpoint_minutes * 60:
                    save_checkpoint(run_dir, self.model, self.tokenizer, self.optimizer, state, self.training_info())
                    log.info("checkpoint saved at step %d → %s", state["step"], run_dir / "checkpoint")
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            log.warning("interrupted: saving a checkpoint at step %d", state["step"])
        finally:
            metrics.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        path = save_checkpoint(run_dir, self.model, self.tokenizer, self.optimizer, state, self.training_info())
        log.info("done: %d steps, %.2f M tokens in %.1f min; final %s → %s", state["step"], state["tokens"] / 1e6,
                 state["elapsed"] / 60, json.dumps(self.last_line), path)
        return 0
