"""``python -m tools build``: Hugging Face checkpoint → verified quantized bundle.

Steps (each logged with its timing): load the checkpoint (or build it with random
weights) → trim the vocabulary → export FP32 ONNX (logits only at masked
positions) → (opt-in) fuse the graph → check FP32 parity with PyTorch (the bundle is
not written when it fails) → quantize (dynamic INT8 by default, static INT8
or int4 by ``--quantization``) → compare with FP32 on held-apart text → write
``model.onnx`` + ``tokenizer.json`` + ``manifest.json`` → reload the staged
bundle with ONNX Runtime alone and check it before it is renamed into place.
``build_bundle`` runs these steps in order, one function each; the manifest's
provenance fields come from :mod:`tools.bundle.provenance`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tools import ToolError

log = logging.getLogger(__name__)

# Only 8,441 of bert-base-chinese's tokens occur at all in the 10.9 M-CJK-character
# training split of ../shared/data. 8,000 keeps every CJK character of it that the
# original vocabulary has, 99.240% of held-apart CJK characters (99.244% untrimmed),
# and puts bert-base INT8 at 93.0 MB (88.7 MiB); 10,000 adds 1.5 MB for +0.004 points.
DEFAULT_VOCAB = 8000
# Measured on this 2-core AMD EPYC (1 thread, bert-base, 8,000 tokens, median of 30
# interleaved runs): the fused graph (Attention → QAttention, SkipLayerNorm, BiasGelu)
# is no faster than the plain export, which ONNX Runtime fuses itself at session start:
# INT8 27.0 vs 28.2 ms at 32 tokens and 92.3 vs 104.8 ms at 128; FP32 77.2 vs 77.1 and
# 278 vs 283 ms. So the offline optimizer is opt-in (--optimize).
OPTIMIZE_OFF_REASON = ("off by default: the fused graph measured no faster (INT8 slower: 104.8 vs 92.3 ms "
                       "at 128 tokens) than ONNX Runtime's own session-time fusions")


@contextlib.contextmanager
def step(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Log the start and duration of one build step and record its timing."""
    log.info("== %s ...", name)
    start = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - start, 2)
    log.info("== %s done in %.1f s", name, timings[name])


def parameter_bytes(model) -> int:
    """FP32 bytes of a model's parameters, tied tensors counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 4
    return total


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise ToolError(f"{out}: exists and is not a bundle folder; refusing to overwrite it")


def tokenizer_json(tokenizer) -> str:
    """The bundle's tokenizer.json text: the (trimmed) backend tokenizer with padding
    and truncation off (the engine pads to its own buckets)."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["padding"] = None
    data["truncation"] = None
    return json.dumps(data, ensure_ascii=False, indent=None)


def write_bundle(folder: Path, model_file: Path, tok_json: str, manifest, check=None) -> None:
    """Write a bundle folder atomically: staged beside it, ``check(staged_folder)`` run
    on the staged copy (it raises to stop), then renamed into place."""
    from edge.manifest import MODEL_FILE, TOKENIZER_FILE

    _prepare_out(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the service user must read it
    try:
        shutil.copyfile(model_file, staging / MODEL_FILE)
        (staging / TOKENIZER_FILE).write_text(tok_json, encoding="utf-8")
        manifest.record_files(staging)
        manifest.save(staging)
        if check is not None:
            check(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def check_fp32_parity(ckpt, fp32: Path, special: dict[str, int], seed: int):
    """The FP32 export's ONNX Runtime session and its parity with PyTorch; ToolError
    (nothing written) when they differ beyond the tolerance."""
    from tools.bundle.verify import check_parity, ort_session

    session = ort_session(fp32)
    parity = check_parity(ckpt.model, session, special, seed=seed)
    log.info("FP32 parity: max|diff| %.3g (tolerance %.3g, logit scale %.3g), top-1 agreement %.4f",
             parity.max_abs_diff, parity.tolerance, parity.logit_scale, parity.top1_agreement)
    if not parity.passed:
        raise ToolError(f"FP32 ONNX export does not match PyTorch (max|diff| {parity.max_abs_diff:.3g} > "
                        f"{parity.tolerance:.3g}); bundle not written")
    return session, parity


def compare_with_fp32(ckpt, stats, special: dict[str, int], fp32_session, quantized: Path, label: str,
                      samples: int, seed: int) -> dict[str, Any]:
    """Top-1 agreement / top-5 overlap of the quantized model with FP32 on masked
    characters of held-apart corpus lines (seeded random inputs without a corpus)."""
    from tools.bundle.verify import ClozeBatch, cloze_batches, compare_models, ort_session, seeded_inputs, session_fn

    config = ckpt.model.config
    texts = stats.test_texts if stats else []
    batches = cloze_batches(ckpt.tokenizer, texts, special, n_samples=samples, seed=seed,
                            max_length=min(64, config.max_position_embeddings)) if texts else []
    inputs = "masked CJK characters in held-apart corpus lines (test split)"
    if not batches:
        inputs = "seeded random token sequences (no corpus given)"
        batches = [ClozeBatch(*seeded_inputs(config.vocab_size, special, 4, 24, 2, seed + 100 + k),
                              answers=np.full((4, 2), -1, dtype=np.int64)) for k in range(8)]
    agreement = compare_models(session_fn(fp32_session), session_fn(ort_session(quantized)), batches)
    agreement["inputs"] = inputs
    log.info("%s vs FP32 over %d masked positions: top-1 agreement %.4f, top-5 overlap %.4f",
             label, agreement["masked_positions"], agreement["top1_agreement"], agreement["top5_overlap"])
    if ckpt.random_init:
        log.info("(random weights: agreement says nothing about accuracy)")
    return agreement


def build_bundle(source: str, out: str | Path, vocab_size: int | None = None, corpus: str | Path | None = None,
                 random_init: bool = False, seed: int = 0, revision: str | None = None, name: str | None = None,
                 keep_fp32: bool = False, optimize: bool = False, samples: int = 200, notes: str = "",
                 use_cache: bool = True, quantization: str = "dynamic",
                 calibration: str = "minmax") -> dict[str, Any]:
    """Run the whole pipeline and write the bundle to ``out``; return the manifest dict.

    Raises ToolError (nothing written) on a bad checkpoint/corpus/option, or when the
    FP32 export does not match PyTorch.
    """
    from edge.manifest import Manifest
    from tools.bundle.provenance import manifest_fields

    out = Path(out)
    _check_options(out, quantization, keep_fp32, corpus)
    timings: dict[str, float] = {}
    sizes: dict[str, int] = {}
    started = time.monotonic()
    ckpt = _load_source(source, random_init, seed, revision, timings, sizes)
    stats = _count_corpus(corpus, use_cache, timings)
    plan, special = _trim_vocabulary(ckpt, vocab_size, stats, timings, sizes)

    with tempfile.TemporaryDirectory(prefix="edge-build-") as tmp:
        work = Path(tmp)
        fp32, optimization = _export_fp32(ckpt, work, optimize, timings, sizes)
        with step("check FP32 parity with PyTorch", timings):
            fp32_session, parity = check_fp32_parity(ckpt, fp32, special, seed)
        quantized, quant, label = _quantize(ckpt, quantization, calibration, fp32, work, stats, special, seed,
                                            timings, sizes)
        with step(f"compare {label} with FP32", timings):
            agreement = compare_with_fp32(ckpt, stats, special, fp32_session, quantized, label, samples, seed)

        tok_json = tokenizer_json(ckpt.tokenizer)
        sizes["tokenizer_json"] = len(tok_json.encode("utf-8"))
        evaluation = {
            "fp32_parity": parity.as_dict(),
            "quantized_vs_fp32": agreement,
            "sizes_bytes": dict(sizes),
            "graph_optimization": optimization,
            "build_seconds": {},
        }
        base_name = name or f"{Path(ckpt.source.rstrip('/')).name}-v{ckpt.model.config.vocab_size}"
        manifest_common = manifest_fields(ckpt, source, special, plan, notes)
        with step("write and reload bundle", timings):
            evaluation["build_seconds"] = dict(timings, total=round(time.monotonic() - started, 2))
            manifest_common["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            check = _reload_check(ckpt, stats, samples)
            manifest = Manifest(name=f"{base_name}-{label}", quantization=quant, evaluation=evaluation,
                                **manifest_common)
            write_bundle(out, quantized, tok_json, manifest, check=check)
            log.info("bundle written to %s (model.onnx %.1f MB)", out, sizes["quantized_onnx"] / 1e6)
            if keep_fp32:
                _write_fp32_twin(out, fp32, tok_json, f"{base_name}-fp32", evaluation, manifest_common, check)
    log.info("built %s in %.1f s: %.1f MB, vocab %d, coverage %s", out, time.monotonic() - started,
             sizes["quantized_onnx"] / 1e6, ckpt.model.config.vocab_size,
             "n/a" if plan.coverage is None else f"{100 * plan.coverage:.3f}%")
    return manifest.to_dict()


def _check_options(out: Path, quantization: str, keep_fp32: bool, corpus: str | Path | None) -> None:
    """Refuse, before any work, an output folder that is not a bundle (nor, with
    ``keep_fp32``, its ``-fp32`` twin), an unknown quantization or a missing corpus."""
    from tools.bundle.quantize import QUANTIZATION_METHODS

    _prepare_out(out)
    if quantization not in QUANTIZATION_METHODS:
        raise ToolError(f"unknown quantization {quantization!r} (choose from {', '.join(QUANTIZATION_METHODS)})")
    if keep_fp32:
        _prepare_out(out.parent / f"{out.name}-fp32")
    if corpus is not None and not Path(corpus).exists():
        raise ToolError(f"{corpus}: corpus path does not exist")


def _load_source(source: str, random_init: bool, seed: int, revision: str | None, timings: dict[str, float],
                 sizes: dict[str, int]):
    """Step "load checkpoint": the source checkpoint (or its shape with random weights),
    with its parameter and tokenizer sizes recorded in ``sizes``."""
    from tools.bundle.checkpoint import load_checkpoint

    with step("load checkpoint", timings):
        ckpt = load_checkpoint(source, random_init=random_init, seed=seed, revision=revision)
        config = ckpt.model.config
        sizes["source_fp32_parameters"] = parameter_bytes(ckpt.model)
        sizes["source_tokenizer_json"] = len(tokenizer_json(ckpt.tokenizer).encode("utf-8"))
        log.info("%s: %d layers, hidden %d, vocab %d, %.1f MB of FP32 parameters", ckpt.source,
                 config.num_hidden_layers, config.hidden_size, config.vocab_size,
                 sizes["source_fp32_parameters"] / 1e6)
    return ckpt


def _count_corpus(corpus: str | Path | None, use_cache: bool, timings: dict[str, float]):
    """Step "count corpus": the corpus's counts and held-apart texts (None without a corpus)."""
    from tools.bundle.corpus_counts import corpus_stats

    if corpus is None:
        return None
    with step("count corpus", timings):
        stats = corpus_stats(corpus, use_cache=use_cache)
    return stats


def _trim_vocabulary(ckpt, vocab_size: int | None, stats, timings: dict[str, float], sizes: dict[str, int]):
    """Step "trim vocabulary": plan the trim, apply it to ``ckpt`` in place; return the
    plan and the trimmed special-token ids."""
    from tools.bundle.trim_vocab import log_plan, plan_trim, trim_checkpoint

    with step("trim vocabulary", timings):
        plan = plan_trim(ckpt.vocab, vocab_size, stats, ckpt.tokenizer)
        log_plan(plan)
        trim_checkpoint(ckpt, plan)
        sizes["trimmed_fp32_parameters"] = parameter_bytes(ckpt.model)
        special = ckpt.special_ids()
    return plan, special


def _export_fp32(ckpt, work: Path, optimize: bool, timings: dict[str, float],
                 sizes: dict[str, int]) -> tuple[Path, dict[str, Any]]:
    """Steps "export FP32 ONNX" and (with ``optimize``) "optimize graph": the FP32 model
    file in ``work`` and the manifest's record of the graph optimization."""
    from tools.bundle.export_onnx import export_onnx
    from tools.bundle.quantize import optimize_model

    with step("export FP32 ONNX", timings):
        fp32 = export_onnx(ckpt.model, work / "fp32.onnx")
        sizes["fp32_onnx"] = fp32.stat().st_size
    optimization: dict[str, Any] = {"applied": False, "reason": OPTIMIZE_OFF_REASON}
    if optimize:
        with step("optimize graph", timings):
            optimization = optimize_model(fp32, work / "fp32_opt.onnx", ckpt.model.config)
            if optimization["applied"]:
                fp32 = work / "fp32_opt.onnx"
                sizes["fp32_optimized_onnx"] = fp32.stat().st_size
    return fp32, optimization


def _quantize(ckpt, quantization: str, calibration: str, fp32: Path, work: Path, stats, special: dict[str, int],
              seed: int, timings: dict[str, float], sizes: dict[str, int]) -> tuple[Path, Any, str]:
    """Step "quantize": the quantized model file in ``work``, the manifest's record of
    the quantization, and the method's short name (``int8``, ``int8-static``, ...)."""
    from tools.bundle.quantize import QUANTIZED_NAME, quantize

    config = ckpt.model.config
    label = QUANTIZED_NAME[quantization]
    with step(f"quantize ({quantization})", timings):
        quantized = work / f"{label}.onnx"
        quant = quantize(quantization, fp32, quantized, tokenizer=ckpt.tokenizer, stats=stats,
                         special_ids=special, vocab_size=config.vocab_size,
                         max_length=min(64, config.max_position_embeddings), seed=seed,
                         calibration=calibration)
        sizes["quantized_onnx"] = quantized.stat().st_size
    return quantized, quant, label


def _reload_check(ckpt, stats, samples: int):
    """The check ``write_bundle`` runs on a staged bundle: its files read back with ONNX
    Runtime + tokenizers alone (hashes, vocabulary, special ids, logits against PyTorch;
    parity for FP32). It raises to stop the bundle being renamed into place."""
    from tools.bundle.verify import verify_bundle

    def check(folder: Path) -> None:
        report = verify_bundle(folder, ckpt, stats.test_texts if stats else None, samples=min(samples, 24))
        log.info("reloaded %s: files ok, vs PyTorch top-1 agreement %.4f", folder.name,
                 report["vs_pytorch"].get("top1_agreement", float("nan")))

    return check


def _write_fp32_twin(out: Path, fp32: Path, tok_json: str, name: str, evaluation: dict[str, Any],
                     manifest_common: dict[str, Any], check) -> None:
    """Write the FP32 bundle at ``OUT-fp32``: the same manifest fields, no quantization
    and no quantized-vs-FP32 figures."""
    from edge.manifest import Manifest

    fp32_out = out.parent / f"{out.name}-fp32"
    fp32_eval = {k: v for k, v in evaluation.items() if k != "quantized_vs_fp32"}
    write_bundle(fp32_out, fp32, tok_json, Manifest(name=name, quantization=None, evaluation=fp32_eval,
                                                    **manifest_common), check=check)
    log.info("FP32 bundle written to %s", fp32_out)


def add_arguments(parser) -> None:
    """Options of ``python -m tools build``."""
    from tools.bundle.checkpoint import add_source_arguments
    from tools.bundle.corpus_counts import default_corpus

    add_source_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB,
                        help="target vocabulary size (0: structural trim only)")
    parser.add_argument("--corpus", type=Path, default=default_corpus(),
                        help="corpus file/folder (.json/.txt) for token frequencies and evaluation")
    parser.add_argument("--name", default=None, help="bundle name in the manifest")
    parser.add_argument("--keep-fp32", action="store_true", help="also write an FP32 bundle at OUT-fp32")
    parser.add_argument("--optimize", action="store_true",
                        help="apply onnxruntime.transformers BERT fusions before quantizing (measured: no gain)")
    parser.add_argument("--quantization", choices=("dynamic", "static", "int4"), default="dynamic",
                        help="dynamic INT8 (default: fastest here), static INT8 (scales calibrated on the "
                             "corpus's training split: a row's scores never depend on its batch mates) or "
                             "int4 weight-only (smallest)")
    parser.add_argument("--calibration", choices=("minmax", "percentile"), default="minmax",
                        help="how static INT8 sets activation ranges from the calibration text")
    parser.add_argument("--samples", type=int, default=200, help="masked test lines for quantized vs FP32")
    parser.add_argument("--no-cache", action="store_true", help="recount the corpus (ignore cached counts)")
    knowledge = parser.add_argument_group("answer-time knowledge (see tools lm / tools memory / tools fusion)")
    knowledge.add_argument("--lm", type=Path, default=None, metavar="ARPA",
                           help="word n-gram LM (ARPA, plain or .tar.xz) to convert into the bundle (lm.bin); "
                                "its LICENSE*/README* beside it ship too")
    knowledge.add_argument("--lm-license-id", default="", help="SPDX id of the LM's license, for the manifest")
    knowledge.add_argument("--memory", type=Path, default=None, metavar="CORPUS",
                           help="corpus folder whose training split becomes the phrase memory (memory.bin)")
    knowledge.add_argument("--memory-license-id", default="", help="SPDX id of the corpus's license")
    knowledge.add_argument("--idioms", type=Path, default=None, metavar="CORPUS",
                           help="corpus folder whose training split gives the characters around each of the "
                                "LM's idioms (idioms.bin; needs --lm)")
    knowledge.add_argument("--no-fit", action="store_true",
                           help="keep the default fusion weights (otherwise fitted on the development data)")


def add_knowledge(out: Path, lm: Path | None, memory: Path | None, lm_license_id: str = "",
                  memory_license_id: str = "", fit: bool = True, random_init: bool = False,
                  idioms: Path | None = None) -> None:
    """Give a built bundle its word LM, phrase memory and idiom contexts, then fit the
    fusion weights (not for random weights: a fit on them would mean nothing; the
    defaults stay)."""
    from tools.knowledge.fusion import SHARED, fit_bundle
    from tools.knowledge.idioms import add_idioms_to_bundle
    from tools.knowledge.lm import add_lm_to_bundle
    from tools.knowledge.memory import add_memory_to_bundle

    for path, what in ((lm, "LM"), (memory, "memory corpus"), (idioms, "idioms corpus")):
        if path is not None and not Path(path).exists():
            raise ToolError(f"{path}: {what} not found")
    if idioms is not None and lm is None:
        raise ToolError("--idioms needs --lm: the idioms are the word LM's four-character words")
    if lm is not None:
        add_lm_to_bundle(out, lm, license_id=lm_license_id)
    if memory is not None:
        add_memory_to_bundle(out, memory, license_id=memory_license_id)
    if idioms is not None:
        add_idioms_to_bundle(out, idioms)
    if lm is None and memory is None:
        return
    if random_init or not fit:
        log.info("fusion weights: the defaults (%s)", "random weights" if random_init else "--no-fit")
        return
    if not (SHARED / "data").is_dir():
        log.warning("%s is not present: the fusion weights stay the defaults (fit later with tools fusion fit)",
                    SHARED / "data")
        return
    fit_bundle(out, SHARED / "data", SHARED / "data" / "fewclue" / "chid" / "dev_few_all.json")


def run(args) -> int:
    """Build one bundle from the command line."""
    for path, what in ((args.lm, "LM"), (args.memory, "memory corpus"), (args.idioms, "idioms corpus")):
        if path is not None and not Path(path).exists():
            raise ToolError(f"{path}: {what} not found")
    if args.idioms is not None and args.lm is None:
        raise ToolError("--idioms needs --lm: the idioms are the word LM's four-character words")
    build_bundle(
        source=args.source, out=args.out, vocab_size=args.vocab or None, corpus=args.corpus,
        random_init=args.random_init, seed=args.seed, revision=args.revision, name=args.name,
        keep_fp32=args.keep_fp32, optimize=args.optimize, samples=args.samples,
        use_cache=not args.no_cache, quantization=args.quantization, calibration=args.calibration,
    )
    add_knowledge(args.out, args.lm, args.memory, args.lm_license_id, args.memory_license_id,
                  fit=not args.no_fit, random_init=args.random_init, idioms=args.idioms)
    return 0
