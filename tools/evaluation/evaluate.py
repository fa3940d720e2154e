"""``python -m tools evaluate``: accuracy of a bundle, measured through the edge engine.

Everything goes through ``edge.engine.Engine`` (``predict`` / ``score_fillers``), so
the figures are those of what ships: tokenizer, trimmed vocabulary, ONNX graph,
quantization and the engine's own decoding.

(a) Random-character cloze: in each held-apart passage one CJK character, chosen
    with a seeded generator, is replaced by ``[MASK]``; top-1 / top-5 accuracy of
    ``predict(text, top_k=5)``. The passages are a text file (one a line) or, by
    default, the test split of ``../shared/data`` computed with the same function
    ``pretrain`` uses (:func:`tools.train.wwm.held_apart_passages`), i.e. text no model
    of ours was trained on. A character outside the bundle's vocabulary counts as a
    miss (the model cannot produce it).
(b) ChID idiom choice (FewCLUE ``chid/dev_few_all.json``): ``#idiom#`` becomes four
    ``[MASK]``; each of the 7 candidates is scored by its joint log-probability
    (``score_fillers``, chain rule left to right); the best one is the answer.
    Chance is 1/7. ``chid_acc_pmi`` is a second figure: each candidate's score minus
    its score with no context (the same blank alone), i.e. pointwise mutual
    information. The plain joint score favours candidates made of frequent characters,
    more so the better a model knows character frequencies; PMI asks what the
    context adds. When a passage holds several ``#idiom#`` the first is the blank
    the candidates belong to (as :func:`tools.train.corpus.record_text` assumes) and the
    others are deleted (the engine would read them as text otherwise).
(c) The 16 everyday sentences of :mod:`tools.evaluation.everyday`: how many get the expected
    answer first and in the top 5.
(d) Several bundles (``--bundle`` repeated, or ``--compare FP32_DIR``) are measured
    on the same items; the report adds each bundle's top-1 agreement with the first.
(e) A bundle with a word LM or a phrase memory is measured as it ships (fusion on)
    and, in a second row, from its model alone (``fusion: false``); the fused row
    says which sources proposed the top-1 answers (``top1_sources``: the share of
    top-1 answers listing each of ``model``, ``lm``, ``memory``; ``top1_not_model``:
    the share the model did not propose at all).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from tools import ToolError
from tools.evaluation.items import MASK, ChidItem, ClozeItem, make_cloze_items, read_chid, read_passages

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
DEFAULT_CHID = SHARED / "data" / "fewclue" / "chid" / "dev_few_all.json"
DEFAULT_DATA = SHARED / "data"


def _map(function: Callable, items: Sequence, workers: int) -> list:
    """Apply ``function`` over ``items``; several workers let the engine micro-batch."""
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items))


def evaluate_cloze(engine, items: Sequence[ClozeItem], top_k: int = 5, workers: int = 4,
                   progress: Callable[[str], None] | None = None, fusion: bool | None = None) -> dict:
    """Top-1 / top-k accuracy of ``engine.predict`` on ``items``.

    A query the engine rejects (``ValueError`` / ``InputError``) or that yields a
    number of blanks other than one is *skipped* (counted in ``cloze_skipped``),
    not scored.
    """
    def ask(item: ClozeItem):
        try:
            result = engine.predict(item.text, top_k=top_k, **_fusion_option(fusion))
        except ValueError as exc:
            return None, f"{getattr(exc, 'code', 'error')}: {exc}"
        if len(result.get("blanks", [])) != 1:
            return None, f"{len(result.get('blanks', []))} blanks"
        return result["blanks"][0]["candidates"], None

    started = time.monotonic()
    answers = _map(ask, items, workers)
    top1 = topk = scored = 0
    predictions: list[str | None] = []
    skipped: list[str] = []
    sources: dict[str, int] = {}
    not_model = 0
    for item, (candidates, problem) in zip(items, answers):
        if candidates is None:
            skipped.append(problem)
            predictions.append(None)
            continue
        scored += 1
        texts = [c["text"] for c in candidates]
        predictions.append(texts[0] if texts else None)
        top1 += bool(texts) and texts[0] == item.answer
        topk += item.answer in texts[:top_k]
        if candidates:
            for source in candidates[0].get("sources", ["model"]):
                sources[source] = sources.get(source, 0) + 1
            not_model += "model" not in candidates[0].get("sources", ["model"])
    if progress:
        progress(f"cloze: {scored} scored, {len(skipped)} skipped in {time.monotonic() - started:.1f} s")
    return {"cloze_top1": top1 / scored if scored else None, f"cloze_top{top_k}": topk / scored if scored else None,
            "n_cloze": scored, "cloze_skipped": len(skipped), "cloze_skip_reasons": sorted(set(skipped))[:5],
            "cloze_seconds": round(time.monotonic() - started, 2), "_cloze_predictions": predictions,
            "top1_sources": {k: round(v / scored, 4) for k, v in sorted(sources.items())} if scored else {},
            "top1_not_model": round(not_model / scored, 4) if scored else None}


def evaluate_everyday(engine, fusion: bool | None = None) -> dict:
    """The 16 everyday sentences: expected answer first / in the top 5, and which missed."""
    from tools.evaluation.everyday import EVERYDAY

    first = in_top5 = 0
    missed = []
    for text, answer in EVERYDAY:
        result = engine.predict(text, top_k=5, **_fusion_option(fusion))
        texts = [c["text"] for c in result["blanks"][0]["candidates"]]
        first += bool(texts) and texts[0] == answer
        in_top5 += answer in texts
        if not texts or texts[0] != answer:
            missed.append(f"{text} → {texts[0] if texts else '–'} (want {answer})")
    return {"everyday_top1": first, "everyday_top5": in_top5, "n_everyday": len(EVERYDAY), "everyday_missed": missed}


def _no_context_scores(engine, fillers: Sequence[str], fusion: bool | None = None) -> dict[str, float]:
    """Each filler's joint log-probability with no context (the blank alone); one
    engine call per filler length."""
    by_length: dict[int, list[str]] = {}
    for filler in fillers:
        by_length.setdefault(len(filler), []).append(filler)
    scores: dict[str, float] = {}
    for length, group in by_length.items():
        scores.update(zip(group, engine.score_fillers(MASK * length, group, **_fusion_option(fusion))))
    return scores


def evaluate_chid(engine, items: Sequence[ChidItem], workers: int = 4,
                  progress: Callable[[str], None] | None = None, fusion: bool | None = None) -> dict:
    """Accuracy of choosing the ChID candidate with the highest joint log-probability
    (``chid_acc``), and with the highest score minus its no-context score (``chid_acc_pmi``)."""
    priors: dict[str, float] = {}  # idioms recur across questions; threads may race, same value

    def choose(item: ChidItem):
        try:
            scores = engine.score_fillers(item.text, list(item.candidates), **_fusion_option(fusion))
            if len(scores) != len(item.candidates):
                return None, f"line {item.line}: {len(scores)} scores for {len(item.candidates)} candidates"
            missing = [c for c in dict.fromkeys(item.candidates) if c not in priors]
            if missing:
                priors.update(_no_context_scores(engine, missing, fusion))
        except ValueError as exc:
            return None, f"line {item.line}: {getattr(exc, 'code', 'error')}: {exc}"
        pmi = [s - priors[c] for s, c in zip(scores, item.candidates)]
        return (max(range(len(scores)), key=lambda i: scores[i]),
                max(range(len(pmi)), key=lambda i: pmi[i])), None

    started = time.monotonic()
    answers = _map(choose, items, workers)
    correct = correct_pmi = scored = 0
    skipped = []
    choices: list[int | None] = []
    for item, (choice, problem) in zip(items, answers):
        if choice is None:
            choices.append(None)
            skipped.append(problem)
            continue
        choices.append(choice[0])
        scored += 1
        correct += choice[0] == item.answer
        correct_pmi += choice[1] == item.answer
    chance = sum(1 / len(i.candidates) for i in items) / len(items) if items else None
    if progress:
        progress(f"chid: {scored} scored, {len(skipped)} skipped in {time.monotonic() - started:.1f} s")
    return {"chid_acc": correct / scored if scored else None,
            "chid_acc_pmi": correct_pmi / scored if scored else None, "n_chid": scored, "chid_chance": chance,
            "chid_skipped": len(skipped), "chid_skip_reasons": skipped[:5],
            "chid_seconds": round(time.monotonic() - started, 2), "_chid_choices": choices}


def evaluate_engine(engine, cloze: Sequence[ClozeItem], chid: Sequence[ChidItem], workers: int = 4,
                    progress: Callable[[str], None] | None = None, fusion: bool | None = None,
                    everyday: bool = True) -> dict:
    """Cloze, ChID and everyday figures of one engine (private per-item answers under ``_`` keys)."""
    result: dict = {}
    if cloze:
        result.update(evaluate_cloze(engine, cloze, workers=workers, progress=progress, fusion=fusion))
    if chid:
        result.update(evaluate_chid(engine, chid, workers=workers, progress=progress, fusion=fusion))
    if everyday:
        result.update(evaluate_everyday(engine, fusion=fusion))
    return result


def _fusion_option(fusion: bool | None) -> dict:
    """The keyword for engine calls: none for the engine's default (an engine without
    fusion, or a fake one, need not know the option)."""
    return {} if fusion is None else {"fusion": fusion}


def has_fusion(engine) -> bool:
    """Whether the engine's bundle has a word LM or a phrase memory to fuse."""
    return getattr(engine, "fusion", None) is not None


def agreement(first: Sequence, other: Sequence) -> float | None:
    """Share of items where both answered and gave the same answer."""
    pairs = [(a, b) for a, b in zip(first, other) if a is not None and b is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def describe(engine, path) -> dict:
    """Name, quantization and size of the bundle behind ``engine``."""
    info = engine.info() if hasattr(engine, "info") else {}
    quant = info.get("quantization")
    if isinstance(quant, dict):
        # e.g. {"method": "...quantize_dynamic", "weight_type": "QInt8", ...} → "int8"
        kind = str(quant.get("weight_type") or quant.get("type") or "").lower()
        quant = "int8" if "int8" in kind else (quant.get("type") or quant.get("method") or "quantized")
    files = info.get("files") or {}
    size = 0
    for entry in files.values():
        size += entry.get("size", 0) if isinstance(entry, dict) else getattr(entry, "size", 0)
    arch = info.get("architecture") or {}
    training = info.get("training") or {}
    shape = ("{num_layers}x{hidden_size}x{num_heads}x{intermediate_size}".format(**arch)
             if {"num_layers", "hidden_size", "num_heads", "intermediate_size"} <= arch.keys() else None)
    return {"bundle": str(path) if path else "(default bundle)", "name": info.get("name"),
            "quantization": quant or "fp32", "random_init": info.get("random_init"),
            "vocab_size": info.get("vocab_size"), "bundle_bytes": size or None, "shape": shape,
            # a model trained in several runs (--init-from) counts all of them
            "train_minutes": training.get("total_train_minutes", training.get("train_minutes")),
            "trained_by": "distillation" if training.get("teacher") else ("pretraining" if training else None)}


def public(result: dict) -> dict:
    """The result without per-item answers."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``evaluate``."""
    parser.add_argument("--bundle", type=Path, action="append", default=None,
                        help="bundle folder (repeat to compare; none: the embedded default bundle)")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another bundle (e.g. the FP32 one) measured on the same items")
    parser.add_argument("--chid", type=Path, default=DEFAULT_CHID, help="ChID JSON lines ('' to skip)")
    parser.add_argument("--cloze-text", type=Path, default=None,
                        help="passages, one a line (default: held-apart split of --data)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus for the default cloze passages")
    parser.add_argument("--test-fraction", type=float, default=0.02, help="held-apart share (as in pretrain)")
    parser.add_argument("--max-cloze", type=int, default=2000, help="cloze items (0: skip the cloze test)")
    parser.add_argument("--max-chid", type=int, default=None, help="ChID questions (default all; 0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed for passage order and masked positions")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: usable cores)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent queries (lets the engine batch)")
    parser.add_argument("--json", action="store_true",
                        help="print only the figures as JSON on stdout (one object; a list for several bundles)")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the per-query latency measurement (short queries, cache and batching off)")
    parser.add_argument("--name", action="append", default=[],
                        help="label for the bundles in the report, in order (default: manifest name)")
    parser.add_argument("--model-only", action="store_true",
                        help="measure only the model (fusion off) even when the bundle has an LM / memory")
    parser.add_argument("--report", type=Path, default=None, metavar="OUT_DIR",
                        help="write evaluation.md, evaluation.png and evaluation.json there")


def _load_items(args) -> tuple[list[ClozeItem], list[ChidItem], dict]:
    sources: dict = {}
    cloze: list[ClozeItem] = []
    if args.max_cloze != 0:
        if args.cloze_text:
            passages = read_passages(args.cloze_text)
            sources["cloze_text"] = str(args.cloze_text)
        else:
            from tools.train.wwm import held_apart_passages

            if not Path(args.data).exists():
                raise ToolError(f"{args.data}: corpus not found; give --cloze-text FILE")
            log.info("computing the held-apart passages of %s (test fraction %s)", args.data, args.test_fraction)
            passages = held_apart_passages(args.data, args.test_fraction)
            sources["cloze_text"] = f"held-apart split of {args.data} (fraction {args.test_fraction})"
        cloze = make_cloze_items(passages, args.max_cloze, args.seed)
        if not cloze:
            raise ToolError("no usable cloze passages (none has a CJK character)")
    chid: list[ChidItem] = []
    if args.max_chid != 0 and args.chid and str(args.chid) not in ("", "."):
        if Path(args.chid) == DEFAULT_CHID and not DEFAULT_CHID.is_file():
            log.warning("%s is not present: ChID skipped (give --chid FILE)", DEFAULT_CHID)
        else:
            chid = read_chid(args.chid, args.max_chid)
            sources["chid"] = str(args.chid)
    if not cloze and not chid:
        raise ToolError("nothing to evaluate: both the cloze test and ChID are off")
    sources["seed"] = args.seed
    return cloze, chid, sources


def _open_engine(path, threads):
    from edge.bundle import BundleError
    from edge.engine import Engine

    try:
        return Engine.from_bundle(path, threads=threads)
    except (BundleError, OSError, ValueError) as exc:
        raise ToolError(f"{path or 'default bundle'}: cannot load the bundle: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Evaluate each bundle on the same items; print / write the figures."""
    if args.json and not getattr(args, "debug", False):
        # stdout is then pure JSON (other tools parse it); warnings still show.
        logging.getLogger().setLevel(logging.WARNING)
    bundles = list(args.bundle or [None]) + list(args.compare)
    for path in bundles:
        if path is not None and not Path(path).is_dir():
            raise ToolError(f"{path}: bundle folder not found")
    cloze, chid, sources = _load_items(args)
    log.info("%d cloze items, %d ChID questions; %d bundle(s)", len(cloze), len(chid), len(bundles))
    results = []
    for path in bundles:
        engine = _open_engine(path, args.threads)
        rows = []
        try:
            # What ships first (fused, when the bundle can), then the model alone beside it.
            modes = [True, False] if has_fusion(engine) and not args.model_only else [None]
            if args.model_only and has_fusion(engine):
                modes = [False]
            for fused in modes:
                result = describe(engine, path)
                result["fusion"] = bool(fused)
                if len(modes) > 1:
                    result["name"] = f"{result.get('name')} ({'fused' if fused else 'model only'})"
                result.update(evaluate_engine(engine, cloze, chid, args.workers, fusion=fused,
                                              progress=lambda m, p=path: log.info("%s: %s", p, m)))
                rows.append(result)
        finally:
            engine.close()
        for result in rows:
            if not args.no_latency:
                from tools.benchmark.presets import time_bundle

                timing = time_bundle(path, args.threads, repeats=3, fusion=result["fusion"])
                result.update(latency_ms_median=timing["median_ms"], latency_ms_p90=timing["p90_ms"],
                              latency_threads=timing["threads"])
            if len(results) < len(args.name):
                result["name"] = args.name[len(results)]
            results.append(result)
            log.info("%s", json.dumps({k: v for k, v in public(result).items() if "reasons" not in k},
                                      ensure_ascii=False))
    for result in results[1:]:
        result["cloze_top1_agreement_with_first"] = agreement(results[0].get("_cloze_predictions", []),
                                                              result.get("_cloze_predictions", []))
        result["chid_agreement_with_first"] = agreement(results[0].get("_chid_choices", []),
                                                        result.get("_chid_choices", []))
    figures = [public(r) for r in results]
    if args.report:
        from tools.evaluation.report import write_report

        paths = write_report(figures, args.report, sources)
        log.info("report written: %s", ", ".join(str(p) for p in paths))
    if args.json:
        print(json.dumps(figures[0] if len(figures) == 1 else figures, ensure_ascii=False, indent=2))
    return 0
