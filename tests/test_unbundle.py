"""``tools unbundle``: a bundle read back into a checkpoint (offline, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CHECKPOINT = ROOT / "tests" / "fixtures" / "tiny_checkpoint"
# Weights that do not depend on the (trimmed) vocabulary: compared with the source.
LAYER_WEIGHTS = ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight",
                 "bert.encoder.layer.1.intermediate.dense.weight", "cls.predictions.transform.dense.weight")


def _unbundle(bundle: Path, out: Path) -> int:
    from tools.__main__ import main

    return main(["unbundle", "--bundle", str(bundle), "--out", str(out), "--check-rows", "40"])


def _weights(folder: Path):
    """(model, its state dict as numpy arrays) of a checkpoint folder."""
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(folder)
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


def _recovered(bundle: Path, out: Path):
    """Unbundle ``bundle`` into ``out``: (model, state, its training.json 'unbundled')."""
    assert _unbundle(bundle, out) == 0
    model, state = _weights(out)
    return model, state, json.loads((out / "training.json").read_text(encoding="utf-8"))["unbundled"]


def test_fp32_bundle_gives_back_the_exact_weights_and_logits(tiny_fp32_bundle_dir, tmp_path):
    recovered, state, record = _recovered(tiny_fp32_bundle_dir, tmp_path / "ckpt")
    _, source = _weights(TINY_CHECKPOINT)
    for name in LAYER_WEIGHTS:
        np.testing.assert_array_equal(state[name], source[name], err_msg=name)
    manifest = json.loads((tiny_fp32_bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    assert recovered.config.vocab_size == manifest["vocab_size"]
    assert recovered.config.num_hidden_layers == manifest["architecture"]["num_layers"]
    assert record["quantized"] is False and record["tensors"]["dequantized"] == 0
    # PyTorch on the recovered weights computes what ONNX Runtime computes on the bundle.
    assert record["check"]["top1_agreement"] == 1.0 and record["check"]["max_abs_logit_diff"] < 1e-4


def test_int8_bundle_gives_weights_within_one_quantization_step(tiny_bundle_dir, tmp_path):
    out = tmp_path / "ckpt"
    _, state, record = _recovered(tiny_bundle_dir, out)
    _, source = _weights(TINY_CHECKPOINT)
    for name in LAYER_WEIGHTS:
        # Symmetric per-channel INT8: each value is within half a step (max|w|/127) of it.
        step = np.abs(source[name]).max() / 127
        diff = np.abs(state[name] - source[name]).max()
        assert 0 < diff <= step, (name, diff, step)
    # Tied head: the decoder is the word-embedding table (stored once in the INT8 bundle).
    assert np.array_equal(state["cls.predictions.decoder.weight"], state["bert.embeddings.word_embeddings.weight"])
    assert record["quantized"] is True and record["tensors"]["dequantized"] > 0
    assert record["check"]["top1_agreement"] >= 0.8
    # The folder loads as a checkpoint the toolchain trains on, with the bundle's vocabulary.
    from tools.train import wwm

    tokens = wwm.read_vocab(out / "vocab.txt")
    bundle_vocab = json.loads((tiny_bundle_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert tokens == sorted(bundle_vocab, key=bundle_vocab.get)


def test_bad_bundles_are_refused_with_the_file_named(tiny_bundle_dir, tmp_path, capsys):
    assert _unbundle(tmp_path / "nowhere", tmp_path / "out") == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle_dir, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    assert _unbundle(broken, tmp_path / "out2") == 2
    err = capsys.readouterr().err
    assert str(broken / "model.onnx") in err and "not a readable ONNX model" in err
    assert not (tmp_path / "out2").exists()


def test_bundle_of_the_current_export_graph_gives_back_the_exact_weights(tmp_path):
    """The committed fixtures predate the last layer running only at the masked rows
    (their initializers are named after the older graph); a bundle built now has the
    newer graph, and both read back."""
    pytest.importorskip("torch")
    from tools.bundle.build import build_bundle

    build_bundle(str(TINY_CHECKPOINT), tmp_path / "fresh", vocab_size=None, corpus=None, keep_fp32=True, samples=8)
    _, state, record = _recovered(tmp_path / "fresh-fp32", tmp_path / "ckpt")
    _, source = _weights(TINY_CHECKPOINT)
    last = "bert.encoder.layer.1.attention.self.query.weight"  # the split last layer's query
    for name in LAYER_WEIGHTS + (last,):
        np.testing.assert_array_equal(state[name], source[name], err_msg=name)
    assert record["check"]["top1_agreement"] == 1.0 and record["check"]["max_abs_logit_diff"] < 1e-4
