"""Scoring logic of ``python -m tools evaluate`` on fake engines and the tiny bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tools import ToolError
from tools.evaluation import evaluate as ev
from tools.evaluation import items as eval_items

MASK_RE = re.compile(r"(?:\[MASK\])+")


class InputError(ValueError):
    """Same shape as edge.engine.InputError."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class OracleEngine:
    """Knows the passages: answers the hidden character at rank ``rank`` (0-based)
    among fixed distractors; ``score_fillers`` prefers the filler in ``truth``."""

    def __init__(self, passages=(), rank=0, truth=None, quantization=None):
        from tools.evaluation.dev_sets import EVERYDAY

        # It also knows the everyday sentences, which evaluate measures too.
        self.passages = list(passages) + [text.replace("[MASK]", answer) for text, answer in EVERYDAY]
        self.rank = rank
        self.truth = truth or {}
        self.quantization = quantization
        self.closed = False

    def _hidden(self, text: str) -> str:
        at = text.index("[MASK]")
        for passage in self.passages:
            if passage.startswith(text[:at]) and passage.endswith(text[at + 6:]) and len(passage) == len(text) - 5:
                return passage[at]
        raise AssertionError(f"unknown text {text}")

    def predict(self, text, top_k=5, blank_length=None):
        if "坏" in text:
            raise InputError("text_too_long", "too long")
        answer = self._hidden(text)
        fillers = [c for c in "的一是了我不人在他有" if c != answer][:top_k]
        fillers.insert(self.rank, answer)
        return {"blanks": [{"start": text.index("[MASK]"), "length": 1,
                            "candidates": [{"text": f, "score": 0.1} for f in fillers[:top_k]],
                            "low_confidence": True}],
                "truncated": False, "cached": False, "elapsed_ms": 1.0, "model": {"name": "oracle"}}

    def score_fillers(self, text, fillers):
        assert len(MASK_RE.findall(text)) == 1, "exactly one blank expected"
        best = self.truth.get(text)
        return [0.0 if f == best else -5.0 - i for i, f in enumerate(fillers)]

    def info(self):
        return {"name": "oracle", "quantization": self.quantization, "random_init": False, "vocab_size": 10,
                "files": {"model.onnx": {"size": 1000, "sha256": "x"}}}

    def close(self):
        self.closed = True


PASSAGES = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "abc 123", "白日依山尽[MASK]", "黄河入海流。"]


def test_cloze_items_are_seeded_and_mask_one_cjk_character():
    items = eval_items.make_cloze_items(PASSAGES, None, seed=5)
    again = eval_items.make_cloze_items(PASSAGES, None, seed=5)
    assert items == again
    # Passages without CJK, or already holding a blank, are not used.
    assert sorted(i.passage for i in items) == [0, 1, 4]
    for item in items:
        assert item.text.count("[MASK]") == 1
        assert eval_items.CJK_RE.fullmatch(item.answer)
        assert item.text.replace("[MASK]", item.answer) == PASSAGES[item.passage]
    assert len(eval_items.make_cloze_items(PASSAGES, 2, seed=5)) == 2


def test_chid_text_uses_the_first_placeholder_and_drops_the_others():
    assert eval_items.chid_text("他#idiom#地工作，又#idiom#。") == "他[MASK][MASK][MASK][MASK]地工作，又。"
    with pytest.raises(ValueError):
        eval_items.chid_text("没有空")


def test_read_chid_validates_records(tmp_path):
    good = {"content": "他做事#idiom#。", "candidates": ["一丝不苟", "画蛇添足"], "answer": 0}
    path = tmp_path / "chid.json"
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n\n", encoding="utf-8")
    items = eval_items.read_chid(path)
    assert items[0].text == "他做事[MASK][MASK][MASK][MASK]。" and items[0].answer == 0
    path.write_text(json.dumps(dict(good, answer=5), ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ToolError, match=r"chid.json:1: answer 5"):
        eval_items.read_chid(path)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ToolError, match=r"chid.json:1"):
        eval_items.read_chid(path)


def test_cloze_top1_and_top5_count_ranks():
    items = eval_items.make_cloze_items(PASSAGES, None, seed=0)
    first = ev.evaluate_cloze(OracleEngine(PASSAGES, rank=0), items, workers=1)
    assert first["cloze_top1"] == 1.0 and first["cloze_top5"] == 1.0 and first["n_cloze"] == 3
    third = ev.evaluate_cloze(OracleEngine(PASSAGES, rank=2), items, workers=3)
    assert third["cloze_top1"] == 0.0 and third["cloze_top5"] == 1.0
    sixth = ev.evaluate_cloze(OracleEngine(PASSAGES, rank=5), items, workers=1)
    assert sixth["cloze_top5"] == 0.0


def test_rejected_queries_are_skipped_not_scored():
    passages = ["床前明月光。", "坏坏坏坏。"]
    items = eval_items.make_cloze_items(passages, None, seed=0)
    result = ev.evaluate_cloze(OracleEngine(passages), items, workers=1)
    assert result["n_cloze"] == 1 and result["cloze_skipped"] == 1 and result["cloze_top1"] == 1.0
    assert "text_too_long" in result["cloze_skip_reasons"][0]


def test_chid_picks_the_highest_joint_score():
    items = [eval_items.ChidItem(text=f"第{i}[MASK][MASK][MASK][MASK]", candidates=("甲甲甲甲", "乙乙乙乙", "丙丙丙丙"),
                         answer=i % 3, line=i) for i in range(6)]
    oracle = OracleEngine(truth={it.text: it.candidates[it.answer] for it in items})
    assert ev.evaluate_chid(oracle, items, workers=2)["chid_acc"] == 1.0
    # With no preference the first candidate wins the tie: right only when answer is 0.
    flat = ev.evaluate_chid(OracleEngine(), items, workers=1)
    assert flat["chid_acc"] == pytest.approx(2 / 6)
    assert flat["chid_chance"] == pytest.approx(1 / 3)


class FrequencyEngine:
    """Scores a filler by how common its character is, plus a bonus when the context
    (anything besides the blank) supports it: the shape of a small model's joint scores."""

    PRIOR = {"甲": -1.0, "乙": -3.0, "丙": -5.0}

    def __init__(self, truth):
        self.truth = truth

    def score_fillers(self, text, fillers):
        context = MASK_RE.sub("", text)
        return [sum(self.PRIOR[ch] for ch in f) + (2.0 if context and self.truth.get(text) == f else 0.0)
                for f in fillers]


def test_chid_pmi_removes_the_frequency_prior():
    # The answer is always the context's choice, but the common candidate 甲甲甲甲 has the
    # highest plain joint score unless the context bonus outweighs the prior gap.
    items = [eval_items.ChidItem(text=f"第{i}[MASK][MASK][MASK][MASK]", candidates=("甲甲甲甲", "乙乙乙乙", "丙丙丙丙"),
                         answer=i % 3, line=i) for i in range(6)]
    engine = FrequencyEngine({it.text: it.candidates[it.answer] for it in items})
    result = ev.evaluate_chid(engine, items, workers=2)
    assert result["chid_acc"] == pytest.approx(2 / 6)  # only where 甲甲甲甲 is the answer
    assert result["chid_acc_pmi"] == 1.0


def test_agreement_ignores_unanswered_items():
    assert ev.agreement(["a", "b", None, "c"], ["a", "x", "y", "c"]) == pytest.approx(2 / 3)
    assert ev.agreement([None], ["a"]) is None


def test_run_with_fake_engines_prints_json_and_writes_report(tmp_path, monkeypatch, capsys):
    from tools.__main__ import main

    text = tmp_path / "passages.txt"
    text.write_text("\n".join(PASSAGES) + "\n", encoding="utf-8")
    chid = tmp_path / "chid.json"
    chid.write_text(json.dumps({"content": "他做事#idiom#。", "candidates": ["一丝不苟", "画蛇添足"], "answer": 1},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    truth = {"他做事[MASK][MASK][MASK][MASK]。": "画蛇添足"}
    engines = {"int8": OracleEngine(PASSAGES, 0, truth, {"method": "quantize_dynamic", "weight_type": "QInt8"}),
               "fp32": OracleEngine(PASSAGES, 1, truth, None)}
    (tmp_path / "int8").mkdir()
    (tmp_path / "fp32").mkdir()
    monkeypatch.setattr(ev, "_open_engine", lambda path, threads: engines[Path(path).name])
    report = tmp_path / "report"
    rc = main(["evaluate", "--bundle", str(tmp_path / "int8"), "--compare", str(tmp_path / "fp32"),
               "--cloze-text", str(text), "--chid", str(chid), "--json", "--report", str(report), "--no-latency"])
    assert rc == 0
    out = capsys.readouterr().out
    figures = json.loads(out[out.index("["):])
    assert [f["quantization"] for f in figures] == ["int8", "fp32"]
    assert figures[0]["cloze_top1"] == 1.0 and figures[1]["cloze_top1"] == 0.0
    assert figures[0]["chid_acc"] == figures[1]["chid_acc"] == 1.0
    assert figures[1]["cloze_top1_agreement_with_first"] == 0.0
    assert figures[0]["n_cloze"] == 3 and figures[0]["n_chid"] == 1
    assert (figures[0]["everyday_top1"], figures[1]["everyday_top1"], figures[1]["everyday_top5"]) == (16, 0, 16)
    assert all(e.closed for e in engines.values())
    for name in ("evaluation.md", "evaluation.png", "evaluation.json"):
        assert (report / name).stat().st_size > 0
    assert "| oracle | – | – | int8 |" in (report / "evaluation.md").read_text(encoding="utf-8")


def test_json_for_one_bundle_has_the_documented_keys(tmp_path, monkeypatch, capsys):
    from tools.__main__ import main

    text = tmp_path / "passages.txt"
    text.write_text("\n".join(PASSAGES) + "\n", encoding="utf-8")
    (tmp_path / "b").mkdir()
    monkeypatch.setattr(ev, "_open_engine", lambda path, threads: OracleEngine(PASSAGES))
    assert main(["evaluate", "--bundle", str(tmp_path / "b"), "--cloze-text", str(text), "--chid", "",
                 "--json", "--no-latency"]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out[out.index("{"):])
    assert {"cloze_top1", "cloze_top5", "n_cloze"} <= figures.keys()
    assert figures["n_cloze"] == 3 and "n_chid" not in figures


def test_bad_paths_are_named(tmp_path, capsys):
    from tools.__main__ import main

    assert main(["evaluate", "--bundle", str(tmp_path / "nope"), "--cloze-text", "x"]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    assert main(["evaluate", "--bundle", str(tmp_path / "b"), "--cloze-text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_real_engine_on_the_tiny_bundle(tiny_bundle_dir, tmp_path):
    """End to end through edge.engine on the committed tiny bundle (random weights):
    only the plumbing is checked, the figures are whatever a tiny model gives."""
    from edge.engine import Engine

    engine = Engine.from_bundle(tiny_bundle_dir, threads=1)
    try:
        cloze = eval_items.make_cloze_items(["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"], None, seed=0)
        chid = [eval_items.ChidItem(text="他做事[MASK][MASK][MASK][MASK]。", candidates=("一丝不苟", "画蛇添足"),
                            answer=0, line=1)]
        result = ev.evaluate_engine(engine, cloze, chid, workers=2)
    finally:
        engine.close()
    assert result["n_cloze"] + result["cloze_skipped"] == 2
    assert result["n_chid"] == 1
    for key in ("cloze_top1", "cloze_top5", "chid_acc", "chid_acc_pmi"):
        assert result[key] is None or 0.0 <= result[key] <= 1.0


def test_cli_on_the_tiny_bundle_measures_latency_and_charts_it(tiny_bundle_dir, tmp_path, capsys):
    from tools.__main__ import main

    text = tmp_path / "passages.txt"
    text.write_text("\n".join(PASSAGES) + "\n", encoding="utf-8")
    report = tmp_path / "report"
    assert main(["evaluate", "--bundle", str(tiny_bundle_dir), "--cloze-text", str(text), "--chid", "",
                 "--json", "--threads", "1", "--name", "tiny", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out[out.index("{"):])
    assert figures["name"] == "tiny"
    assert 0 < figures["latency_ms_p90"] and 0 < figures["latency_ms_median"] <= figures["latency_ms_p90"]
    md = (report / "evaluation.md").read_text(encoding="utf-8")
    assert "| tiny | 2x32x2x64 | – | int8 |" in md and "latency (ms)" in md and "1 thread(s)" in md
    assert (report / "evaluation.png").stat().st_size > 0


def test_presets_table_lists_the_hub_checkpoints_and_times_a_bundle(tiny_bundle_dir, capsys):
    from tools.__main__ import main
    from tools.bundle.checkpoint import PRESETS

    assert main(["presets", "--json", "--bundle", str(tiny_bundle_dir), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    names = [r["name"] for r in rows]
    assert names[:len(PRESETS)] == list(PRESETS)
    base = rows[0]
    # bert-base-chinese: ~102 M parameters, ~5.5 GFLOP for a 32-token query.
    assert 100e6 < base["params"] < 105e6 and 5.0 < base["gflop"] < 6.0
    rbt3 = rows[names.index("rbt3")]
    assert rbt3["gflop"] < base["gflop"] / 3.5
    tiny = rows[-1]
    assert tiny["median_ms"] > 0 and tiny["pi4_ms"] > 0 and tiny["bundle_bytes"] > 0
