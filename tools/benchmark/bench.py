"""``python -m tools bench``: side-by-side latency / memory / load benchmark.

On the same inputs and thread count it runs, each system in a fresh subprocess of
its own (so resident memory and cold start are per system):

1. ``pipeline``: the transformers PyTorch ``fill-mask`` pipeline (what a user would
   pick instead), ``torch.set_num_threads(threads)``;
2. ``ort-fp32``: a plain ONNX Runtime FP32 export made here (standard
   ``BertForMaskedLM`` logits at every position, full vocabulary, no trimming, no
   quantization, no fusion beyond ONNX Runtime's defaults);
3. ``ours``: this runtime, ``edge.engine.Engine`` on the INT8 trimmed bundle;
4. ``ours-static`` / ``ours-int4``: the same runtime on bundles of the same
   checkpoint built with ``--quantization static`` / ``int4`` (``--quantizations``);

for a bert-base-chinese-architecture model with random weights and for the
shipped default model. Inputs are real held-apart sentences (<=32 tokens and ~128
tokens) with one blank, and short ones with a 4-character blank. Then it measures
INT8-vs-FP32 agreement, runs an open-loop HTTP load test against the real service
(``python -m edge serve``), and estimates Pi 4 / Pi 5 latency on paper.

Results go to ``--out``: ``results.md`` (tables), ``results.json`` (raw numbers),
``bench.png`` (chart), plus server logs; exported models are cached in
``--out/work``.

Each system runs in ``python -m tools.benchmark.worker`` (tools/benchmark/worker.py), which
imports only what its system needs (the ``ort-fp32`` and ``ours`` workers never
import torch), so the memory it reports is that system's. The inputs are picked by
tools/benchmark/inputs.py, the tables and chart drawn by tools/benchmark/report.py, the
machine described by tools/benchmark/machine.py, and each model's systems timed in
worker subprocesses by tools/benchmark/timing.py; this module prepares the models and
inputs, runs the timing and the load test, estimates, and writes the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tools import ToolError
from tools.benchmark.inputs import SETS, build_inputs, load_text
from tools.benchmark.report import render_chart, render_markdown
from tools.benchmark.summary import flop_table, goals
from tools.benchmark.worker import QUANTIZED_VARIANTS
from tools.benchmark.machine import contention, machine_info
from tools.benchmark.timing import bench_model
from tools.benchmark.models import (BERT_SOURCE, DEFAULT_BUNDLE, DEFAULT_CHECKPOINT, SHARED, ModelSpec,
                                    default_checkpoint, prepare_bert_random, prepare_checkpoint_model)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


# ============================================================================ command

# --quick: a smoke test of every part
QUICK = {"iterations": 5, "warmup": 1, "cold_runs": 1, "n_agree": 12, "rates": [5.0, 10.0], "load_seconds": 2.0,
         "n_per_set": 8, "n_load": 40}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m tools bench``."""
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench", help="results folder")
    parser.add_argument("--threads", type=int, default=2, help="threads for every system (and the server)")
    parser.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    parser.add_argument("--models", default="bert-base-random,default",
                        help="comma list of bert-base-random (bert-base-chinese config, random weights) and "
                             "default (the shipped bundle + its training checkpoint)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="benchmark this HF checkpoint + --bundle pair instead of --models")
    parser.add_argument("--bundle", type=Path, default=None, help="INT8 bundle built from --checkpoint")
    parser.add_argument("--bert-source", type=Path, default=BERT_SOURCE,
                        help="bert-base-chinese folder (config + tokenizer) for the random-weights model")
    parser.add_argument("--bert-bundle", type=Path, default=None,
                        help="prebuilt random-weights INT8 bundle (default: build one into OUT/work)")
    parser.add_argument("--seed", type=int, default=0, help="random-weights seed (same for checkpoint and bundle)")
    parser.add_argument("--default-bundle", type=Path, default=DEFAULT_BUNDLE, help="the shipped default bundle")
    parser.add_argument("--default-checkpoint", type=Path, default=None,
                        help=f"its HF checkpoint (default: the manifest's source, else {DEFAULT_CHECKPOINT})")
    parser.add_argument("--data", type=Path, default=SHARED / "data", help="corpus for held-apart inputs")
    parser.add_argument("--iterations", type=int, default=40, help="timed queries per system and input set")
    parser.add_argument("--warmup", type=int, default=5, help="untimed queries before timing")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh launches per system for cold start")
    parser.add_argument("--agree-samples", type=int, default=300, help="held-apart blanks for INT8 vs FP32")
    parser.add_argument("--long-tokens", type=int, default=128, help="length of the long inputs (with [CLS]/[SEP])")
    parser.add_argument("--ours-window-ms", type=float, default=0.0, help="engine batch window in the latency runs")
    parser.add_argument("--rates", default="10,25,50,100", help="offered loads for the HTTP test, requests/s")
    parser.add_argument("--load-seconds", type=float, default=12.0, help="duration of each offered rate")
    parser.add_argument("--load-model", default=None,
                        help="comma list of model keys whose bundles the HTTP test serves "
                             "(default: bert-base-random if run, else the first model)")
    parser.add_argument("--batch-window-ms", type=float, default=3.0, help="server batch window, batching-on config")
    parser.add_argument("--max-batch", type=int, default=16, help="server max batch, batching-on config")
    parser.add_argument("--http-threads", type=int, default=None,
                        help="waitress threads in the load test (default: the server's own, max-active + max-waiting + 4)")
    parser.add_argument("--skip", default="", help="comma list of pipeline,ort-fp32,ours,agree,load to leave out")
    parser.add_argument("--quantizations", default="static,int4",
                        help="other quantizations of each model to time beside the dynamic INT8 bundle "
                             "(comma list of static,int4; empty for none)")
    parser.add_argument("--rebuild", action="store_true", help="re-export / rebuild the cached models in OUT/work")
    parser.add_argument("--worker-timeout", type=float, default=900.0, help="seconds before a worker is killed")


def _apply_quick(args: argparse.Namespace) -> tuple[list[float], int, int]:
    """Normalise the options; return the offered rates and how many inputs to pick per
    timed set and for the load test (fewer with ``--quick``)."""
    rates = [float(r) for r in str(args.rates).split(",") if r.strip()]
    n_per_set, n_load = 60, 500
    if args.quick:
        args.iterations = min(args.iterations, QUICK["iterations"])
        args.warmup = min(args.warmup, QUICK["warmup"])
        args.cold_runs = min(args.cold_runs, QUICK["cold_runs"])
        args.agree_samples = min(args.agree_samples, QUICK["n_agree"])
        rates = rates if args.rates != "10,25,50,100" else QUICK["rates"]
        args.load_seconds = min(args.load_seconds, QUICK["load_seconds"])
        n_per_set, n_load = QUICK["n_per_set"], QUICK["n_load"]
    n_per_set = max(n_per_set, args.iterations + args.warmup)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.quantizations = {q.strip() for q in args.quantizations.split(",") if q.strip()}
    if args.quantizations - set(QUANTIZED_VARIANTS.values()):
        raise ToolError(f"--quantizations: unknown {', '.join(sorted(args.quantizations - set(QUANTIZED_VARIANTS.values())))}"
                        " (use static, int4)")
    args.sets = list(SETS)
    return rates, n_per_set, n_load


def _prepare_models(args: argparse.Namespace, work: Path, python: str,
                    warnings: list[str]) -> list[tuple[ModelSpec, dict[str, Any]]]:
    """The models to benchmark, each with its checkpoint, FP32 export and bundles."""
    specs: list[tuple[ModelSpec, dict[str, Any]]] = []
    if args.checkpoint or args.bundle:
        if not (args.checkpoint and args.bundle):
            raise ToolError("--checkpoint and --bundle go together (the bundle must be built from the checkpoint)")
        for path in (args.checkpoint, args.bundle):
            if not path.is_dir():
                raise ToolError(f"{path}: folder does not exist")
        specs.append(prepare_checkpoint_model("custom", f"{args.bundle.name} (from {args.checkpoint})",
                                              args.checkpoint, args.bundle, work, args.rebuild))
    else:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = set(wanted) - {"bert-base-random", "default"}
        if unknown:
            raise ToolError(f"--models: unknown {', '.join(sorted(unknown))} (use bert-base-random, default)")
        if "bert-base-random" in wanted:
            if not (args.bert_source / "config.json").is_file():
                raise ToolError(f"{args.bert_source}: no config.json (the bert-base-chinese config folder)")
            specs.append(prepare_bert_random(args.bert_source, work, args.seed, args.bert_bundle, args.rebuild, python))
        if "default" in wanted:
            if (args.default_bundle / "manifest.json").is_file():
                checkpoint = args.default_checkpoint or default_checkpoint(args.default_bundle)
                specs.append(prepare_checkpoint_model("default", "shipped default model (edge/default_bundle)",
                                                      checkpoint, args.default_bundle, work, args.rebuild))
            else:
                warnings.append(f"no default bundle at {args.default_bundle}: the default model was not benchmarked")
                log.warning("%s", warnings[-1])
    if not specs:
        raise ToolError("nothing to benchmark (no model prepared)")
    return specs


def _pick_inputs(args: argparse.Namespace, specs, work: Path, n_per_set: int, n_load: int) -> tuple[dict, Path]:
    """Held-apart inputs for every set (cached by their settings); return them and the
    file the workers read."""
    if not args.data.exists():
        raise ToolError(f"{args.data}: corpus folder for the held-apart inputs does not exist")
    tokenizer_path = args.bert_source / "tokenizer.json"
    if not tokenizer_path.is_file():
        tokenizer_path = next(s.checkpoint for s, _ in specs if s.checkpoint) / "tokenizer.json"
    key = json.dumps([str(args.data.resolve()), str(tokenizer_path), n_per_set, args.agree_samples, n_load,
                      args.long_tokens, args.seed])
    cache = work / f"inputs-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    if args.rebuild or not cache.is_file():
        log.info("== picking inputs from held-apart text in %s", args.data)
        inputs = build_inputs(args.data, tokenizer_path, n_per_set, args.agree_samples, n_load,
                              long_tokens=args.long_tokens, seed=args.seed)
        cache.write_text(json.dumps(inputs, ensure_ascii=False, indent=1), encoding="utf-8")
    inputs = json.loads(cache.read_text(encoding="utf-8"))
    inputs_path = work / "inputs-used.json"
    inputs_path.write_text(json.dumps(inputs, ensure_ascii=False, indent=1), encoding="utf-8")
    return inputs, inputs_path


def _load_tests(args: argparse.Namespace, specs, results: dict, inputs: dict, rates: list[float], out: Path,
                warnings: list[str]) -> dict[str, Any]:
    """The HTTP load test of each ``--load-model``, in every server configuration."""
    load: dict[str, Any] = {}
    load_keys = [k.strip() for k in (args.load_model or "").split(",") if k.strip()] or \
        ["bert-base-random" if "bert-base-random" in results else specs[0][0].key]
    for load_key in load_keys if "load" not in args.skip else []:
        spec = next((s for s, _ in specs if s.key == load_key), None)
        if spec is None:
            warnings.append(f"--load-model {load_key}: not among the benchmarked models; no load test for it")
            log.warning("%s", warnings[-1])
            continue
        from tools.benchmark.loadtest import load_test

        configs = {
            "batching-on": {"batch_window_ms": args.batch_window_ms, "max_batch": args.max_batch},
            "batching-off": {"batch_window_ms": 0.0, "max_batch": 1},
            # threads // 2 each: two requests run at once instead of one split in two
            **({"2-sessions": {"batch_window_ms": args.batch_window_ms, "max_batch": args.max_batch,
                               "sessions": 2}} if args.threads >= 2 else {}),
            # the service as it was before admission control: every request waits its turn
            # (16 HTTP threads as then; the 5 s request deadline still applies)
            "no-queue-bound": {"batch_window_ms": args.batch_window_ms, "max_batch": args.max_batch,
                               "extra_args": ["--max-waiting", "100000", "--max-wait-ms", "1e9",
                                              "--http-threads", str(args.http_threads or 16)]},
        }
        log.info("== HTTP load test on %s: rates %s req/s, %.0f s each", spec.bundle, rates, args.load_seconds)
        pool = inputs["load_pool"]
        load[load_key] = {
            "model": spec.label, "bundle": str(spec.bundle), "seconds": args.load_seconds, "rates": rates,
            "results": load_test(spec.bundle, lambda i: load_text(pool, i, args.seed), rates, args.load_seconds,
                                 args.threads, configs, http_threads=args.http_threads,
                                 log_dir=out / f"logs-{load_key}", cwd=REPO, progress=log.info)}
        for name, entry in load[load_key]["results"].items():
            if "error" in entry:
                warnings.append(f"load test {load_key} / {name}: {entry['error']}")
    return load


def run(args: argparse.Namespace) -> int:
    """Run the whole benchmark and write results.md / results.json / bench.png."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise ToolError("psutil is needed for memory readings: pip install psutil (it is in the tools extra)") from None
    command = shlex.join(["python", "-m", "tools", *sys.argv[1:]]) if sys.argv[0].endswith("__main__.py") \
        else shlex.join(sys.argv)
    rates, n_per_set, n_load = _apply_quick(args)
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    warnings: list[str] = []
    started = time.monotonic()
    busy = contention()
    if busy["other_heavy_processes"]:
        warnings.append("other CPU-heavy processes were running at the start: " + "; ".join(busy["other_heavy_processes"]))
        log.warning("%s", warnings[-1])

    specs = _prepare_models(args, work, python, warnings)
    inputs, inputs_path = _pick_inputs(args, specs, work, n_per_set, n_load)
    results = {}
    for spec, notes in specs:
        results[spec.key] = bench_model(python, spec, notes, inputs_path, args, work)
        for system, res in results[spec.key]["systems"].items():
            if "error" in res:
                warnings.append(f"{spec.key} / {system}: {res['error']}")
    load = _load_tests(args, specs, results, inputs, rates, out, warnings)

    # -- estimates, goals, report
    from tools.benchmark.pi_estimate import ASSUMPTIONS, cpu_table

    estimates = flop_table(results, inputs)
    estimates["assumptions"] = ASSUMPTIONS
    estimates["targets"] = cpu_table()
    busy_end = contention()
    if busy_end["other_heavy_processes"] and not busy["other_heavy_processes"]:
        warnings.append("other CPU-heavy processes were running at the end: " + "; ".join(busy_end["other_heavy_processes"]))
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(args.threads),
        "contention_start": busy,
        "contention_end": busy_end,
        "settings": {"iterations": args.iterations, "warmup": args.warmup, "cold_runs": args.cold_runs,
                     "threads": args.threads, "quick": args.quick, "ours_window_ms": args.ours_window_ms,
                     "agree_samples": args.agree_samples, "long_tokens": args.long_tokens},
        "inputs": {"source": inputs["source"], "path": str(inputs_path),
                   "counts": {k: len(v) for k, v in inputs.items() if isinstance(v, list)}},
        "models": results,
        "load": load,
        "estimates": estimates,
        "warnings": warnings,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    report["goals"] = goals(results, load)
    (out / "results.json").write_text(json.dumps(report, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    (out / "results.md").write_text(render_markdown(report), encoding="utf-8")
    render_chart(report, out / "bench.png")
    log.info("results: %s, %s, %s (%.0f s)", out / "results.md", out / "results.json", out / "bench.png",
             report["elapsed_s"])
    return 0


