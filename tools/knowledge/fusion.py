"""``python -m tools fusion fit``: fit the weights that fuse a bundle's masked-LM with its
word LM and phrase memory, and store them in its manifest.

The fused score of a candidate is ``w · f`` over the features of
:data:`edge.fusion.FEATURES`; ``score`` is the softmax of those over the blank's
candidates and a "none of these" outcome with its own fitted score. The weights are
the maximum-likelihood ones (a conditional logit: the log-likelihood is concave in
``w``, so Newton's method finds the one optimum; a small L2 term keeps it finite) on
the development data of :mod:`tools.evaluation.dev_sets` only — held-apart cloze passages that
``tools evaluate`` does not measure, ChID ``dev_few_all.json``, the 16 everyday
sentences. One weight set per kind of blank: one character, a longer blank (masked
words), ``blank_length: "auto"``, and given fillers (``score_fillers``; ChID's idioms).

Each development query goes through the engine itself (:meth:`Engine.fused_candidates`
/ :meth:`Engine.given_candidates`), so the features are exactly those the board
computes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tools import ToolError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
_SHARED_FEATURES = ("model", "lm", "mem_context", "mem_best", "mem_best5", "mem_best7", "mem_best11", "mem_cover",
                    "model_z", "lm_z", "mem_z", "model_oov", "mem_two2", "mem_two3", "mem_whole", "echo", "cohesion")
KIND_FEATURES = {
    "char": _SHARED_FEATURES,  # no idiom is one character: assoc is always 0 here
    "word": _SHARED_FEATURES + ("assoc",),
    "auto": _SHARED_FEATURES + ("len2", "len3", "len4", "assoc"),
    "given": _SHARED_FEATURES + ("assoc",),
}


@dataclass
class FitItem:
    """One development query as the fit sees it: the candidates' features and which
    one is right (-1: none of them)."""

    features: np.ndarray  # [candidates, FEATURES]
    answer: int
    null: bool  # whether "none of these" is an outcome (not for a given candidate list)
    set: str
    null_features: np.ndarray | None = None  # [NULL_FEATURES] of that outcome


def fit_weights(items: Sequence[FitItem], names: Sequence[str], l2: float = 1e-3,
                iterations: int = 50) -> tuple[dict[str, float], dict]:
    """Maximum-likelihood weights for the features ``names`` (plus the null outcome's)."""
    from edge.fusion import FEATURES, NULL_FEATURES

    cols = [FEATURES.index(n) for n in names]
    k = len(NULL_FEATURES)
    d = len(cols) + k  # + the null outcome's features
    data = []
    for item in items:
        x = np.zeros((len(item.features) + (1 if item.null else 0), d))
        x[: len(item.features), :-k] = item.features[:, cols]
        if item.null:
            x[-1, -k:] = item.null_features
        answer = item.answer if item.answer >= 0 else (len(x) - 1 if item.null else -1)
        if answer >= 0:
            data.append((x, answer))
    if not data:
        raise ToolError("no development item has its answer among the candidates")
    w = np.zeros(d)
    lam = l2 * len(data)

    def objective(w):
        total, grad, hess = -lam * float(w @ w) / 2, -lam * w, -lam * np.eye(d)
        for x, y in data:
            s = x @ w
            s = s - s.max()
            p = np.exp(s)
            p /= p.sum()
            total += float(np.log(max(p[y], 1e-300)))
            mean = p @ x
            grad += x[y] - mean
            hess -= (x * p[:, None]).T @ x - np.outer(mean, mean)
        return total, grad, hess

    value, grad, hess = objective(w)
    for _ in range(iterations):
        step = np.linalg.solve(-hess, grad)
        scale = 1.0
        while scale > 1e-4:
            new = w + scale * step
            new_value, new_grad, new_hess = objective(new)
            if new_value >= value - 1e-9:
                break
            scale /= 2
        w, gain = new, new_value - value
        value, grad, hess = new_value, new_grad, new_hess
        if abs(gain) < 1e-7:
            break
    weights = {n: round(float(v), 5) for n, v in zip(list(names) + list(NULL_FEATURES), w)}
    correct = sum(int(np.argmax(x @ w) == y) for x, y in data)
    return weights, {"items": len(data), "log_likelihood_per_item": round(value / len(data), 4),
                     "top1_in_sample": round(correct / len(data), 4)}


def collect(engine, queries: Sequence, progress: Callable[[str], None] | None = None) -> list[FitItem]:
    """Run each development query through the engine and keep its candidates' features."""
    fusion = engine.fusion
    items = []
    started = time.monotonic()
    for k, query in enumerate(queries):
        try:
            if getattr(query, "candidates", None) is not None:  # ChID: a given candidate list
                cands = engine.given_candidates(query.text, list(query.candidates))
                items.append(FitItem(fusion.feature_matrix(cands, cands[0].z), query.answer, False, "chid"))
                continue
            blanks = engine.fused_candidates(query.text, query.blank_length)
        except ValueError as exc:
            log.debug("skipped %r: %s", query.text[:30], exc)
            continue
        if len(blanks) != 1 or not blanks[0]:
            continue
        cands = blanks[0]
        texts = [c.text for c in cands]
        answer = texts.index(query.answer) if query.answer in texts else -1
        items.append(FitItem(fusion.feature_matrix(cands, cands[0].z), answer, True, query.set,
                             fusion.null_features(cands[0].z)))
        if progress and (k + 1) % 200 == 0:
            progress(f"{k + 1}/{len(queries)} development queries ({time.monotonic() - started:.0f} s)")
    return items


@dataclass(frozen=True)
class ChoiceQuery:
    """A ChID question: text with its blank, the given candidates, the answer's index."""

    text: str
    candidates: tuple[str, ...]
    answer: int


def development_queries(data: Path, chid: Path | None, n_char: int, n_word: int, n_auto: int,
                        test_fraction: float = 0.02) -> dict[str, list]:
    """The development queries by kind (see :mod:`tools.evaluation.dev_sets`)."""
    from tools.evaluation import dev_sets
    from tools.train.wwm import held_apart_passages

    log.info("held-apart passages of %s (test fraction %s)", data, test_fraction)
    passages = dev_sets.fit_passages(held_apart_passages(data, test_fraction))
    log.info("%d held-apart passages not measured by tools evaluate", len(passages))
    sets = {
        "char": dev_sets.char_items(passages, n_char) + dev_sets.everyday_items(),
        "word": dev_sets.word_items(passages, n_word),
        "auto": dev_sets.word_items(passages, n_auto, seed=3, lengths=(1, 2, 3, 4), auto=True),
    }
    if chid is not None and Path(chid).is_file():
        from tools.evaluation.items import read_chid

        sets["given"] = [ChoiceQuery(q.text, q.candidates, q.answer) for q in read_chid(chid)]
    else:
        log.warning("%s not found: no weights for given fillers (score_fillers uses the word weights)", chid)
    return sets


def fit_bundle(bundle: Path, data: Path, chid: Path | None, n_char: int = 2000, n_word: int = 600,
               n_auto: int = 400, threads: int | None = None) -> dict:
    """Fit the fusion weights of ``bundle`` and write them into its manifest."""
    from edge.engine import Engine
    from edge.fusion import settings_of
    from edge.manifest import Manifest

    manifest = Manifest.load(bundle)
    if manifest.lm is None and manifest.memory is None:
        raise ToolError(f"{bundle}: has no word LM or phrase memory to fuse (tools lm convert / tools memory build)")
    if manifest.random_init:
        raise ToolError(f"{bundle}: has random weights; fusion weights fitted on it would be meaningless")
    if not Path(data).exists():
        raise ToolError(f"{data}: development corpus not found")
    started = time.monotonic()
    sets = development_queries(Path(data), chid, n_char, n_word, n_auto)
    # Fitted from the defaults (the features do not depend on the weights).
    manifest.fusion = None
    manifest.save(bundle)
    engine = Engine.from_bundle(bundle, threads=threads, cache_size=0)
    settings = settings_of(None)
    report: dict = {}
    try:
        for kind, queries in sets.items():
            log.info("%s: %d development queries", kind, len(queries))
            items = collect(engine, queries, progress=lambda m, k=kind: log.info("%s: %s", k, m))
            recall = [i.answer >= 0 for i in items if i.null]
            weights, fit = fit_weights(items, KIND_FEATURES[kind])
            settings["weights"][kind] = weights
            fit["answer_among_candidates"] = round(sum(recall) / len(recall), 4) if recall else None
            fit["sets"] = {name: sum(1 for i in items if i.set == name) for name in sorted({i.set for i in items})}
            report[kind] = fit
            log.info("%s weights %s; %s", kind, weights, fit)
    finally:
        engine.close()
    settings["fitted"] = True
    settings["fit"] = {"kinds": report, "seconds": round(time.monotonic() - started, 1),
                       "data": "held-apart cloze passages not measured by tools evaluate (seed 1-3), "
                               "ChID dev_few_all.json, the 16 everyday sentences"}
    manifest = Manifest.load(bundle)
    manifest.fusion = settings
    manifest.save(bundle)
    return settings


# Queries for the latency benchmark (written for it; ≤ 32 tokens each).
WORD_QUERIES = ["他做事总是[MASK][MASK][MASK][MASK]，让人放心。", "这件事情真是[MASK][MASK][MASK][MASK]，让人难以相信。",
                "我们要[MASK][MASK][MASK][MASK]，不能半途而废。", "他[MASK][MASK][MASK][MASK]地看着窗外。",
                "这家饭馆的菜[MASK][MASK][MASK][MASK]，每天都有很多人。", "考试之前他[MASK][MASK][MASK][MASK]，复习到深夜。"]
AUTO_QUERIES = ["今天天气很好，我们去[MASK]散步吧。", "我昨天去[MASK]买了一些水果。", "他是一位很有名的[MASK]。",
                "这本书的[MASK]非常有意思。", "春眠不觉晓，处处闻[MASK]。", "我们明天在学校[MASK]见面。"]


def _percentiles(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
            "n": len(times)}


def bench_latency(bundle: Path | None, threads: int | None, repeats: int = 5) -> dict:
    """Engine latency per query kind, fused and model-only (cache off, no batching wait)."""
    from edge.engine import Engine
    from tools.benchmark.presets import QUERIES

    engine = Engine.from_bundle(bundle, threads=threads, cache_size=0, batch_window_ms=0.0)
    out: dict = {"threads": engine.threads}
    try:
        kinds = {"one character": (QUERIES, None), "four characters": (WORD_QUERIES, None),
                 "auto": (AUTO_QUERIES, "auto")}
        for fused in (True, False):
            for kind, (queries, blank_length) in kinds.items():
                for q in queries[:2]:
                    engine.predict(q, blank_length=blank_length, fusion=fused)  # warm-up
                times = []
                for _ in range(repeats):
                    for q in queries:
                        started = time.perf_counter()
                        engine.predict(q, blank_length=blank_length, fusion=fused)
                        times.append((time.perf_counter() - started) * 1000)
                out[f"{'fused' if fused else 'model only'}, {kind}"] = _percentiles(times)
    finally:
        engine.close()
    return out


def bench_server_rss(bundle: Path | None, queries: int = 100) -> dict:
    """Resident memory of a real ``python -m edge serve`` after ``queries`` distinct
    POST /api/predict requests (the ``make run`` command)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    from tools.evaluation.dev_sets import EVERYDAY
    from tools.benchmark.presets import QUERIES

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "edge", "serve", "--port", str(port)] + (["--bundle", str(bundle)] if bundle else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise ToolError("the server did not come up within 60 s")
                time.sleep(0.2)
        rss_idle = _rss_mb(server.pid)["VmRSS"]
        texts = [t for t, _ in EVERYDAY] + QUERIES + WORD_QUERIES + AUTO_QUERIES
        sent, times = 0, []
        while sent < queries:
            base = texts[sent % len(texts)]
            # Distinct texts, so the cache answers none of them.
            text = base if sent < len(texts) else f"第{sent}句：{base}"
            body = json.dumps({"text": text, "blank_length": "auto" if base in AUTO_QUERIES else None}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/predict", data=body,
                                             headers={"Content-Type": "application/json"})
            started = time.perf_counter()
            urllib.request.urlopen(request, timeout=30).read()
            times.append((time.perf_counter() - started) * 1000)
            sent += 1
        after = _rss_mb(server.pid)
        return {"rss_mb_after_start": rss_idle, f"rss_mb_after_{queries}_queries": after["VmRSS"],
                # Private memory, and clean pages of mapped files (the bundle's lm.bin and
                # memory.bin among them: the kernel can drop those and read them again).
                "rss_anon_mb": after.get("RssAnon"), "rss_file_mb": after.get("RssFile"),
                "http": _percentiles(times), "command": " ".join(command[1:])}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _rss_mb(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of a process, MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m tools fusion``."""
    sub = parser.add_subparsers(dest="fusion_command", required=True, metavar="ACTION")
    fit = sub.add_parser("fit", help="fit the fusion weights of a bundle on the development data",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fit.add_argument("--bundle", type=Path, required=True, help="bundle with lm.bin and/or memory.bin")
    fit.add_argument("--data", type=Path, default=SHARED / "data", help="corpus whose held-apart split is used")
    fit.add_argument("--chid", type=Path, default=SHARED / "data" / "fewclue" / "chid" / "dev_few_all.json",
                     help="ChID development questions")
    fit.add_argument("--char", type=int, default=2000, help="one-character cloze queries")
    fit.add_argument("--word", type=int, default=600, help="whole-word (2-4 character) cloze queries")
    fit.add_argument("--auto", type=int, default=400, help='blank_length "auto" queries')
    fit.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    bench = sub.add_parser("bench", help="latency (fused / model only; 1 character, 4 characters, auto), "
                                         "server RSS after 100 queries, bundle size",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--bundle", type=Path, default=None, help="bundle (default: the embedded one)")
    bench.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    bench.add_argument("--repeats", type=int, default=5, help="passes over each query set")
    bench.add_argument("--queries", type=int, default=100, help="HTTP queries before reading the server's RSS")


def run(args: argparse.Namespace) -> int:
    """Run ``fusion fit`` or ``fusion bench``."""
    if args.fusion_command == "bench":
        from edge.bundle import load_bundle

        logging.getLogger().setLevel(logging.WARNING)  # stdout is the JSON report
        bundle = load_bundle(args.bundle)
        report = {"bundle": str(bundle.path), "bundle_mb": round(sum(e.size for e in bundle.manifest.files.values())
                                                                   / 1e6, 1)}
        report["latency"] = bench_latency(args.bundle, args.threads, args.repeats)
        report["server"] = bench_server_rss(args.bundle, args.queries)
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    if not (args.bundle / "manifest.json").is_file():
        raise ToolError(f"{args.bundle}: not a bundle folder (no manifest.json)")
    settings = fit_bundle(args.bundle, args.data, args.chid, args.char, args.word, args.auto, args.threads)
    print(json.dumps(settings["weights"], ensure_ascii=False, indent=2))
    return 0
