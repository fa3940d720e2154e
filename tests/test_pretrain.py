"""Whole-word masking, vocabulary building and a tiny pretrain run (offline, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools import ToolError
from tools.train import wwm

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BASE_VOCAB = SHARED / "models" / "bert-base-chinese" / "vocab.txt"

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL_IDS = [PAD, UNK, CLS, SEP, MASK]


# ---------------------------------------------------------------------- vocabulary
def test_build_vocab_keeps_specials_and_frequent_tokens_in_original_order():
    base = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "甲", "乙", "丙", "丁", "##戊"]
    counts = {1: 50, 6: 5, 7: 1, 8: 9, 9: 2, 10: 3}
    kept = wwm.build_vocab(base, counts, min_freq=2)
    # [unused1] is dropped however frequent; 乙 (1 use) is under min_freq.
    assert kept == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "甲", "丙", "丁", "##戊"]
    capped = wwm.build_vocab(base, counts, min_freq=1, max_size=7)
    # The two most frequent (丙 9, 甲 5) fill the two free places, in original order.
    assert capped == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "甲", "丙"]


def test_read_vocab_names_the_file_when_specials_are_missing(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n甲\n", encoding="utf-8")
    with pytest.raises(ToolError, match="vocab.txt.*lacks special tokens"):
        wwm.read_vocab(path)
    with pytest.raises(ToolError, match="not found"):
        wwm.read_vocab(tmp_path / "missing.txt")


def test_trimmed_tokenizer_maps_unkept_characters_to_unk(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "床", "前", "明", "月", "光"]
    wwm.write_vocab(vocab, tmp_path / "vocab.txt")
    tokenizer = wwm.make_tokenizer(tmp_path / "vocab.txt")
    assert len(tokenizer.get_vocab()) == len(vocab)
    ids = tokenizer("床前明月光霜", add_special_tokens=False)["input_ids"]
    assert ids == [5, 6, 7, 8, 9, 1]


# ------------------------------------------------------------------ test passages
def test_passages_are_cut_at_sentence_ends_and_bounded():
    text = "第一句话很短。" * 30 + "\n下一行"
    passages = wwm.passages_of(text, max_chars=50)
    assert "".join(passages) == text.replace("\n", "")
    assert all(len(p) <= 50 for p in passages)
    assert all(p.endswith("。") for p in passages[:-1])


# ----------------------------------------------------------------------- word flags
def test_word_start_flags_follow_jieba_words():
    text = "北京大学ab"
    # Token offsets as BERT's Chinese tokenization gives them: one per character,
    # "ab" as one word piece.
    offsets = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6)]
    flags = wwm.word_start_flags(text, offsets, ["北京", "大学", "ab"])
    assert flags.tolist() == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError):
        wwm.word_start_flags(text, offsets, ["北京"])


def test_each_json_lines_record_is_read_once_even_with_u2028_inside(tmp_path):
    # FewCLUE iflytek holds U+2028 inside JSON strings. An earlier reader split lines
    # on it, hit a parse error mid-file, re-read the file, and kept the records
    # before the error twice (2,866 documents in the shipped model's corpus cache).
    folder = tmp_path / "iflytek"
    folder.mkdir()
    records = [{"sentence": "第一条应用描述"}, {"sentence": "第二条\u2028跨行的描述"},
               {"sentence": "第三条应用描述"}]
    (folder / "train.json").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    (folder / "label_distribution.json").write_text("not json, not a corpus\n", encoding="utf-8")
    texts = [d.text for d in wwm.read_documents(tmp_path)]
    assert texts == ["第一条应用描述", "第二条\u2028跨行的描述", "第三条应用描述"]


# ------------------------------------------------------------------------- masking
def _toy_batch(rows: int = 200, seed: int = 1):
    """Sequences of [CLS] words... [SEP] [PAD]..., words of 1-4 tokens, some [UNK]."""
    rng = np.random.default_rng(seed)
    ids = np.full((rows, 64), PAD, dtype=np.int64)
    flags = np.ones((rows, 64), dtype=np.uint8)
    for r in range(rows):
        pos, length = 1, int(rng.integers(20, 62))
        ids[r, 0] = CLS
        while pos < length:
            size = min(int(rng.integers(1, 5)), length - pos)
            ids[r, pos:pos + size] = rng.integers(5, 100, size)
            flags[r, pos + 1:pos + size] = 0
            pos += size
        ids[r, pos] = SEP
        if r % 3 == 0:
            ids[r, 2] = UNK
    return ids, flags


def _words(flags_row, ids_row):
    """Index lists of the words (runs started by a flag) among non-special tokens."""
    words, current = [], []
    for i, (flag, token) in enumerate(zip(flags_row, ids_row)):
        if token in SPECIAL_IDS:
            if current:
                words.append(current)
            current = []
            continue
        if flag and current:
            words.append(current)
            current = []
        current.append(i)
    if current:
        words.append(current)
    return words


def test_whole_words_are_masked_together_and_specials_never():
    ids, flags = _toy_batch()
    inputs, labels = wwm.mask_batch(ids, flags, np.random.default_rng(0), MASK, 100, SPECIAL_IDS)
    chosen = labels != -100
    assert not np.isin(ids[chosen], SPECIAL_IDS).any(), "a special token or [UNK] was masked"
    assert (labels[chosen] == ids[chosen]).all()
    assert (inputs[~chosen] == ids[~chosen]).all(), "an unchosen token was changed"
    for r in range(len(ids)):
        for word in _words(flags[r], ids[r]):
            picked = chosen[r, word]
            assert picked.all() or not picked.any(), f"row {r}: word {word} partly masked"


def test_masking_ratio_and_80_10_10_split():
    ids, flags = _toy_batch(rows=600)
    inputs, labels = wwm.mask_batch(ids, flags, np.random.default_rng(3), MASK, 100, SPECIAL_IDS)
    eligible = ~np.isin(ids, SPECIAL_IDS)
    chosen = labels != -100
    ratio = chosen.sum() / eligible.sum()
    assert 0.12 < ratio <= 0.16, ratio
    as_mask = (inputs[chosen] == MASK).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()
    assert 0.76 < as_mask < 0.84, as_mask
    # "kept" includes random draws that hit the original token (1/95 of the 10%).
    assert 0.07 < kept < 0.13, kept
    assert not np.isin(inputs[chosen & (inputs != MASK)], SPECIAL_IDS).any()


def test_masking_is_reproducible_for_a_seed():
    ids, flags = _toy_batch(rows=20)
    a = wwm.mask_batch(ids, flags, np.random.default_rng(7), MASK, 100, SPECIAL_IDS)
    b = wwm.mask_batch(ids, flags, np.random.default_rng(7), MASK, 100, SPECIAL_IDS)
    assert all((x == y).all() for x, y in zip(a, b))


def test_make_batch_wraps_chunks_with_cls_sep_and_pads():
    prepared = wwm.Prepared(ids=np.arange(5, 25, dtype=np.uint16), word_start=np.ones(20, dtype=np.uint8))
    starts = wwm.chunk_starts(len(prepared), 6)
    assert starts.tolist() == [0, 6, 12]
    ids, flags, attn = wwm.make_batch(prepared, [12, 18], 8, CLS, SEP, PAD)
    assert ids[0].tolist() == [CLS, 17, 18, 19, 20, 21, 22, SEP]
    assert ids[1].tolist() == [CLS, 23, 24, SEP, PAD, PAD, PAD, PAD]
    assert attn[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


# -------------------------------------------------------------- tiny pretrain run
CORPUS_LINES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们今天去北京大学参观，天气非常好。",
    "这款手机应用可以帮助你管理日常生活中的各种事务。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"{CORPUS_LINES[i % 5]}{CORPUS_LINES[(i * 3 + 1) % 5]}第{i}篇。" for i in range(240)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pretrain(corpus: Path, run_dir: Path, *extra: str) -> int:
    if not BASE_VOCAB.is_file():
        pytest.skip(f"{BASE_VOCAB} is not present (../shared holds bert-base-chinese's vocab)")
    from tools.__main__ import main

    return main(["pretrain", "--data", str(corpus), "--run-dir", str(run_dir), "--shape", "2x32x2x64",
                 "--seq-len", "32", "--max-position", "32", "--batch-size", "4", "--log-every", "2",
                 "--test-fraction", "0.1", "--threads", "1", "--lr", "3e-3", *extra])


def test_tiny_pretrain_writes_a_loadable_hf_checkpoint(tiny_corpus, tmp_path):
    from tokenizers import Tokenizer
    from transformers import BertForMaskedLM

    run_dir = tmp_path / "run"
    assert _pretrain(tiny_corpus, run_dir, "--max-steps", "6") == 0
    ckpt = run_dir / "checkpoint"
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "training.json"):
        assert (ckpt / name).is_file(), name
    model = BertForMaskedLM.from_pretrained(ckpt)
    vocab = wwm.read_vocab(ckpt / "vocab.txt")
    assert model.config.vocab_size == len(vocab) == len(wwm.read_vocab(run_dir / "data" / "vocab.txt"))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert vocab[:5] == list(wwm.SPECIALS)
    # The saved tokenizer.json (what the runtime uses) agrees with vocab.txt.
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    encoded = tok.encode("床前明月光", add_special_tokens=False)
    assert [vocab[i] for i in encoded.ids] == list("床前明月光")
    info = json.loads((ckpt / "training.json").read_text(encoding="utf-8"))
    assert info["steps"] == 6 and info["tokens_seen"] > 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6]
    assert all(np.isfinite(m["loss"]) and 0 <= m["mlm_acc"] <= 1 for m in lines)


def test_test_split_is_written_and_kept_out_of_training(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert _pretrain(tiny_corpus, run_dir, "--prepare-only") == 0
    data = run_dir / "data"
    passages = (data / wwm.TEST_FILE).read_text(encoding="utf-8").splitlines()
    assert passages, "no held-apart passages"
    # The evaluation computes the same passages from the corpus.
    assert wwm.held_apart_passages(tiny_corpus, 0.1) == passages
    tokenizer = wwm.make_tokenizer(data / "vocab.txt")
    prepared = wwm.load_prepared(data)
    text = tokenizer.decode(prepared.ids.astype(np.int64).tolist()).replace(" ", "")
    trained = set(text.split("[SEP]"))
    assert not trained & set(passages)
    meta = json.loads((data / "prep.json").read_text(encoding="utf-8"))
    assert meta["train_documents"] + meta["test_documents"] == 240


def test_resume_continues_the_same_run(tiny_corpus, tmp_path):
    import torch
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _pretrain(tiny_corpus, straight, "--max-steps", "8") == 0
    assert _pretrain(tiny_corpus, split, "--max-steps", "8", "--stop-at-step", "4") == 0
    assert json.loads((split / "checkpoint" / "training.json").read_text())["steps"] == 4
    # Starting again over an existing run without --resume is refused.
    assert _pretrain(tiny_corpus, split, "--max-steps", "8") == 2
    assert _pretrain(tiny_corpus, split, "--max-steps", "8", "--resume") == 0
    assert json.loads((split / "checkpoint" / "training.json").read_text())["steps"] == 8
    a = load_file(straight / "checkpoint" / "model.safetensors")
    b = load_file(split / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bad_options_are_reported(tiny_corpus, tmp_path, capsys):
    from tools.__main__ import main

    assert main(["pretrain", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert _pretrain(tiny_corpus, tmp_path / "r2", "--shape", "2x30x4x64") == 2
    assert "divisible" in capsys.readouterr().err


def test_sigterm_stops_cleanly_and_saves_a_checkpoint(tiny_corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    if not BASE_VOCAB.is_file():
        pytest.skip(f"{BASE_VOCAB} is not present")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tools", "pretrain", "--data", str(tiny_corpus), "--run-dir", str(run_dir),
           "--shape", "2x32x2x64", "--seq-len", "32", "--max-position", "32", "--batch-size", "4",
           "--log-every", "1", "--test-fraction", "0.1", "--threads", "1", "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    for line in proc.stdout:  # wait until training steps are running
        if " step 3 " in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    info = json.loads((run_dir / "checkpoint" / "training.json").read_text(encoding="utf-8"))
    assert 3 <= info["steps"] < 100000
    assert (run_dir / "state.pt").is_file()


def test_sequence_length_schedule_parses_and_steps_up():
    from tools.train.batches import parse_seq_schedule, seq_len_at

    schedule = parse_seq_schedule("16:0.3, 32:0.6", 128)
    assert schedule == [(16, 0.3), (32, 0.6), (128, 1.0)]
    assert [seq_len_at(schedule, p) for p in (0.0, 0.29, 0.3, 0.59, 0.6, 0.99, 1.0)] == [16, 16, 32, 32, 128, 128, 128]
    assert parse_seq_schedule("", 64) == [(64, 1.0)]
    for bad in ("16", "16:x", "256:0.5", "16:1.2", "32:0.5,16:0.4"):
        with pytest.raises(ToolError, match="--seq-schedule"):
            parse_seq_schedule(bad, 128)


def test_tiny_pretrain_with_a_length_schedule_keeps_tokens_per_step(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert _pretrain(tiny_corpus, run_dir, "--max-steps", "8", "--seq-schedule", "8:0.5") == 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["seq_len"] for m in lines] == [8, 8, 32, 32]
    info = json.loads((run_dir / "checkpoint" / "training.json").read_text(encoding="utf-8"))
    assert info["seq_schedule"] == "8:0.5" and info["steps"] == 8
    # 4 sequences of 32 = 16 of 8 tokens: the first half saw as many tokens per step
    # (all chunks are full-length in this corpus).
    assert info["tokens_seen"] == 8 * 4 * 32


def test_mixed_masking_uses_character_masking_on_about_half_the_rows(tiny_corpus, tmp_path):
    from tools.train import batches

    run_dir = tmp_path / "run"
    assert _pretrain(tiny_corpus, run_dir, "--prepare-only") == 0
    tokenizer = wwm.make_tokenizer(run_dir / "data" / "vocab.txt")
    prepared = wwm.load_prepared(run_dir / "data")
    word = batches.Batches(prepared, tokenizer, 32, 64, 0, 0.15)
    mixed = batches.Batches(prepared, tokenizer, 32, 64, 0, 0.15, mask_unit="mixed")
    _, word_flags, _ = word.unmasked(3)
    ids, mixed_flags, _ = mixed.unmasked(3)
    all_chars = (mixed_flags == 1).all(axis=1)
    assert 0.25 < all_chars.mean() < 0.75  # those rows mask single characters
    # The other rows keep the jieba word boundaries.
    np.testing.assert_array_equal(mixed_flags[~all_chars], word_flags[~all_chars])
    assert not (word_flags == 1).all(axis=1).all()


def test_init_from_continues_with_a_shorter_position_table(tiny_corpus, tmp_path):
    from transformers import BertForMaskedLM

    first, second = tmp_path / "first", tmp_path / "second"
    assert _pretrain(tiny_corpus, first, "--max-steps", "4") == 0
    assert _pretrain(tiny_corpus, second, "--max-steps", "2", "--init-from", str(first / "checkpoint"),
                     "--max-position", "16", "--seq-len", "16", "--mask-unit", "mixed") == 0
    before = BertForMaskedLM.from_pretrained(first / "checkpoint")
    after = BertForMaskedLM.from_pretrained(second / "checkpoint")
    assert after.config.max_position_embeddings == 16
    assert after.bert.embeddings.position_embeddings.weight.shape[0] == 16
    # Two small steps from the first run's weights: close to them, not a fresh init.
    diff = (after.bert.embeddings.word_embeddings.weight - before.bert.embeddings.word_embeddings.weight).abs().max().item()
    assert 0 < float(diff) < 0.05
    info = json.loads((second / "checkpoint" / "training.json").read_text(encoding="utf-8"))
    assert info["init_from"] == str(first / "checkpoint") and "half the sequences" in info["objective"]
    # The record keeps both runs and their totals (a chained model says how long it trained in all).
    first_info = json.loads((first / "checkpoint" / "training.json").read_text(encoding="utf-8"))
    assert [p["steps"] for p in info["phases"]] == [4, 2]
    assert info["phases"][0]["objective"] == first_info["objective"] and info["phases"][1]["seq_len"] == 16
    assert info["total_steps"] == 6
    assert info["total_tokens_seen"] == first_info["tokens_seen"] + info["tokens_seen"]
    assert info["total_train_minutes"] == pytest.approx(first_info["train_minutes"] + info["train_minutes"], abs=0.01)
    assert _pretrain(tiny_corpus, tmp_path / "third", "--max-steps", "2", "--init-from",
                     str(first / "checkpoint"), "--max-position", "64") == 2


def test_init_from_with_more_layers_grows_the_checkpoint_by_stacking(tiny_corpus, tmp_path, capsys):
    import torch
    from transformers import BertForMaskedLM

    from tools.train.model_init import grow_layers

    first, grown_run = tmp_path / "first", tmp_path / "grown"
    assert _pretrain(tiny_corpus, first, "--max-steps", "4") == 0
    small = BertForMaskedLM.from_pretrained(first / "checkpoint").eval()
    grown = grow_layers(small, 4).eval()
    assert grown.config.num_hidden_layers == 4 and len(grown.bert.encoder.layer) == 4
    for index in (2, 3):  # added layers: input-side weights copied from layer index mod 2 ...
        new, old = grown.bert.encoder.layer[index], small.bert.encoder.layer[index % 2]
        assert torch.equal(new.attention.self.query.weight, old.attention.self.query.weight)
        assert torch.equal(new.intermediate.dense.weight, old.intermediate.dense.weight)
        # ... and their residual branches start silent, their LayerNorms plain.
        assert not new.attention.output.dense.weight.any() and not new.output.dense.bias.any()
        assert torch.all(new.output.LayerNorm.weight == 1) and not new.output.LayerNorm.bias.any()
    assert torch.equal(grown.bert.encoder.layer[1].output.dense.weight, small.bert.encoder.layer[1].output.dense.weight)
    # Four small steps from init leave the last LayerNorm near plain, so the added layers
    # (which only re-normalise) leave the predictions as they were.
    ids = torch.tensor([[2, 10, 11, 4, 12, 3]])
    with torch.no_grad():
        assert torch.allclose(grown(input_ids=ids).logits, small(input_ids=ids).logits, atol=0.05)

    assert _pretrain(tiny_corpus, grown_run, "--max-steps", "2", "--seed", "1", "--init-from", str(first / "checkpoint"),
                     "--shape", "4x32x2x64") == 0
    info = json.loads((grown_run / "checkpoint" / "training.json").read_text(encoding="utf-8"))
    assert info["shape"] == "4x32x2x64"
    assert [p["shape"] for p in info["phases"]] == ["2x32x2x64", "4x32x2x64"]
    assert BertForMaskedLM.from_pretrained(grown_run / "checkpoint").config.num_hidden_layers == 4
    capsys.readouterr()
    # Only layers can be added: another width, or fewer layers, is refused with the folder named.
    for shape in ("2x64x2x64", "1x32x2x64"):
        assert _pretrain(tiny_corpus, tmp_path / shape, "--max-steps", "2", "--seed", "1", "--init-from",
                         str(first / "checkpoint"), "--shape", shape) == 2
        err = capsys.readouterr().err
        assert str(first / "checkpoint") in err and "can only add layers" in err


def test_phases_recorded_before_shape_was_a_phase_field_get_the_record_shape(tmp_path):
    from tools.train.model_init import earlier_phases

    record = {"shape": "4x128x4x512", "phases": [{"steps": 1}, {"steps": 2, "shape": "2x32x2x64"}]}
    (tmp_path / "training.json").write_text(json.dumps(record), encoding="utf-8")
    assert [p["shape"] for p in earlier_phases(tmp_path)] == ["4x128x4x512", "2x32x2x64"]


def _with_extra_token(src: Path, dst: Path, token: str, at: int) -> None:
    """A copy of checkpoint ``src`` whose vocabulary has ``token`` inserted at id ``at``
    (a row of its own in the embedding and the output bias)."""
    import torch
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(src)
    tokens = wwm.read_vocab(src / "vocab.txt")
    tokens.insert(at, token)
    rows = torch.cat([torch.arange(at), torch.tensor([0]), torch.arange(at, model.config.vocab_size)])
    with torch.no_grad():
        table = torch.nn.Embedding(len(tokens), model.config.hidden_size)
        table.weight.copy_(model.bert.embeddings.word_embeddings.weight[rows])
        table.weight[at] = 7.0  # easy to tell if this row leaks into the mapped model
        model.bert.embeddings.word_embeddings = table
        model.cls.predictions.bias = torch.nn.Parameter(model.cls.predictions.bias[rows].clone())
        model.cls.predictions.decoder = torch.nn.Linear(model.config.hidden_size, len(tokens))
        model.cls.predictions.decoder.weight = table.weight
        model.cls.predictions.decoder.bias = model.cls.predictions.bias
    model.config.vocab_size = len(tokens)
    model.save_pretrained(dst)
    wwm.write_vocab(tokens, dst / "vocab.txt")


def test_init_from_maps_another_vocabulary_by_token(tiny_corpus, tmp_path, capsys):
    import torch
    from transformers import BertForMaskedLM

    from tools.train.model_init import init_from_checkpoint

    first = tmp_path / "first"
    assert _pretrain(tiny_corpus, first, "--max-steps", "4") == 0
    tokens = wwm.read_vocab(first / "checkpoint" / "vocab.txt")
    wider = tmp_path / "wider"
    _with_extra_token(first / "checkpoint", wider, "龘", 7)
    original = BertForMaskedLM.from_pretrained(first / "checkpoint").eval()
    mapped = init_from_checkpoint(wider, tokens, 32).eval()
    # Every token gets its own row back, the extra one is dropped, the head stays tied.
    assert mapped.config.vocab_size == len(tokens)
    assert torch.equal(mapped.bert.embeddings.word_embeddings.weight, original.bert.embeddings.word_embeddings.weight)
    assert torch.equal(mapped.cls.predictions.bias, original.cls.predictions.bias)
    assert mapped.cls.predictions.decoder.weight is mapped.bert.embeddings.word_embeddings.weight
    ids = torch.tensor([[2, 10, 11, 4, 12, 3]])
    with torch.no_grad():
        assert torch.allclose(mapped(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-6)
    # Training goes on from it through the command line.
    assert _pretrain(tiny_corpus, tmp_path / "next", "--max-steps", "2", "--init-from", str(wider)) == 0
    # A token of the data that the checkpoint lacks is refused, with the folder named.
    with pytest.raises(ToolError, match="not in its vocabulary") as info:
        init_from_checkpoint(first / "checkpoint", tokens + ["龘"], 32)
    assert str(first / "checkpoint") in str(info.value)


def test_continuing_with_the_seed_of_an_earlier_phase_is_refused(tiny_corpus, tmp_path, capsys):
    """Same seed, length and batch size would replay the earlier batches and their blanks."""
    first = tmp_path / "first"
    assert _pretrain(tiny_corpus, first, "--max-steps", "2", "--seed", "5") == 0
    capsys.readouterr()
    same = ["--max-steps", "2", "--init-from", str(first / "checkpoint"), "--seed", "5"]
    assert _pretrain(tiny_corpus, tmp_path / "replay", *same) == 2
    err = capsys.readouterr().err
    assert "--seed 5" in err and "phase 1" in err and "replay" in err
    assert not (tmp_path / "replay" / "checkpoint").exists()
    # Another seed, another length, or an explicit --reuse-seed are fine.
    assert _pretrain(tiny_corpus, tmp_path / "new-seed", *same[:-1], "6") == 0
    assert _pretrain(tiny_corpus, tmp_path / "shorter", *same, "--seq-len", "16") == 0
    assert _pretrain(tiny_corpus, tmp_path / "forced", *same, "--reuse-seed") == 0
