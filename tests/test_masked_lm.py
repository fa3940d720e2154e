"""The exported graph's wrapper: MLM head, and for BERT-shaped encoders the last layer,
only at the masked rows. It must give the plain model's logits at those rows, padding
and several blanks per row included, in PyTorch and in the exported ONNX."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from make_tiny_checkpoint import make_checkpoint  # noqa: E402

from edge.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, MASK_POSITIONS  # noqa: E402
from tools.bundle.checkpoint import load_checkpoint  # noqa: E402
from tools.bundle.export_onnx import export_onnx  # noqa: E402
from tools.bundle.masked_lm import MaskedPositionsLM  # noqa: E402
from tools.bundle.verify import seeded_inputs  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny BertForMaskedLM checkpoint the toolchain tests use."""
    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    return load_checkpoint(str(folder))


def _plain_logits(model, ids, mask, positions) -> np.ndarray:
    """The unwrapped model's logits at ``positions`` (every layer over every row)."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    token_type_ids=torch.zeros_like(torch.as_tensor(ids))).logits.numpy()
    return np.take_along_axis(out, positions[:, :, None], axis=1)


def _inputs(ckpt, batch=3, seq=14, n_masks=2, seed=5):
    return seeded_inputs(ckpt.model.config.vocab_size, ckpt.special_ids(), batch, seq, n_masks, seed)


def test_last_layer_at_masks_equals_the_plain_model(tiny):
    ids, mask, positions = _inputs(tiny)
    assert (mask == 0).any(), "the inputs should have padded rows"
    wrapper = MaskedPositionsLM(tiny.model).eval()
    assert wrapper.last_layer_at_masks
    with torch.no_grad():
        got = wrapper(torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(positions)).numpy()
    ref = _plain_logits(tiny.model, ids, mask, positions)
    assert got.shape == ref.shape == (3, 2, tiny.model.config.vocab_size)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # and the same as the wrapper that runs the last layer over every row
    whole = MaskedPositionsLM(tiny.model, last_layer_at_masks=False).eval()
    assert not whole.last_layer_at_masks
    with torch.no_grad():
        again = whole(torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(positions)).numpy()
    np.testing.assert_allclose(got, again, rtol=0, atol=1e-5)


def test_encoder_not_shaped_like_bert_runs_whole():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32,
                                     position_embedding_type="relative_key")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    wrapper = MaskedPositionsLM(model).eval()
    assert not wrapper.last_layer_at_masks  # relative position scores: not reproduced, so not split
    ids = torch.randint(5, 50, (2, 10))
    mask = torch.ones_like(ids)
    positions = torch.tensor([[1, 4], [2, 7]])
    with torch.no_grad():
        got = wrapper(ids, mask, positions).numpy()
    np.testing.assert_allclose(got, _plain_logits(model, ids.numpy(), mask.numpy(), positions.numpy()),
                               rtol=0, atol=1e-5)


def test_exported_onnx_equals_the_plain_model(tiny, tmp_path):
    path = export_onnx(tiny.model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, (batch, seq, n_masks) in enumerate(((1, 9, 1), (3, 20, 3))):
        ids, mask, positions = _inputs(tiny, batch, seq, n_masks, seed)
        got = session.run([LOGITS], {INPUT_IDS: ids, ATTENTION_MASK: mask, MASK_POSITIONS: positions})[0]
        np.testing.assert_allclose(got, _plain_logits(tiny.model, ids, mask, positions), rtol=0, atol=1e-4)
    # the last layer's whole-sequence output is dead code, dropped: one FFN per layer
    import onnx

    graph = onnx.load(str(path)).graph
    layers = tiny.model.config.num_hidden_layers
    erf = sum(node.op_type == "Erf" for node in graph.node)  # GELU, once per layer and once in the head
    assert erf == layers + 1
