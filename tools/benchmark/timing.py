"""One model's side of ``tools bench``: each system timed in fresh worker subprocesses,
and each quantized bundle's agreement with the FP32 export.

A system (``pipeline``, ``ort-fp32``, ``ours``, ``ours-static``, ``ours-int4``) runs in
``python -m tools.benchmark.worker`` (tools/benchmark/worker.py): one run for its
latency on each input set and its memory, then ``--cold-runs`` fresh launches for
its cold start. The ``agree`` worker compares a quantized bundle with the FP32 export
on the held-apart blanks. tools/benchmark/bench.py calls :func:`bench_model` once per model.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from tools.benchmark.loadtest import percentile
from tools.benchmark.models import REPO, ModelSpec, child_env, prepare_variant_bundle, weights_bytes
from tools.benchmark.worker import ALL_SYSTEMS, QUANTIZED_VARIANTS

log = logging.getLogger(__name__)


def run_worker(python: str, system: str, options: list[str], result_path: Path, timeout_s: float) -> dict[str, Any]:
    """Launch one worker subprocess and return its result (or ``{"error": ...}``)."""
    result_path.unlink(missing_ok=True)
    launched = time.time()
    command = [python, "-m", "tools.benchmark.worker", "--system", system, "--launched-at", repr(launched),
               "--result", str(result_path), *options]
    try:
        proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0 or not result_path.is_file():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        return {"error": f"status {proc.returncode}: {tail}"}
    return json.loads(result_path.read_text(encoding="utf-8"))


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": percentile(values, 50), "min": min(values), "max": max(values)} if values else {}


def bench_model(python: str, spec: ModelSpec, notes: dict[str, Any], inputs_path: Path, args,
                work: Path) -> dict[str, Any]:
    """Time the systems (each in its own subprocesses) and the quantized bundles' agreement with FP32."""
    result: dict[str, Any] = {"label": spec.label, "random_init": spec.random_init, "note": spec.note,
                              "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
                              "bundle": str(spec.bundle), **notes, "systems": {}}
    fp32 = notes.get("fp32_onnx")
    tokenizer = str(spec.checkpoint / "tokenizer.json") if spec.checkpoint else None
    common = ["--inputs", str(inputs_path), "--threads", str(args.threads), "--iterations", str(args.iterations),
              "--warmup", str(args.warmup), "--sets", ",".join(args.sets)]
    per_system, sizes, worker_of = _system_options(python, spec, fp32, tokenizer, args, work)
    for system in ALL_SYSTEMS:
        if system not in per_system:
            continue
        if not system.startswith("ours") and spec.checkpoint is None:
            result["systems"][system] = {"error": "skipped: " + spec.note}
            continue
        if system in args.skip:
            continue
        res = _time_system(python, spec, system, worker_of[system], common + per_system[system], args, work)
        res["model_file_bytes"] = sizes[system]
        result["systems"][system] = res
    if spec.checkpoint is not None and "agree" not in args.skip:
        result["agreement_variants"] = {}
        for system, agree in _agreements(python, spec, per_system, fp32, tokenizer, inputs_path, args, work).items():
            if system == "ours":
                result["agreement"] = agree
            else:
                result["agreement_variants"][system] = agree
    return result


def _system_options(python: str, spec: ModelSpec, fp32, tokenizer: str | None, args,
                    work: Path) -> tuple[dict[str, list[str]], dict[str, int | None], dict[str, str]]:
    """For each system to time: its worker options, its model file's size in bytes, and
    which worker runs it (the quantized variants run in the ``ours`` worker; their
    bundles are built here from the checkpoint when missing)."""
    per_system = {
        "pipeline": ["--checkpoint", str(spec.checkpoint)],
        "ort-fp32": ["--onnx", str(fp32), "--tokenizer", str(tokenizer)],
        "ours": ["--bundle", str(spec.bundle), "--batch-window-ms", str(args.ours_window_ms)],
    }
    sizes = {
        "pipeline": weights_bytes(spec.checkpoint) if spec.checkpoint else None,
        "ort-fp32": Path(fp32).stat().st_size if fp32 and Path(fp32).is_file() else None,
        "ours": (spec.bundle / "model.onnx").stat().st_size,
    }
    worker_of = {system: system for system in per_system}
    for system, method in QUANTIZED_VARIANTS.items():
        if method in args.quantizations and spec.checkpoint is not None:
            variant = prepare_variant_bundle(spec, method, work, args.rebuild, python, args.data)
            per_system[system] = ["--bundle", str(variant), "--batch-window-ms", str(args.ours_window_ms)]
            sizes[system] = (variant / "model.onnx").stat().st_size
            worker_of[system] = "ours"
    return per_system, sizes, worker_of


def _time_system(python: str, spec: ModelSpec, system: str, worker: str, options: list[str], args,
                 work: Path) -> dict[str, Any]:
    """One system's latency run in a fresh worker, then ``--cold-runs`` fresh launches
    for its cold start; the worker's result (or ``{"error": ...}``)."""
    log.info("== %s / %s: timing (%d iterations x %s, %d threads)", spec.key, system, args.iterations,
             ",".join(args.sets), args.threads)
    res = run_worker(python, worker, options, work / f"{spec.key}-{system}.json", args.worker_timeout)
    if "error" in res:
        log.error("%s / %s failed: %s", spec.key, system, res["error"])
    else:
        for name, data in res.get("sets", {}).items():
            log.info("   %-8s median %8.1f ms  p99 %8.1f ms", name, data["median_ms"], data["p99_ms"])
        log.info("   RSS loaded %.0f MB, after run %.0f MB; cold start %.2f s", res["rss_loaded_mb"],
                 res["rss_after_run_mb"], res["cold_start_s"])
    colds = []
    for k in range(args.cold_runs if "error" not in res else 0):
        cold = run_worker(python, worker, options + ["--cold-only"],
                          work / f"{spec.key}-{system}-cold{k}.json", args.worker_timeout)
        if "cold_start_s" in cold:
            colds.append(cold["cold_start_s"])
    if colds:
        res["cold_start"] = _summary(colds)
        res["cold_start"]["runs"] = colds
        log.info("   cold start (%d fresh launches): median %.2f s", len(colds), res["cold_start"]["median"])
    return res


def _agreements(python: str, spec: ModelSpec, per_system: dict[str, list[str]], fp32, tokenizer: str | None,
                inputs_path: Path, args, work: Path) -> dict[str, dict[str, Any]]:
    """Each quantized bundle's top-1 / top-5 agreement with the FP32 export on the
    held-apart blanks, by system (``ours`` and the variants being timed)."""
    agreements = {}
    for system in ("ours", *QUANTIZED_VARIANTS):
        if system not in per_system:
            continue
        bundle = per_system[system][1]
        log.info("== %s: %s bundle vs FP32 agreement on held-apart blanks", spec.key, system)
        agree = run_worker(python, "agree", ["--inputs", str(inputs_path), "--threads", str(args.threads),
                                             "--onnx", str(fp32), "--tokenizer", str(tokenizer),
                                             "--bundle", bundle],
                           work / f"{spec.key}-{system}-agree.json", args.worker_timeout)
        agreements[system] = agree
        if "top1_agreement" in agree:
            log.info("   top-1 agreement %.4f, top-5 overlap %.4f over %d blanks (kept vocab: %.4f / %.4f)",
                     agree["top1_agreement"], agree["top5_overlap"], agree["masked_positions"],
                     agree["top1_agreement_kept_vocab"], agree["top5_overlap_kept_vocab"])
        else:
            log.error("agreement failed: %s", agree.get("error"))
    return agreements
