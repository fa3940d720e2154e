"""The models ``python -m tools bench`` compares, prepared once and cached in ``--out/work``:
the bert-base-chinese architecture with random weights (its INT8 bundle built by
``tools build``, a plain full-logits FP32 ONNX export beside it) and the shipped default
with its training checkpoint when there is one."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools import ToolError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
BERT_SOURCE = SHARED / "models" / "bert-base-chinese"
DEFAULT_BUNDLE = REPO / "edge" / "default_bundle"
DEFAULT_CHECKPOINT = REPO / "runs" / "default" / "checkpoint"
FULL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ModelSpec:
    """One model benchmarked three ways: its HF checkpoint and its INT8 bundle."""

    key: str
    label: str
    checkpoint: Path | None
    bundle: Path | None
    random_init: bool
    note: str = ""


def child_env() -> dict[str, str]:
    """The environment of a worker process: this repository importable, hub offline, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONUNBUFFERED="1")
    return env


class FullLogits:
    """Factory for the plain export: ``BertForMaskedLM`` -> logits at every position."""

    @staticmethod
    def wrap(mlm):
        """Return a module with a plain tensor output (``logits [batch, seq, vocab]``)."""
        import torch

        class _Full(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).logits

        return _Full(mlm).eval()


def export_full_fp32(model, out_path: Path) -> dict[str, Any]:
    """Export the standard masked-LM (logits at every position, full vocabulary) to
    FP32 ONNX with the legacy exporter, opset 17; check it against PyTorch."""
    import numpy as np
    import torch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = FullLogits.wrap(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    types = torch.zeros_like(ids)
    tmp = out_path.with_suffix(".tmp.onnx")
    started = time.monotonic()
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (ids, mask, types), str(tmp),
            input_names=list(FULL_INPUTS), output_names=["logits"],
            dynamic_axes={name: {0: "batch", 1: "seq"} for name in FULL_INPUTS} | {"logits": {0: "batch", 1: "seq"}},
            opset_version=17, do_constant_folding=True, dynamo=False,
        )
        reference = wrapper(ids, mask, types).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                             "token_type_ids": types.numpy()})[0]
    diff = float(np.max(np.abs(got - reference)))
    del session
    os.replace(tmp, out_path)
    info = {"path": str(out_path), "bytes": out_path.stat().st_size, "max_abs_diff_vs_torch": diff,
            "export_s": round(time.monotonic() - started, 1)}
    log.info("FP32 full-logits export %s: %.1f MB, max|onnx-torch| %.2g", out_path.name, info["bytes"] / 1e6, diff)
    return info

def prepare_bert_random(source: Path, work: Path, seed: int, bundle: Path | None, rebuild: bool,
                        python: str) -> tuple[ModelSpec, dict[str, Any]]:
    """bert-base-chinese architecture with seeded random weights: an HF checkpoint
    folder (for the pipeline), the plain FP32 export, and the INT8 bundle built by
    ``python -m tools build --random-init`` with the same seed (same weights)."""
    notes: dict[str, Any] = {}
    ckpt_dir = work / "bert-base-chinese-random"
    fp32 = work / "bert-base-chinese-random-fp32-full.onnx"
    if rebuild or not (ckpt_dir / "model.safetensors").is_file() or not fp32.is_file():
        from tools.bundle.checkpoint import load_checkpoint

        log.info("== bert-base-chinese with random weights (seed %d): checkpoint + FP32 export", seed)
        ckpt = load_checkpoint(str(source), random_init=True, seed=seed)
        ckpt.model.save_pretrained(str(ckpt_dir))
        ckpt.tokenizer.save_pretrained(str(ckpt_dir))
        notes["fp32_export"] = export_full_fp32(ckpt.model, fp32)
        (work / "bert-base-chinese-random-fp32-full.json").write_text(json.dumps(notes["fp32_export"]))
        del ckpt
    else:
        meta = work / "bert-base-chinese-random-fp32-full.json"
        notes["fp32_export"] = json.loads(meta.read_text()) if meta.is_file() else {"path": str(fp32)}
    if bundle is None:
        bundle = work / "bert-base-chinese-random-int8"
        if rebuild or not (bundle / "manifest.json").is_file():
            command = [python, "-m", "tools", "build", "--source", str(source), "--random-init",
                       "--seed", str(seed), "--out", str(bundle)]
            log.info("== building the INT8 bundle: %s", shlex.join(command))
            started = time.monotonic()
            proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)
            (work / "build-bert-base-random.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
            if proc.returncode != 0:
                tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                raise ToolError(f"`{shlex.join(command)}` failed with status {proc.returncode}: {tail} "
                                f"(full log: {work / 'build-bert-base-random.log'})")
            notes["bundle_build_s"] = round(time.monotonic() - started, 1)
        notes["bundle_build_command"] = shlex.join([
            "python", "-m", "tools", "build", "--source", str(source), "--random-init", "--seed", str(seed),
            "--out", str(bundle)])
    spec = ModelSpec("bert-base-random", "bert-base-chinese architecture, RANDOM weights", ckpt_dir, bundle,
                     random_init=True, note="random weights: speed/memory/size only; answers are meaningless")
    notes["fp32_onnx"] = str(fp32)
    return spec, notes

def prepare_checkpoint_model(key: str, label: str, checkpoint: Path | None, bundle: Path, work: Path,
                             rebuild: bool) -> tuple[ModelSpec, dict[str, Any]]:
    """A model given as (HF checkpoint, INT8 bundle): export the plain FP32 model."""
    from edge.manifest import Manifest

    manifest = Manifest.load(bundle)
    notes: dict[str, Any] = {"bundle_manifest": {"name": manifest.name, "created": manifest.created,
                                                 "vocab_size": manifest.vocab_size,
                                                 "architecture": vars(manifest.architecture),
                                                 "training": manifest.training,
                                                 "int8_vs_fp32_at_build": (manifest.evaluation.get("quantized_vs_fp32")
                                                                           or manifest.evaluation.get("int8_vs_fp32"))}}
    if checkpoint is None:
        source = Path(manifest.source)
        checkpoint = source if (source / "config.json").is_file() else None
    spec = ModelSpec(key, label, checkpoint, bundle, random_init=manifest.random_init)
    if checkpoint is None or not (checkpoint / "config.json").is_file():
        spec.checkpoint = None
        spec.note = f"no HF checkpoint found for {bundle} (manifest source {manifest.source!r}): only 'ours' runs"
        return spec, notes
    from tools.bundle.checkpoint import read_training_record

    training = read_training_record(checkpoint)
    if training is not None:
        notes["checkpoint_training"] = training
    fp32 = work / f"{key}-fp32-full.onnx"
    meta = work / f"{key}-fp32-full.json"
    stamp = (checkpoint / "model.safetensors").stat().st_mtime if (checkpoint / "model.safetensors").is_file() else 0
    if rebuild or not fp32.is_file() or fp32.stat().st_mtime < stamp:
        from tools.bundle.checkpoint import load_checkpoint

        log.info("== %s: FP32 export of %s", key, checkpoint)
        ckpt = load_checkpoint(str(checkpoint))
        notes["fp32_export"] = export_full_fp32(ckpt.model, fp32)
        meta.write_text(json.dumps(notes["fp32_export"]))
    else:
        notes["fp32_export"] = json.loads(meta.read_text()) if meta.is_file() else {"path": str(fp32)}
    notes["fp32_onnx"] = str(fp32)
    return spec, notes

def prepare_variant_bundle(spec: ModelSpec, method: str, work: Path, rebuild: bool, python: str,
                           corpus: Path) -> Path:
    """The bundle of ``spec``'s checkpoint quantized by ``method`` (static / int4),
    built by ``python -m tools build --quantization METHOD`` with the same vocabulary
    size as the spec's bundle and ``corpus`` (the benchmark's data: calibration and
    the held-apart comparison), cached in ``work``."""
    out = work / f"{spec.key}-{method}"
    stamp = (spec.bundle / "manifest.json").stat().st_mtime
    if not rebuild and (out / "manifest.json").is_file() and (out / "manifest.json").stat().st_mtime >= stamp:
        return out
    vocab = json.loads((spec.bundle / "manifest.json").read_text(encoding="utf-8"))["vocab_size"]
    command = [python, "-m", "tools", "build", "--source", str(spec.checkpoint), "--out", str(out),
               "--vocab", str(vocab), "--corpus", str(corpus), "--quantization", method, "--samples", "50"]
    log.info("== building the %s bundle: %s", method, shlex.join(command))
    proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)
    log_file = work / f"build-{spec.key}-{method}.log"
    log_file.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise ToolError(f"`{shlex.join(command)}` failed with status {proc.returncode}: {tail} (log: {log_file})")
    return out


def weights_bytes(checkpoint: Path) -> int:
    """Bytes of the weight files of an HF checkpoint folder."""
    return sum(p.stat().st_size for p in checkpoint.iterdir()
               if p.name.endswith((".safetensors", ".bin")) and p.is_file())

def default_checkpoint(bundle: Path) -> Path | None:
    """The default bundle's training checkpoint: the manifest's source folder, else runs/default."""
    try:
        source = Path(json.loads((bundle / "manifest.json").read_text(encoding="utf-8")).get("source", ""))
    except (OSError, json.JSONDecodeError):
        source = Path()
    for candidate in (source, REPO / source, DEFAULT_CHECKPOINT):
        if str(candidate) not in ("", ".") and (candidate / "config.json").is_file():
            return candidate
    return None


if __name__ == "__main__":
    print("usage: python -m tools bench --help", file=sys.stderr)
    sys.exit(2)
