"""``python -m tools unbundle``: turn a bundle back into a Hugging Face checkpoint folder.

A bundle holds every weight of the model: the FP32 one exactly, the INT8 one as
int8 values with their scales. This command reads them back into a
``BertForMaskedLM`` (vocabulary projection and all), so that training can go on from
a shipped model when its training checkpoint is gone (``tools pretrain --init-from``
takes the folder it writes, like any checkpoint).

How a weight is found: the same architecture, with random weights, is exported with
this toolchain's own exporter, and each ONNX initializer of that export is matched to
the parameter it holds by value (the exporter names most MatMul weights
``onnx::MatMul_NNN`` and stores them transposed). The bundle, made by the same
exporter from the same architecture, has the same names; an INT8 bundle stores
``NAME_quantized`` / ``NAME_scale`` / ``NAME_zero_point`` for them, which are
dequantized (per output channel for MatMul weights, per tensor for embedding tables,
per vocabulary row for the word embedding shared with the tied decoder).

An INT8 bundle gives the dequantized weights, not the FP32 ones it was quantized
from: the checkpoint agrees with the bundle, not bit for bit with the lost original.
The command measures that agreement (top-1 of the recovered model in PyTorch against
the bundle in ONNX Runtime at masked positions) and writes it into ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from edge.manifest import MODEL_FILE, TOKENIZER_FILE, Manifest, ManifestError
from tools import ToolError
from tools.bundle.checkpoint import TRAINING_FILE

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``unbundle``."""
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder (FP32 or INT8)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--check-rows", type=int, default=200,
                        help="masked positions on which the recovered model is compared with the bundle")


def config_of(manifest: Manifest, vocab_size: int):
    """The ``BertConfig`` a bundle's manifest describes."""
    from tools.train.model_init import make_config

    arch = manifest.architecture
    if arch.model_type != "bert":
        raise ToolError(f"manifest model_type {arch.model_type!r}: only BERT bundles can be unbundled")
    shape = f"{arch.num_layers}x{arch.hidden_size}x{arch.num_heads}x{arch.intermediate_size}"
    return make_config(shape, vocab_size, arch.max_position_embeddings, 0.0, manifest.special_ids["[PAD]"])


def initializer_sources(config, last_layer_at_masks: bool = True) -> dict[str, tuple[str, bool]]:
    """Map each initializer name of this toolchain's export of a ``config`` model to
    (parameter name, stored transposed?), matching values exactly: the probe model's
    every parameter (LayerNorms and biases too) is filled with distinct random values
    so that no two can be confused. ``last_layer_at_masks``: which of the two export
    graphs (see :mod:`tools.bundle.masked_lm`); their initializer names differ."""
    import copy

    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForMaskedLM

    from tools.bundle.export_onnx import export_onnx

    torch.manual_seed(0)
    # Eager attention, as tools.bundle.checkpoint loads models for export.
    probe = AutoModelForMaskedLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    with torch.no_grad():
        for param in probe.parameters():
            param.normal_()
    params = {name: p.detach().numpy() for name, p in probe.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(probe, Path(tmp) / "probe.onnx", last_layer_at_masks=last_layer_at_masks)
        graph = onnx.load(str(path)).graph
    by_shape: dict[tuple, list[str]] = {}
    for name, value in params.items():
        by_shape.setdefault(value.shape, []).append(name)
    sources: dict[str, tuple[str, bool]] = {}
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype != np.float32 or value.ndim == 0:
            continue
        candidates = [(n, False) for n in by_shape.get(value.shape, [])]
        if value.ndim == 2:
            candidates += [(n, True) for n in by_shape.get(value.shape[::-1], [])]
        for name, transposed in candidates:
            if np.array_equal(params[name].T if transposed else params[name], value):
                sources[init.name] = (name, transposed)
                break
    return sources


def dequantized(inits: dict, name: str) -> np.ndarray | None:
    """The float value of initializer ``name`` in a bundle: as stored, or dequantized
    from ``name_quantized`` with its scale and zero point (per tensor, or per channel
    on the last axis as onnxruntime's per-channel MatMul weights are). None if absent."""
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name]).astype(np.float32)
    q_name = f"{name}_quantized"
    if q_name not in inits:
        return None
    q = numpy_helper.to_array(inits[q_name]).astype(np.float32)
    scale = numpy_helper.to_array(inits[f"{name}_scale"]).astype(np.float32)
    zero = numpy_helper.to_array(inits[f"{name}_zero_point"]).astype(np.float32)
    if scale.ndim == 0:
        return (q - zero) * scale
    if scale.shape != (q.shape[-1],):
        raise ToolError(f"{name}: scale of shape {scale.shape} does not fit weight {q.shape}")
    return (q - zero[None, :]) * scale[None, :]


def recover_state_dict(model, bundle_model) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Every parameter of ``model`` read from the bundle's ONNX graph, made by either
    export graph (the current one first, then the one of older bundles); raises
    ToolError naming what is missing. Returns (state dict, counts by how read)."""
    try:
        return _recover_state_dict(model, bundle_model, last_layer_at_masks=True)
    except ToolError:
        return _recover_state_dict(model, bundle_model, last_layer_at_masks=False)


def _recover_state_dict(model, bundle_model, last_layer_at_masks: bool) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """:func:`recover_state_dict` for one of the two export graphs."""
    inits = {i.name: i for i in bundle_model.graph.initializer}
    # The exporter stores equal initializers once (the all-ones LayerNorm weights of a
    # freshly initialised model, say) and names the others as Identity outputs of it.
    alias = {node.output[0]: node.input[0] for node in bundle_model.graph.node if node.op_type == "Identity"}
    sources = initializer_sources(model.config, last_layer_at_masks)
    state: dict[str, np.ndarray] = {}
    counts = {"float": 0, "dequantized": 0}
    for init_name, (param, transposed) in sources.items():
        while init_name not in inits and f"{init_name}_quantized" not in inits and init_name in alias:
            init_name = alias[init_name]
        value = dequantized(inits, init_name)
        if value is None:
            continue
        counts["float" if init_name in inits else "dequantized"] += 1
        state[param] = value.T if transposed else value
    word = "bert.embeddings.word_embeddings.weight"
    decoder = "cls.predictions.decoder.weight"
    # Tied head: the INT8 bundle keeps the table once, as the decoder's weight.
    if word not in state and decoder in state:
        state[word] = state[decoder]
    if decoder not in state and word in state:
        state[decoder] = state[word]
    if "cls.predictions.decoder.bias" not in state and "cls.predictions.bias" in state:
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    expected = set(model.state_dict())
    # Buffers (position ids, token type ids) are not weights; the model makes them.
    missing = sorted(k for k in expected - set(state) if not k.endswith(("position_ids", "token_type_ids")))
    if missing:
        raise ToolError(f"the bundle's model.onnx lacks {len(missing)} weights (e.g. {missing[:3]}); "
                        "was it made by this toolchain from a BERT masked-LM?")
    return state, counts


def vocab_tokens(tokenizer_file: Path) -> list[str]:
    """The bundle tokenizer's vocabulary, in id order."""
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        raise ToolError(f"{tokenizer_file}: no WordPiece vocabulary in model.vocab")
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ToolError(f"{tokenizer_file}: vocabulary ids are not 0..{len(tokens) - 1}")
    return tokens


def agreement(model, bundle_dir: Path, tokens: list[str], special_ids: dict[str, int], rows: int,
              seed: int = 0) -> dict:
    """Top-1 agreement of the recovered model (PyTorch) with the bundle (ONNX Runtime)
    at masked positions of seeded random sequences of ordinary tokens."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    ordinary = np.array([i for i, t in enumerate(tokens) if not (t.startswith("[") and t.endswith("]"))])
    seq = min(24, model.config.max_position_embeddings)
    batch = max(1, rows // 2)
    ids = rng.choice(ordinary, size=(batch, seq))
    ids[:, 0], ids[:, -1] = special_ids["[CLS]"], special_ids["[SEP]"]
    positions = np.stack([rng.choice(np.arange(1, seq - 1), size=2, replace=False) for _ in range(batch)])
    ids[np.arange(batch)[:, None], positions] = special_ids["[MASK]"]
    attn = np.ones_like(ids)
    session = ort.InferenceSession(str(bundle_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": attn.astype(np.int64),
                                     "mask_positions": positions.astype(np.int64)})[0]
    with torch.no_grad():
        hidden = model.bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn)).last_hidden_state
        picked = hidden[torch.arange(batch)[:, None], torch.from_numpy(positions)]
        torch_logits = model.cls(picked).numpy()
    top1 = float((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).mean())
    return {"masked_positions": int(positions.size), "top1_agreement": round(top1, 4),
            "max_abs_logit_diff": round(float(np.abs(onnx_logits - torch_logits).max()), 4)}


def unbundle(bundle_dir: Path, out: Path, check_rows: int = 200) -> dict:
    """Write ``out`` (an HF checkpoint folder) from the bundle in ``bundle_dir``;
    return what was recorded in its training.json under ``unbundled``."""
    import onnx
    import torch
    from transformers import BertForMaskedLM

    from tools.train import wwm

    try:
        manifest = Manifest.load(bundle_dir)
    except ManifestError as exc:
        raise ToolError(str(exc)) from exc
    model_file, tokenizer_file = bundle_dir / MODEL_FILE, bundle_dir / TOKENIZER_FILE
    for path in (model_file, tokenizer_file):
        if not path.is_file():
            raise ToolError(f"{path}: missing from the bundle")
    tokens = vocab_tokens(tokenizer_file)
    if len(tokens) != manifest.vocab_size:
        raise ToolError(f"{tokenizer_file}: {len(tokens)} tokens, the manifest says {manifest.vocab_size}")
    torch.manual_seed(0)
    model = BertForMaskedLM(config_of(manifest, len(tokens))).eval()
    try:
        bundle_model = onnx.load(str(model_file))
    except Exception as exc:  # onnx raises DecodeError and others for a broken file
        raise ToolError(f"{model_file}: not a readable ONNX model ({exc})") from exc
    packed = {n.op_type for n in bundle_model.graph.node} & {"MatMulNBits", "GatherBlockQuantized"}
    if packed:
        # 4-bit blocks are packed two to a byte in ONNX Runtime's own layout; reading
        # them back is not supported (and would give a 4-bit model to train on).
        raise ToolError(f"{model_file}: an int4 bundle ({', '.join(sorted(packed))}); unbundle an FP32 or "
                        "INT8 bundle of the model instead")
    log.info("reading %s (%s)", model_file, "INT8" if manifest.quantization else "FP32")
    state, counts = recover_state_dict(model, bundle_model)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    check = agreement(model, bundle_dir, tokens, manifest.special_ids, check_rows)
    log.info("recovered %d float and %d dequantized tensors; recovered model vs bundle: top-1 agreement %.1f%% "
             "on %d masked positions, max |logit diff| %.3g", counts["float"], counts["dequantized"],
             100 * check["top1_agreement"], check["masked_positions"], check["max_abs_logit_diff"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    wwm.write_vocab(tokens, out / "vocab.txt")
    wwm.make_tokenizer(out / "vocab.txt").save_pretrained(out)  # as tools pretrain saves it
    record = dict(manifest.training or {})
    unbundled = {"bundle": str(bundle_dir), "bundle_name": manifest.name,
                 "model_sha256": manifest.files[MODEL_FILE].sha256 if MODEL_FILE in manifest.files else None,
                 "quantized": bool(manifest.quantization), "tensors": counts, "check": check}
    record["unbundled"] = unbundled
    (out / TRAINING_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    log.info("wrote %s", out)
    return unbundled


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m tools unbundle``."""
    unbundle(args.bundle, args.out, args.check_rows)
    return 0
