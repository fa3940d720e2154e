"""``tools build --quantization dynamic|static|int4`` on the tiny checkpoint: each
choice makes a bundle the engine serves, its manifest says how it was made, and
static INT8 calibrates on the training split only (offline, seconds)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import onnx
import pytest

from edge.engine import Engine
from edge.manifest import MODEL_FILE, Manifest

pytest.importorskip("torch")

from tools import ToolError  # noqa: E402
from tools.__main__ import main as tools_main  # noqa: E402
from tools.bundle.build import build_bundle  # noqa: E402
from tools.bundle.corpus_counts import corpus_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_CHECKPOINT = ROOT / "tests" / "fixtures" / "tiny_checkpoint"
LINES = ("床前明月光，疑是地上霜。举头望明月，低头思故乡。", "我们的国家是一个大家庭，人人都要学会对他人好。",
         "他说这个方法可以用，我们就去做了。", "画蛇添足的人最后没有得到酒。一石二鸟是个好主意。")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Corpus counts go to a per-test cache folder, never ~/.cache."""
    monkeypatch.setenv("EDGE_TOOLS_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """Many distinct one-line documents, so both the test split (2%) and the
    calibration sample (1 in 97) hold some."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"{LINES[i % 4]}第{i}天。" for i in range(3000)) + "\n", encoding="utf-8")
    return path


def _ops(bundle: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(bundle / MODEL_FILE)).graph.node)


def _answers(bundle: Path) -> list[str]:
    engine = Engine.from_bundle(bundle, threads=1, batch_window_ms=0.0)
    try:
        result = engine.predict("床前明月光，疑是地[MASK]霜。", top_k=5)
    finally:
        engine.close()
    return [c["text"] for c in result["blanks"][0]["candidates"]]


def test_calibration_texts_are_training_documents_only(corpus):
    stats = corpus_stats(corpus, use_cache=False)
    assert 10 <= len(stats.calibration_texts) <= 256
    assert not set(stats.calibration_texts) & set(stats.test_texts)  # never the held-apart lines
    again = corpus_stats(corpus)  # written to and read from the cache alike
    assert corpus_stats(corpus).calibration_texts == again.calibration_texts == stats.calibration_texts


def test_static_int8_bundle_is_calibrated_on_the_corpus(corpus, tmp_path):
    out = tmp_path / "static"
    build_bundle(str(TINY_CHECKPOINT), out, vocab_size=None, corpus=corpus, quantization="static", samples=40)
    manifest = Manifest.load(out)
    quant = manifest.quantization
    assert manifest.name.endswith("-int8-static")
    assert quant["method"].startswith("onnxruntime.quantization.quantize_static")
    assert quant["batch_independent"] is True and quant["calibration"]["method"] == "minmax"
    assert "training-split" in quant["calibration"]["text"] and quant["calibration"]["rows"] > 0
    assert "shared" in quant["word_embedding"]
    ops = _ops(out)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0 and "DynamicQuantizeLinear" not in ops
    agreement = manifest.evaluation["quantized_vs_fp32"]
    assert agreement["masked_positions"] > 0 and 0 <= agreement["top1_agreement"] <= 1
    assert len(_answers(out)) == 5


def test_int4_bundle_is_smaller_and_serves(tmp_path):
    out = tmp_path / "int4"
    build_bundle(str(TINY_CHECKPOINT), out, vocab_size=None, corpus=None, quantization="int4", keep_fp32=True)
    manifest = Manifest.load(out)
    assert manifest.name.endswith("-int4") and "MatMulNBits" in manifest.quantization["method"]
    ops = _ops(out)
    assert ops["MatMulNBits"] == manifest.quantization["quantized_matmuls"] > 0
    assert ops["GatherBlockQuantized"] == 1  # the word embedding only
    fp32 = tmp_path / "int4-fp32"
    assert (out / MODEL_FILE).stat().st_size < 0.5 * (fp32 / MODEL_FILE).stat().st_size
    assert len(_answers(out)) == 5


def test_unknown_quantization_is_refused_before_any_work(tmp_path):
    with pytest.raises(ToolError, match="unknown quantization 'int2'"):
        build_bundle(str(TINY_CHECKPOINT), tmp_path / "x", quantization="int2")
    assert not (tmp_path / "x").exists()


def test_cli_quantization_choice_and_int4_unbundle_refused(corpus, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "cli-int4"
    assert tools_main(["build", "--source", str(TINY_CHECKPOINT), "--out", str(out), "--vocab", "0",
                       "--corpus", str(corpus), "--quantization", "int4", "--samples", "10"]) == 0
    assert "== quantize (int4) done in" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["quantization"]["quantized_matmuls"] > 0
    capsys.readouterr()
    assert tools_main(["unbundle", "--bundle", str(out), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "model.onnx" in err and "int4 bundle" in err
    with pytest.raises(SystemExit) as stop:
        tools_main(["build", "--source", str(TINY_CHECKPOINT), "--out", str(tmp_path / "y"), "--quantization", "int3"])
    assert stop.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_shared_word_embedding_reads_rows_of_the_decoder_weight(tmp_path):
    """The word embedding reads the tied decoder's INT8 weight through a Transpose
    ONNX Runtime folds at load (whole rows per token, one stored copy): token t's
    embedding is exactly column t of the weight times its scale."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    out = tmp_path / "dynamic"
    build_bundle(str(TINY_CHECKPOINT), out, vocab_size=None, corpus=None, quantization="dynamic")
    model = onnx.load(str(out / MODEL_FILE))
    nodes = {n.name: n for n in model.graph.node}
    transpose, gather = nodes["/shared_word_embedding/Transpose"], nodes["/shared_word_embedding/Gather"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight = inits[transpose.input[0]]  # [hidden, vocab] int8
    assert weight.dtype == np.int8 and list(transpose.attribute[0].ints) == [1, 0]
    assert gather.input[0] == transpose.output[0] and gather.attribute[0].i == 0
    scale = inits[transpose.input[0].replace("_quantized", "_scale")]
    # expose the looked-up embedding and compare it with the weight's columns
    looked_up = nodes["/shared_word_embedding/Mul"].output[0]
    model.graph.output.append(helper.make_empty_tensor_value_info(looked_up))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 17, 42, 5, 17]], dtype=np.int64)
    got = session.run([looked_up], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                    "mask_positions": np.array([[1]], dtype=np.int64)})[0]
    want = (weight[:, ids[0]].T.astype(np.float32) * scale[ids[0]][:, None])[None]
    np.testing.assert_array_equal(got, want)
