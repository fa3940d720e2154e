"""``python -m tools presets``: which checkpoint to start from, and what it costs.

Lists the hub checkpoints ``tools build`` / ``tools distill`` accept by short name
(``--source rbt3``), with their shape, parameter count and the arithmetic of one
short query (32 tokens, one blank). With ``--measure`` every distinct shape is built
here as an INT8 bundle with *random* weights (speed depends on the shape only; the
hub is not reachable from the build box) and timed through the edge runtime; our own
bundles (``--bundle DIR``) are timed the same way. The Raspberry Pi figures are paper
estimates (``tools/benchmark/pi_estimate.py``: this machine's measured efficiency carried over
to the Pi's peak rates, floored by streaming the weights from DRAM).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools import ToolError
from tools.bundle.checkpoint import PRESETS, Preset

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BERT_SOURCE = REPO.parent / "shared" / "models" / "bert-base-chinese"
QUERY_TOKENS = 32
TRIMMED_VOCAB = 8000  # what ``tools build`` keeps by default
# Short everyday queries (≤ 32 tokens with [CLS]/[SEP]), one blank each.
QUERIES = [
    "床前明月光，疑是地[MASK]霜。", "今天天气很[MASK]，我们去公园散步吧。", "他每天早上都喝一杯[MASK]啡。",
    "这本书的作者是一位著名的[MASK]家。", "我在北[MASK]上大学，学的是计算机。", "春眠不觉晓，处处闻啼[MASK]。",
    "请把窗户关上，外面风太[MASK]了。", "妈妈做的饭菜非常好[MASK]。", "我们明天上午九点在学校门[MASK]见面。",
    "这家店的东西又便宜又[MASK]用。", "学而时习之，不亦[MASK]乎？", "火车晚点了半个小[MASK]。",
]


def preset_params(p: Preset, vocab: int | None = None) -> int:
    """Parameters of a BERT masked LM of this shape (embeddings, encoder, MLM head)."""
    v = p.vocab if vocab is None else vocab
    h, i, n = p.hidden, p.intermediate, p.layers
    embeddings = (v + 512 + 2) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h + 2 * h
    head = h * h + h + 2 * h + v  # transform + LayerNorm + decoder bias (decoder tied)
    return embeddings + n * layer + head


def query_gflop(p: Preset, vocab: int = TRIMMED_VOCAB) -> float:
    """GFLOP of one 32-token query with one blank (head at that position only)."""
    from tools.benchmark.pi_estimate import Shape, query_flops

    return query_flops(Shape(p.layers, p.hidden, p.intermediate, vocab), QUERY_TOKENS, 1) / 1e9


def measured_gflop(layers: int, hidden: int, intermediate: int, vocab: int) -> float:
    """Mean GFLOP of the timed QUERIES as the engine runs them: each padded to its
    length bucket (a query is shorter than 32 tokens, so this is less than
    ``query_gflop``; the Pi estimate must divide the work actually done)."""
    from edge.batcher import DEFAULT_BUCKETS
    from tools.benchmark.pi_estimate import Shape, query_flops

    shape = Shape(layers, hidden, intermediate, vocab)
    total = 0.0
    for q in QUERIES:
        tokens = len(q.replace("[MASK]", "_")) + 2  # one token a character, + [CLS] [SEP]
        bucket = next(b for b in DEFAULT_BUCKETS if b >= tokens)
        total += query_flops(shape, bucket, 1)
    return total / len(QUERIES) / 1e9


def _shape_key(p: Preset) -> str:
    return f"{p.layers}x{p.hidden}x{p.heads}x{p.intermediate}"


def build_random_bundle(p: Preset, work: Path, vocab: int) -> Path:
    """An INT8 bundle of this shape with random weights (cached under ``work``)."""
    key = _shape_key(p)
    bundle = work / f"bundle-{key}-v{vocab}"
    if (bundle / "manifest.json").is_file():
        return bundle
    if not (BERT_SOURCE / "config.json").is_file():
        raise ToolError(f"{BERT_SOURCE}: bert-base-chinese config/tokenizer folder not found (needed for --measure)")
    source = work / f"config-{key}"
    source.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (BERT_SOURCE / name).is_file():
            shutil.copy(BERT_SOURCE / name, source / name)
    config = json.loads((BERT_SOURCE / "config.json").read_text(encoding="utf-8"))
    config.update(num_hidden_layers=p.layers, hidden_size=p.hidden, num_attention_heads=p.heads,
                  intermediate_size=p.intermediate)
    (source / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    command = [sys.executable, "-m", "tools", "build", "--source", str(source), "--random-init",
               "--out", str(bundle), "--vocab", str(vocab), "--name", f"random-{key}"]
    log.info("building a random-weight INT8 bundle of shape %s: %s", key, " ".join(command))
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    (work / f"build-{key}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise ToolError(f"building shape {key} failed (log: {work / f'build-{key}.log'}): "
                        + " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:]))
    return bundle


def time_bundle(bundle: Path | None, threads: int | None, repeats: int = 5, fusion: bool | None = True) -> dict[str, Any]:
    """Median / p90 engine latency (ms) of the short queries, cache and batching off
    (``fusion``: with the bundle's word LM and memory when it has them)."""
    from edge.engine import Engine

    engine = Engine.from_bundle(bundle, threads=threads, cache_size=0, batch_window_ms=0.0, max_batch=1,
                                fusion=fusion is not False)
    try:
        for q in QUERIES[:3]:
            engine.predict(q)  # warm-up: first runs allocate
        times = []
        for _ in range(repeats):
            for q in QUERIES:
                t0 = time.perf_counter()
                engine.predict(q)
                times.append((time.perf_counter() - t0) * 1000)
        info = engine.info()
    finally:
        engine.close()
    times.sort()
    size = sum(int(f.get("size", 0)) for f in (info.get("files") or {}).values() if isinstance(f, dict))
    arch = info.get("architecture") or {}
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
            "n": len(times), "threads": engine.threads if hasattr(engine, "threads") else threads,
            "bundle_bytes": size, "vocab_size": info.get("vocab_size"), "architecture": arch,
            "name": info.get("name"), "random_init": info.get("random_init")}


def _pi(host, flops: float, measured_ms: float, weight_bytes: int, threads: int) -> dict[str, float]:
    from tools.benchmark.pi_estimate import PI4, PI5, estimate

    est = estimate(flops, measured_ms, host, threads, True, weight_bytes)
    return {"pi4_ms": round(est["targets"][PI4.name]["estimate_ms"], 1),
            "pi5_ms": round(est["targets"][PI5.name]["estimate_ms"], 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``presets``."""
    parser.add_argument("--measure", action="store_true",
                        help="build each shape with random weights and time it here (minutes)")
    parser.add_argument("--max-layers-hidden", type=int, default=12 * 768,
                        help="with --measure: skip shapes with layers×hidden above this (the large ones)")
    parser.add_argument("--bundle", type=Path, action="append", default=[],
                        help="also time this bundle of ours (repeatable)")
    parser.add_argument("--vocab", type=int, default=TRIMMED_VOCAB, help="trimmed vocabulary of the built bundles")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: usable cores)")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "presets", help="cache of built bundles")
    parser.add_argument("--out", type=Path, default=None, help="write presets.md and presets.json there")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    """The guide table."""
    lines = [f"Latency: median of one query ≤ {QUERY_TOKENS} tokens with one blank through the edge engine "
             f"(INT8, vocabulary trimmed to the corpus), measured on {machine}; Pi 4 / Pi 5: paper estimates "
             "from that measurement (tools/benchmark/pi_estimate.py).", "",
             "| model | hub id / bundle | layers×hidden | params (M) | GFLOP/query | here (ms) | Pi 4 est. (ms) "
             "| Pi 5 est. (ms) | INT8 bundle (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {name} | {where} | {shape} | {params} | {gflop:.2f} | {here} | {pi4} | {pi5} | {size} |".format(
            name=r["name"], where=r["where"], shape=r["shape"], params=f"{r['params'] / 1e6:.1f}",
            gflop=r["gflop"], here=r.get("median_ms", "–"), pi4=r.get("pi4_ms", "–"), pi5=r.get("pi5_ms", "–"),
            size=f"{r['bundle_bytes'] / 1e6:.1f}" if r.get("bundle_bytes") else "–"))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print (and optionally measure) the preset table."""
    from tools.benchmark.pi_estimate import Shape, query_flops

    from tools.benchmark.pi_estimate import host_cpu

    if args.json and not getattr(args, "debug", False):
        logging.getLogger().setLevel(logging.WARNING)  # stdout is then pure JSON (warnings still show)
    host = host_cpu()[0]
    rows: list[dict[str, Any]] = []
    measured: dict[str, dict[str, Any]] = {}
    for name, p in PRESETS.items():
        row = {"name": name, "where": p.hub_id, "shape": f"{p.layers}×{p.hidden}", "params": preset_params(p),
               "gflop": query_gflop(p, args.vocab), "note": p.note}
        key = _shape_key(p)
        if args.measure and p.layers * p.hidden <= args.max_layers_hidden:
            if key not in measured:
                bundle = build_random_bundle(p, args.work, args.vocab)
                measured[key] = time_bundle(bundle, args.threads)
                log.info("%s: %.1f ms median", key, measured[key]["median_ms"])
            m = measured[key]
            work = measured_gflop(p.layers, p.hidden, p.intermediate, args.vocab) * 1e9
            row.update(median_ms=m["median_ms"], p90_ms=m["p90_ms"], bundle_bytes=m["bundle_bytes"],
                       **_pi(host, work, m["median_ms"], m["bundle_bytes"], m["threads"] or 1))
        rows.append(row)
    for path in args.bundle:
        m = time_bundle(path, args.threads)
        arch = m["architecture"]
        shape = Shape(int(arch["num_layers"]), int(arch["hidden_size"]), int(arch["intermediate_size"]),
                      int(m["vocab_size"]))
        flops = query_flops(shape, QUERY_TOKENS, 1)
        params = preset_params(Preset("", shape.layers, shape.hidden, int(arch["num_heads"]), shape.intermediate,
                                      shape.vocab, ""))
        rows.append({"name": m["name"] or path.name, "where": str(path), "shape": f"{shape.layers}×{shape.hidden}",
                     "params": params, "gflop": flops / 1e9, "median_ms": m["median_ms"], "p90_ms": m["p90_ms"],
                     "bundle_bytes": m["bundle_bytes"],
                     **_pi(host, measured_gflop(shape.layers, shape.hidden, shape.intermediate, shape.vocab) * 1e9,
                           m["median_ms"], m["bundle_bytes"], m["threads"] or 1)})
    machine = f"{host.name}, {args.threads or 'all usable'} thread(s)"
    text = markdown(rows, machine)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "presets.md").write_text(text, encoding="utf-8")
        (args.out / "presets.json").write_text(json.dumps({"machine": machine, "rows": rows}, ensure_ascii=False,
                                                          indent=2), encoding="utf-8")
        log.info("written: %s", args.out / "presets.md")
    print(json.dumps(rows, ensure_ascii=False, indent=2) if args.json else text)
    return 0
