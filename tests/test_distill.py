"""TinyBERT-style distillation: loss parts, layer mapping, initialisation and a tiny
end-to-end run (teacher trained by a tiny pretrain run first; offline, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools import ToolError
from tools.train import distill, distill_losses
from tools.train import wwm

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
BASE_VOCAB = ROOT.parent / "shared" / "models" / "bert-base-chinese" / "vocab.txt"

LINES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们今天去北京大学参观，天气非常好。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
]


def _bert(layers=2, hidden=32, heads=2, inter=64, vocab=40, seed=0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inter, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForMaskedLM(config).eval()


def test_uniform_layer_map_follows_tinybert():
    assert distill_losses.layer_map(4, 12) == [3, 6, 9, 12]
    assert distill_losses.layer_map(2, 4) == [2, 4]
    assert distill_losses.layer_map(3, 3) == [1, 2, 3]
    with pytest.raises(ToolError, match="more layers"):
        distill_losses.layer_map(6, 4)


def test_recomputed_attention_scores_are_the_models_own():
    model = _bert()
    ids = torch.randint(5, 40, (2, 9))
    mask = torch.ones_like(ids)
    out = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    scores = distill_losses.attention_scores(model.bert, out.hidden_states, [1, 2])
    for mine, theirs in zip(scores, out.attentions):
        torch.testing.assert_close(mine.softmax(-1), theirs, rtol=1e-5, atol=1e-6)


def test_attention_loss_is_zero_for_equal_scores_and_groups_teacher_heads():
    mask = torch.ones(1, 4, dtype=torch.long)
    s = torch.randn(1, 2, 4, 4)
    assert distill_losses.attention_loss([s], [s.clone()], mask).item() == 0.0
    # Four teacher heads onto two student heads: heads (0,1) and (2,3) are averaged.
    t = torch.stack([s[:, 0] - 1, s[:, 0] + 1, s[:, 1] + 2, s[:, 1] - 2], dim=1)
    assert distill_losses.attention_loss([s], [t], mask).item() == pytest.approx(0.0, abs=1e-10)
    # Padded keys/queries do not count.
    padded = mask.clone()
    padded[0, 3] = 0
    far = s.clone()
    far[..., 3, :] += 100
    far[..., :, 3] += 100
    assert distill_losses.attention_loss([s], [far], padded).item() == pytest.approx(0.0, abs=1e-10)
    assert distill_losses.attention_loss([s], [far], mask).item() > 1.0


def test_soft_cross_entropy_is_smallest_at_the_teacher_distribution():
    teacher = torch.randn(5, 11)
    at_teacher = distill_losses.soft_cross_entropy(teacher.clone(), teacher, 2.0)
    entropy = -(teacher.div(2).softmax(-1) * teacher.div(2).log_softmax(-1)).sum(-1).mean()
    assert at_teacher.item() == pytest.approx(entropy.item(), rel=1e-5)
    for _ in range(5):
        assert distill_losses.soft_cross_entropy(teacher + torch.randn(5, 11), teacher, 2.0) > at_teacher


def test_teacher_layer_initialisation_copies_the_mapped_layers():
    teacher = _bert(layers=4, seed=1)
    student = _bert(layers=2, seed=2, vocab=30)
    to_teacher = torch.arange(10, 40)  # student token i = teacher token i + 10
    distill.init_from_teacher(student, teacher, distill_losses.layer_map(2, 4), to_teacher)
    for m, g in enumerate([2, 4]):
        for (name, a), b in zip(student.bert.encoder.layer[m].state_dict().items(),
                                teacher.bert.encoder.layer[g - 1].state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(student.bert.embeddings.word_embeddings.weight,
                               teacher.bert.embeddings.word_embeddings.weight[10:40])
    with pytest.raises(ToolError, match="hidden size"):
        distill.init_from_teacher(_bert(hidden=16), teacher, [2, 4], to_teacher)


def test_vocab_map_names_missing_tokens():
    assert distill.vocab_map(["[PAD]", "月"], {"[PAD]": 0, "光": 5, "月": 9}).tolist() == [0, 9]
    with pytest.raises(ToolError, match="not in the teacher"):
        distill.vocab_map(["[PAD]", "霜"], {"[PAD]": 0})


def test_augmentation_replaces_only_single_character_words():
    teacher = _bert(vocab=40)
    ids = np.array([[2, 10, 11, 12, 13, 14, 3, 0]])
    flags = np.array([[1, 1, 0, 1, 1, 1, 1, 1]], dtype=np.uint8)  # words: [10 11] [12] [13] [14]
    attn = np.array([[1, 1, 1, 1, 1, 1, 1, 0]])
    never = [0, 1, 2, 3, 4]
    out = distill.augment_words(teacher, np.arange(40), ids, flags, attn, 0.999, 3, np.random.default_rng(0), 4,
                                never)
    assert out[0, :3].tolist() == [2, 10, 11] and out[0, 6:].tolist() == [3, 0]
    assert not np.isin(out[0, 3:6], never).any()
    same = distill.augment_words(teacher, np.arange(40), ids, flags, attn, 0.0, 3, np.random.default_rng(0), 4,
                                 never)
    assert (same == ids).all()


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-layer teacher trained for a few steps on a tiny corpus (by tools pretrain)."""
    if not BASE_VOCAB.is_file():
        pytest.skip(f"{BASE_VOCAB} is not present (../shared holds bert-base-chinese's vocab)")
    from tools.__main__ import main

    root = tmp_path_factory.mktemp("distill")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"{LINES[i % 4]}{LINES[(i + 1) % 4]}第{i}篇。\n" for i in range(200)),
                      encoding="utf-8")
    run_dir = root / "teacher"
    assert main(["pretrain", "--data", str(corpus), "--run-dir", str(run_dir), "--shape", "4x32x2x64",
                 "--seq-len", "32", "--max-position", "32", "--batch-size", "8", "--test-fraction", "0.1",
                 "--threads", "1", "--lr", "3e-3", "--max-steps", "20", "--log-every", "10"]) == 0
    return corpus, run_dir / "checkpoint"


def _distill(corpus: Path, teacher: Path, run_dir: Path, *extra: str) -> int:
    from tools.__main__ import main

    return main(["distill", "--teacher", str(teacher), "--data", str(corpus), "--run-dir", str(run_dir),
                 "--student-shape", "2x32x2x64", "--seq-len", "32", "--batch-size", "8", "--test-fraction", "0.1",
                 "--threads", "1", "--lr", "3e-3", "--log-every", "5", *extra])


def test_tiny_distillation_runs_both_stages_and_writes_a_checkpoint(tiny_teacher, tmp_path):
    from transformers import BertForMaskedLM

    corpus, teacher = tiny_teacher
    run_dir = tmp_path / "student"
    assert _distill(corpus, teacher, run_dir, "--max-steps", "40", "--augment", "0.2") == 0
    model = BertForMaskedLM.from_pretrained(run_dir / "checkpoint")
    assert model.config.num_hidden_layers == 2
    assert wwm.read_vocab(run_dir / "checkpoint" / "vocab.txt") == wwm.read_vocab(teacher / "vocab.txt")
    info = json.loads((run_dir / "checkpoint" / "training.json").read_text(encoding="utf-8"))
    assert info["layer_map"] == [2, 4] and info["steps"] == 40 and info["teacher"] == str(teacher)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [m["stage"] for m in lines]
    assert stages == ["intermediate"] * 4 + ["prediction"] * 4
    first, last = lines[0], lines[3]
    # The intermediate losses fall as the student learns to imitate the teacher.
    assert last["loss"] < first["loss"]
    assert all(np.isfinite(m["loss"]) for m in lines)
    assert {"emb", "hidden", "attn"} <= first.keys() and {"soft_ce", "teacher_agree"} <= lines[-1].keys()

    # The student builds into a bundle like any checkpoint; its manifest says how it was made.
    from edge.manifest import Manifest
    from tools.__main__ import main

    bundle = tmp_path / "bundle"
    assert main(["build", "--source", str(run_dir / "checkpoint"), "--out", str(bundle), "--vocab", "0",
                 "--corpus", str(corpus), "--samples", "8"]) == 0
    training = Manifest.load(bundle).training
    assert training["teacher"] == str(teacher) and training["layer_map"] == [2, 4] and training["steps"] == 40


def test_distillation_refuses_bad_options_with_a_message(tiny_teacher, tmp_path, capsys):
    corpus, teacher = tiny_teacher
    assert _distill(corpus, teacher, tmp_path / "a", "--student-shape", "6x32x2x64", "--max-steps", "2") == 2
    assert "more layers" in capsys.readouterr().err
    assert _distill(corpus, teacher, tmp_path / "b", "--init", "teacher-layers", "--student-shape", "2x16x2x64",
                    "--max-steps", "2") == 2
    assert "hidden size" in capsys.readouterr().err
    assert _distill(corpus, tmp_path / "nowhere", tmp_path / "c", "--max-steps", "2") == 2
    assert "does not exist" in capsys.readouterr().err


def test_preset_names_resolve_to_hub_ids_and_a_local_folder_wins(tmp_path, monkeypatch):
    from tools.bundle.checkpoint import PRESETS, resolve_source

    assert resolve_source("rbt3") == "hfl/rbt3"
    assert resolve_source("chinese-roberta-wwm-ext") == "hfl/chinese-roberta-wwm-ext"
    assert resolve_source("some/other-model") == "some/other-model"
    assert all(p.hub_id.count("/") == 1 for p in PRESETS.values())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rbt3").mkdir()
    assert resolve_source("rbt3") == "rbt3"
