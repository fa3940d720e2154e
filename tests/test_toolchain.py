"""The x86 toolchain: checkpoint → trimmed vocabulary → FP32 ONNX → INT8 → bundle.

Runs offline on a tiny BertForMaskedLM made by tests/make_tiny_checkpoint.py (a few
seconds); one test runs the real bert-base-chinese architecture (random weights)
when ../shared is present.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
from tokenizers import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from make_tiny_checkpoint import N_UNUSED, make_checkpoint, tiny_vocab  # noqa: E402

from edge.manifest import (  # noqa: E402
    ATTENTION_MASK, INPUT_IDS, LOGITS, MASK_POSITIONS, MODEL_FILE, TOKENIZER_FILE, Manifest, sha256_of,
)
from tools import ToolError  # noqa: E402
from tools.__main__ import main as tools_main  # noqa: E402
from tools.bundle.build import build_bundle  # noqa: E402
from tools.bundle.checkpoint import load_checkpoint  # noqa: E402
from tools.bundle.corpus_counts import CorpusStats, count_texts, corpus_stats  # noqa: E402
from tools.bundle.trim_vocab import plan_trim, trim_checkpoint  # noqa: E402
from tools.bundle.verify import PARITY_ATOL, PARITY_RTOL, seeded_inputs, torch_logits  # noqa: E402

SHARED = ROOT.parent / "shared"
LINES = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们的国家是一个大家庭，人人都要学会对他人好。",
    "他说这个方法可以用，我们就去做了。",
    "画蛇添足的人最后没有得到酒。一石二鸟是个好主意。",
)
# Many distinct documents, so that the by-hash test split (2%) holds a few of them.
CORPUS_TEXT = "\n".join(f"{LINES[i % 4]}第{i}天。" for i in range(600)) + "\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Corpus counts go to a per-test cache folder, never ~/.cache."""
    monkeypatch.setenv("EDGE_TOOLS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A fresh tiny checkpoint folder (weights + tokenizer files)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """A small plain-text corpus: one document per line."""
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS_TEXT, encoding="utf-8")
    return path


def _stats(text: str) -> CorpusStats:
    chars, runs, n = count_texts(text.splitlines())
    return CorpusStats(chars, runs, [], n, "inline")


# -- loading and its errors ---------------------------------------------------------

def test_load_checkpoint_reads_weights_and_tokenizer(tiny_dir):
    ckpt = load_checkpoint(str(tiny_dir))
    assert type(ckpt.model).__name__ == "BertForMaskedLM"
    assert ckpt.random_init  # the folder's edge_provenance.json says its saved weights are random
    assert ckpt.model.config.vocab_size == len(tiny_vocab())
    assert ckpt.special_ids() == {"[PAD]": 0, "[UNK]": N_UNUSED + 1, "[CLS]": N_UNUSED + 2,
                                  "[SEP]": N_UNUSED + 3, "[MASK]": N_UNUSED + 4}
    # saved weights are loaded, not re-initialised
    again = load_checkpoint(str(tiny_dir))
    assert torch.equal(ckpt.model.cls.predictions.bias, again.model.cls.predictions.bias)


def test_random_init_is_seeded_and_flagged(tiny_dir):
    a = load_checkpoint(str(tiny_dir), random_init=True, seed=3)
    b = load_checkpoint(str(tiny_dir), random_init=True, seed=3)
    c = load_checkpoint(str(tiny_dir), random_init=True, seed=4)
    assert a.random_init and a.seed == 3
    emb = lambda ck: ck.model.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(emb(a), emb(b))
    assert not torch.equal(emb(a), emb(c))


def test_missing_and_invalid_folders_are_clear(tmp_path):
    with pytest.raises(ToolError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ToolError, match="no config.json"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ToolError, match="not valid JSON"):
        load_checkpoint(str(tmp_path))


def test_config_without_weights_asks_for_random_init(tiny_dir, tmp_path):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ToolError, match=r"no weights.*pass --random-init"):
        load_checkpoint(str(folder))
    assert load_checkpoint(str(folder), random_init=True).random_init


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification"])
def test_checkpoint_without_mlm_head_is_refused_by_name(tiny_dir, tmp_path, cls_name):
    import transformers

    folder = tmp_path / cls_name
    config = transformers.BertConfig.from_pretrained(str(tiny_dir))
    model = getattr(transformers, cls_name)(config)
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, folder / name)
    with pytest.raises(ToolError, match=f"{cls_name}.*no masked-LM head"):
        load_checkpoint(str(folder))


def test_weights_missing_the_head_are_refused(tiny_dir, tmp_path):
    """A BertModel's weights under a config that claims BertForMaskedLM."""
    import transformers

    folder = tmp_path / "headless"
    config = transformers.BertConfig.from_pretrained(str(tiny_dir))
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    data = json.loads((folder / "config.json").read_text())
    data["architectures"] = ["BertForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(data))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, folder / name)
    with pytest.raises(ToolError, match="weights have no masked-LM head"):
        load_checkpoint(str(folder))


def test_bad_corpus_and_tiny_target_are_refused(tiny_dir, tmp_path):
    with pytest.raises(ToolError, match="corpus path does not exist"):
        corpus_stats(tmp_path / "missing")
    with pytest.raises(ToolError, match="corpus path does not exist"):
        build_bundle(str(tiny_dir), tmp_path / "b", corpus=tmp_path / "missing")
    ckpt = load_checkpoint(str(tiny_dir))
    with pytest.raises(ToolError, match="smaller than the 5 special tokens"):
        plan_trim(ckpt.vocab, 4)
    with pytest.raises(ToolError, match="pass --corpus"):
        plan_trim(ckpt.vocab, 50)


# -- trimming -----------------------------------------------------------------------

def test_plan_drops_cjk_wordpieces_unused_then_rare(tiny_dir):
    ckpt = load_checkpoint(str(tiny_dir))
    vocab = ckpt.vocab
    structural = plan_trim(vocab, None)
    assert structural.dropped_unused == N_UNUSED
    assert structural.dropped_wordpiece == 5  # ##的 ##一 ##是 ##国 ##人; ##s ##ing ##ed ##0 stay
    assert structural.kept_ids == sorted(structural.kept_ids)
    kept_tokens = {t for t, i in vocab.items() if i in set(structural.kept_ids)}
    assert "##ing" in kept_tokens and "##的" not in kept_tokens and "[unused1]" not in kept_tokens

    stats = _stats("明月明月明月光。\n霜the")
    plan = plan_trim(vocab, 9, stats, ckpt.tokenizer)
    tokens = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in set(plan.kept_ids)]
    # 5 specials + the 4 most frequent: 明 月 (3 each), then 光 。 霜 the (1 each) tie-broken by id
    assert tokens[:1] == ["[PAD]"] and {"[UNK]", "[CLS]", "[SEP]", "[MASK]"} <= set(tokens)
    assert {"明", "月"} <= set(tokens) and len(tokens) == 9
    assert plan.kept_ids == sorted(plan.kept_ids)
    # coverage: 12 non-space chars; kept chars' share, computed by hand
    kept = set(tokens)
    chars = "明月明月明月光。霜" + "the"
    expected = sum(1 for c in "明月明月明月光。霜" if c in kept) + (3 if "the" in kept else 0)
    assert plan.coverage == pytest.approx(expected / len(chars))
    assert plan.original_coverage == pytest.approx(1.0)


def test_trimmed_model_keeps_logits_of_kept_tokens(tiny_dir):
    original = load_checkpoint(str(tiny_dir))
    trimmed = load_checkpoint(str(tiny_dir))
    stats = _stats(CORPUS_TEXT)
    plan = plan_trim(trimmed.vocab, 60, stats, trimmed.tokenizer)
    old_vocab = original.vocab
    trim_checkpoint(trimmed, plan)
    model = trimmed.model
    assert model.config.vocab_size == 60
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tie kept
    assert model.cls.predictions.bias is model.cls.predictions.decoder.bias
    assert model.cls.predictions.bias.shape == (60,)

    # same sentence, old ids vs new ids: logits at kept ids must be identical
    text = "床前明月光，疑是地上霜。"
    old = original.tokenizer(text)["input_ids"]
    new = trimmed.tokenizer(text)["input_ids"]
    kept_of = {old_id: new_id for new_id, old_id in enumerate(plan.kept_ids)}
    assert new == [kept_of[i] for i in old]  # every char of the line is frequent in the corpus
    mask_old, mask_new = old_vocab["[MASK]"], kept_of[old_vocab["[MASK]"]]
    old[3], new[3] = mask_old, mask_new
    ones = [[1] * len(old)]
    ref = torch_logits(original.model, [old], ones, [[3]])[0, 0, plan.kept_ids]
    got = torch_logits(model, [new], ones, [[3]])[0, 0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)

    # a character outside the kept vocabulary becomes [UNK]
    dropped = next(t for t, i in old_vocab.items() if len(t) == 1 and "\u4e00" <= t <= "\u9fff"
                   and i not in set(plan.kept_ids))
    assert trimmed.tokenizer(dropped, add_special_tokens=False)["input_ids"] == [kept_of[old_vocab["[UNK]"]]]


# -- the whole build ------------------------------------------------------------------

def test_build_writes_verified_bundle(tiny_dir, corpus, tmp_path):
    out = tmp_path / "bundle"
    build_bundle(str(tiny_dir), out, vocab_size=120, corpus=corpus, keep_fp32=True, samples=40)
    manifest = Manifest.load(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", MODEL_FILE, TOKENIZER_FILE]
    for name, entry in manifest.files.items():
        assert entry.size == (out / name).stat().st_size and entry.sha256 == sha256_of(out / name)
    assert manifest.vocab_size == 120 and manifest.vocab["kept"] == 120
    assert manifest.vocab["original_size"] == len(tiny_vocab())
    assert manifest.vocab["dropped_unused"] == N_UNUSED and manifest.vocab["dropped_wordpiece"] == 5
    # every corpus token the tiny vocabulary has fits in 120: trimming loses no coverage
    # (the tiny vocabulary itself lacks some corpus characters, hence < 1)
    assert 0.8 < manifest.vocab["coverage"] == manifest.vocab["original_coverage"] < 1.0
    assert manifest.random_init is True and manifest.max_length == 64
    assert manifest.architecture.num_layers == 2 and manifest.architecture.hidden_size == 32
    assert manifest.quantization["weight_type"] == "QInt8" and manifest.quantization["per_channel"]
    assert "shared" in manifest.quantization["word_embedding"]
    ev = manifest.evaluation
    assert ev["fp32_parity"]["passed"] and ev["fp32_parity"]["max_abs_diff"] <= ev["fp32_parity"]["tolerance"]
    agreement = ev["quantized_vs_fp32"]
    assert agreement["masked_positions"] >= 10 and agreement["masked_positions"] % 2 == 0  # 2 per line
    assert 0 <= agreement["top1_agreement"] <= 1 and 0 <= agreement["top5_overlap"] <= 1
    assert 0 <= agreement["reference_top1_accuracy"] <= 1
    assert "held-apart" in ev["quantized_vs_fp32"]["inputs"]
    assert ev["sizes_bytes"]["quantized_onnx"] == manifest.files[MODEL_FILE].size
    assert ev["sizes_bytes"]["quantized_onnx"] < ev["sizes_bytes"]["fp32_onnx"]

    tokenizer = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    assert tokenizer.get_vocab_size() == 120
    assert {tokenizer.token_to_id(t) for t in manifest.special_ids} == set(manifest.special_ids.values())
    assert all(tokenizer.token_to_id(t) == i for t, i in manifest.special_ids.items())

    # reload with onnxruntime alone and compare with the PyTorch model (trimmed the same way)
    ckpt = load_checkpoint(str(tiny_dir))
    trim_checkpoint(ckpt, plan_trim(ckpt.vocab, 120, corpus_stats(corpus), ckpt.tokenizer))
    assert tokenizer.get_vocab() == ckpt.tokenizer.get_vocab()
    enc = tokenizer.encode("床前明月光，疑是地[MASK]霜。")
    ids = np.array([enc.ids])
    pos = np.array([[enc.ids.index(manifest.special_ids["[MASK]"])]])
    feed = {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids), MASK_POSITIONS: pos}
    session = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_IDS, ATTENTION_MASK, MASK_POSITIONS]
    # the tied embedding/decoder matrix is stored once, as int8 [hidden, vocab]
    import onnx

    tables = [(i.data_type, list(i.dims)) for i in onnx.load(str(out / MODEL_FILE)).graph.initializer
              if sorted(i.dims) == [32, 120]]
    assert tables == [(onnx.TensorProto.INT8, [32, 120])]
    int8 = session.run([LOGITS], feed)[0]
    assert int8.shape == (1, 1, 120)
    ref = torch_logits(ckpt.model, ids, np.ones_like(ids), pos)
    assert np.max(np.abs(int8 - ref)) < 0.1 * np.max(np.abs(ref)) + 0.05  # INT8: close, not exact

    fp32_dir = tmp_path / "bundle-fp32"
    fp32_manifest = Manifest.load(fp32_dir)
    assert fp32_manifest.quantization is None and fp32_manifest.vocab_size == 120
    fp32 = ort.InferenceSession(str(fp32_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    for k, shape in enumerate([(1, 5, 1), (3, 30, 4)]):
        inputs = seeded_inputs(120, manifest.special_ids, *shape, seed=50 + k)
        got = fp32.run([LOGITS], dict(zip([INPUT_IDS, ATTENTION_MASK, MASK_POSITIONS], inputs)))[0]
        want = torch_logits(ckpt.model, *inputs)
        assert got.shape == (shape[0], shape[2], 120)
        assert np.max(np.abs(got - want)) <= PARITY_ATOL + PARITY_RTOL * np.max(np.abs(want))


def test_failed_fp32_parity_writes_nothing(tiny_dir, tmp_path, monkeypatch):
    """An export that does not match PyTorch stops the build before any bundle exists."""
    import tools.bundle.export_onnx as export_module

    real_export = export_module.export_onnx

    def export_then_drift(mlm, path, *args, **kwargs):
        result = real_export(mlm, path, *args, **kwargs)
        with torch.no_grad():  # the PyTorch model changes after export: parity must fail
            mlm.cls.predictions.bias.add_(1.0 + torch.arange(mlm.config.vocab_size, dtype=torch.float32))
        return result

    monkeypatch.setattr(export_module, "export_onnx", export_then_drift)
    out = tmp_path / "bundle"
    with pytest.raises(ToolError, match="does not match PyTorch"):
        build_bundle(str(tiny_dir), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_optional_graph_optimization_keeps_inputs_and_parity(tiny_dir, tmp_path):
    out = tmp_path / "opt"
    manifest = build_bundle(str(tiny_dir), out, optimize=True, samples=8)
    optimization = manifest["evaluation"]["graph_optimization"]
    # every layer's attention but the last, whose queries are only the masked rows
    layers = load_checkpoint(str(tiny_dir)).model.config.num_hidden_layers
    assert optimization["applied"] and optimization["fused"]["Attention"] == layers - 1
    assert manifest["evaluation"]["fp32_parity"]["passed"]
    session = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_IDS, ATTENTION_MASK, MASK_POSITIONS]
    assert "QAttention" in {n.op_type for n in __import__("onnx").load(str(out / MODEL_FILE)).graph.node}
    default = build_bundle(str(tiny_dir), tmp_path / "plain", samples=8)
    assert default["evaluation"]["graph_optimization"]["applied"] is False


def test_refuses_to_overwrite_a_non_bundle_folder(tiny_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ToolError, match="not a bundle folder"):
        build_bundle(str(tiny_dir), out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_steps_and_build(tiny_dir, corpus, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    trimmed, fp32, int8 = tmp_path / "trimmed", tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert tools_main(["trim", "--source", str(tiny_dir), "--out", str(trimmed), "--vocab", "100",
                       "--corpus", str(corpus)]) == 0
    assert json.loads((trimmed / "config.json").read_text())["vocab_size"] == 100
    provenance = json.loads((trimmed / "edge_provenance.json").read_text())
    assert provenance["source"] == str(tiny_dir) and provenance["vocab"]["kept"] == 100
    reloaded = load_checkpoint(str(trimmed))
    assert reloaded.source == str(tiny_dir)  # provenance carried on
    # the saved trimmed checkpoint reloads to the same model as trimming in memory
    in_memory = load_checkpoint(str(tiny_dir))
    trim_checkpoint(in_memory, plan_trim(in_memory.vocab, 100, corpus_stats(corpus), in_memory.tokenizer))
    assert reloaded.tokenizer.get_vocab() == in_memory.tokenizer.get_vocab()
    inputs = seeded_inputs(100, reloaded.special_ids(), 2, 12, 2, seed=7)
    np.testing.assert_allclose(torch_logits(reloaded.model, *inputs), torch_logits(in_memory.model, *inputs),
                               rtol=0, atol=1e-6)
    assert tools_main(["export", "--source", str(trimmed), "--out", str(fp32)]) == 0
    assert tools_main(["quantize", "--in", str(fp32), "--out", str(int8)]) == 0
    assert 0 < int8.stat().st_size < fp32.stat().st_size

    out = tmp_path / "bundle"
    assert tools_main(["build", "--source", str(trimmed), "--out", str(out), "--vocab", "0",
                       "--corpus", str(corpus), "--samples", "10"]) == 0
    for step in ("load checkpoint", "trim vocabulary", "export FP32 ONNX", "quantize (dynamic)", "write and reload bundle"):
        assert f"== {step} done in" in caplog.text
    capsys.readouterr()
    assert Manifest.load(out).source == str(tiny_dir)
    assert tools_main(["verify", "--bundle", str(out), "--checkpoint", str(trimmed), "--corpus", str(corpus),
                       "--samples", "10"]) == 0
    printed = capsys.readouterr().out
    start = printed.index("{\n")
    report = json.loads(printed[start:printed.index("\n}\n", start) + 2])
    assert report["files"] == "ok" and report["vs_pytorch"]["masked_positions"] > 0

    # tampering with the bundle is caught, naming the file
    with open(out / MODEL_FILE, "ab") as handle:
        handle.write(b"\0")
    assert tools_main(["verify", "--bundle", str(out), "--checkpoint", str(trimmed), "--corpus", str(corpus)]) == 2
    assert "model.onnx" in capsys.readouterr().err

    # ToolErrors are one line on stderr, exit status 2
    assert tools_main(["build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


# -- the committed fixture ----------------------------------------------------------------

def test_committed_tiny_bundle_is_valid():
    folder = ROOT / "tests" / "fixtures" / "tiny_bundle"
    manifest = Manifest.load(folder)
    for name, entry in manifest.files.items():
        assert entry.sha256 == sha256_of(folder / name), f"{name} changed: rerun tests/make_tiny_checkpoint.py"
    assert manifest.random_init is True and manifest.quantization is not None
    assert sum(p.stat().st_size for p in folder.iterdir()) < 300_000
    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    unk = manifest.special_ids["[UNK]"]
    for text in ("床前明月光，疑是地上霜。", "画蛇添足", "一石二鸟", "我们的国家"):
        assert unk not in tokenizer.encode(text).ids, text
    enc = tokenizer.encode("疑是地[MASK][MASK]霜")
    mask = manifest.special_ids["[MASK]"]
    assert enc.ids.count(mask) == 2
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    ids = np.array([enc.ids])
    positions = np.array([[i for i, t in enumerate(enc.ids) if t == mask]])
    logits = session.run([LOGITS], {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids), MASK_POSITIONS: positions})[0]
    assert logits.shape == (1, 2, manifest.vocab_size)

    twin = folder.parent / "tiny_bundle-fp32"  # same model and tokenizer, not quantized
    fp32 = Manifest.load(twin)
    assert fp32.quantization is None and fp32.vocab_size == manifest.vocab_size
    assert fp32.files[TOKENIZER_FILE] == manifest.files[TOKENIZER_FILE]
    assert fp32.files[MODEL_FILE].sha256 == sha256_of(twin / MODEL_FILE)


# -- the real architecture -------------------------------------------------------------------

@pytest.mark.skipif(not (SHARED / "models" / "bert-base-chinese" / "config.json").is_file(),
                    reason=f"{SHARED}/models/bert-base-chinese is not present")
def test_bert_base_chinese_random_init_pipeline(tmp_path):
    """The real config and tokenizer with random weights: structural trim numbers, a
    small --vocab, parity and the INT8 bundle (about a minute on 2 cores)."""
    source = SHARED / "models" / "bert-base-chinese"
    fewclue = SHARED / "data" / "fewclue" / "eprstmt"
    if not fewclue.is_dir():
        pytest.skip(f"{fewclue} is not present")
    out = tmp_path / "bbc"
    manifest = build_bundle(str(source), out, vocab_size=1500, corpus=fewclue, random_init=True, samples=8)
    assert manifest["random_init"] is True and manifest["vocab_size"] == 1500
    vocab = manifest["vocab"]
    assert vocab["original_size"] == 21128 and vocab["kept"] == 1500
    assert vocab["dropped_wordpiece"] == 7322 and vocab["dropped_unused"] == 99
    assert vocab["dropped_rare"] == 21128 - 7322 - 99 - 1500
    assert 0.9 < vocab["coverage"] <= vocab["original_coverage"]
    assert manifest["architecture"]["num_layers"] == 12 and manifest["max_length"] == 512
    assert manifest["evaluation"]["fp32_parity"]["passed"]
    size = (out / MODEL_FILE).stat().st_size
    # 85 M encoder weights at 1 byte each + 1500×768 shared embedding + small FP32 parts
    assert 85e6 < size < 90e6
    tokenizer = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    assert tokenizer.get_vocab_size() == 1500
    assert tokenizer.token_to_id("[MASK]") == manifest["special_ids"]["[MASK]"]
