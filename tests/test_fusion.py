"""Fusion in the engine: the tiny bundle given the tiny word LM and the tiny poetry
memory (tests/make_tiny_knowledge.py) answers with sources and quotes; ``fusion:
false`` and a bundle without them answer from the model alone; scores stay
probabilities; the weights fit; bad knowledge files are refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.bundle import BundleError, load_bundle
from edge.engine import Engine
from edge.manifest import Manifest, file_entry
from tools.knowledge.lm import add_lm_to_bundle
from tools.knowledge.memory import add_memory_to_bundle

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_ARPA = FIXTURES / "tiny_lm" / "tiny.arpa"
TINY_POETRY = FIXTURES / "tiny_poetry"
POEM = "床前明月光，疑是地[MASK]霜。"


@pytest.fixture(scope="module")
def fused_bundle(tmp_path_factory, tiny_bundle_dir) -> Path:
    folder = tmp_path_factory.mktemp("fused") / "bundle"
    shutil.copytree(tiny_bundle_dir, folder)
    add_lm_to_bundle(folder, TINY_ARPA, license_id="Apache-2.0", provenance="tests/make_tiny_knowledge.py")
    add_memory_to_bundle(folder, TINY_POETRY, license_id="public domain", provenance="typed for the tests",
                         test_fraction=0.0)
    return folder


@pytest.fixture(scope="module")
def engine(fused_bundle):
    eng = Engine.from_bundle(fused_bundle, threads=1, batch_window_ms=0.0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def plain_engine(tiny_bundle_dir):
    eng = Engine.from_bundle(tiny_bundle_dir, threads=1, batch_window_ms=0.0)
    yield eng
    eng.close()


def test_the_manifest_lists_the_lm_and_the_memory_with_license_and_provenance(fused_bundle):
    manifest = load_bundle(fused_bundle).manifest  # sizes and sha256 of every file checked
    for name in ("lm.bin", "lm.LICENSE", "lm.README.md", "memory.bin", "memory.LICENSE", "memory.README.md"):
        assert name in manifest.files
    assert manifest.lm["order"] == 3 and manifest.lm["counts"] == {"1": 105, "2": 49, "3": 33}
    assert manifest.lm["license"] == "Apache-2.0" and manifest.lm["provenance"]
    assert manifest.memory["works"] == 9 and manifest.memory["license"] == "public domain"
    assert (fused_bundle / "lm.LICENSE").read_text(encoding="utf-8") == \
        (TINY_ARPA.parent / "LICENSE").read_text(encoding="utf-8")


def test_a_memory_hit_is_answered_with_its_source(engine):
    result = engine.predict(POEM)
    assert result["fusion"] is True
    blank = result["blanks"][0]
    top = blank["candidates"][0]
    assert top["text"] == "上"
    assert "memory" in top["sources"] and "lm" in top["sources"]
    assert top["quote"] == {"text": "床前明月光，疑是地上霜。", "title": "静夜思", "author": "李白",
                            "dynasty": "唐", "collection": "全唐诗"}
    # Sources are listed in a fixed order and name only the four sources.
    order = ("model", "lm", "memory", "context")
    for cand in blank["candidates"]:
        assert cand["sources"] and set(cand["sources"]) <= set(order)
        assert cand["sources"] == [s for s in order if s in cand["sources"]]


def test_fusion_false_is_the_model_alone(engine, plain_engine):
    alone = engine.predict(POEM, fusion=False)
    plain = plain_engine.predict(POEM)
    assert alone["fusion"] is False and plain["fusion"] is False
    strip = lambda r: [[(c["text"], c["score"], c["sources"]) for c in b["candidates"]] for b in r["blanks"]]
    assert strip(alone) == strip(plain)
    assert all(c["sources"] == ["model"] and "quote" not in c for c in alone["blanks"][0]["candidates"])
    # The fused answer really differs (the tiny model's weights are random).
    assert strip(engine.predict(POEM)) != strip(alone)


def test_a_bundle_without_lm_or_memory_answers_as_before(plain_engine, tiny_bundle_dir):
    assert plain_engine.fusion is None
    assert "fusion" not in plain_engine.info()
    result = plain_engine.predict("今天天气很[MASK]。", top_k=3)
    assert len(result["blanks"][0]["candidates"]) == 3
    assert Manifest.load(tiny_bundle_dir).lm is None


@pytest.mark.parametrize("text, blank_length, lengths", [
    (POEM, None, {1}),
    ("举头望明月，低头思[MASK][MASK]。", None, {2}),
    ("我们去[MASK]散步。", "auto", {1, 2, 3, 4}),
    ("[MASK]前明月光，疑是地[MASK]霜。", None, {1}),
    ("他做事总是[MASK][MASK][MASK][MASK]，让人放心。", None, {4}),
])
def test_fused_scores_are_probabilities(engine, text, blank_length, lengths):
    result = engine.predict(text, top_k=10, blank_length=blank_length)
    for blank in result["blanks"]:
        scores = [c["score"] for c in blank["candidates"]]
        assert scores == sorted(scores, reverse=True)
        assert all(0 < s <= 1 for s in scores) and sum(scores) <= 1 + 1e-3
        assert blank["low_confidence"] == (scores[0] < 0.6)
        assert {len(c["text"]) for c in blank["candidates"]} <= lengths
    if blank_length == "auto":  # candidates of every length compete in one distribution
        pool = engine.fused_candidates(text, blank_length)[0]
        assert {c.length for c in pool} == {1, 2, 3, 4}
        assert sum(c.probability for c in pool) <= 1 + 1e-9


def test_several_blanks_are_answered_together(engine):
    result = engine.predict("[MASK]前明月光，疑是地[MASK]霜。")
    first, second = result["blanks"]
    assert (first["start"], second["start"]) == (0, 14)
    assert first["candidates"][0]["text"] == "床" and second["candidates"][0]["text"] == "上"


def test_score_fillers_fused_is_a_distribution_over_the_fillers(engine, plain_engine):
    fillers = ["上", "下", "中", "明"]
    fused = engine.score_fillers(POEM, fillers)
    assert sum(math.exp(s) for s in fused) == pytest.approx(1.0)
    assert max(zip(fused, fillers))[1] == "上"
    assert engine.score_fillers(POEM, fillers, fusion=False) == pytest.approx(plain_engine.score_fillers(POEM, fillers))
    idioms = ["马到成功", "守株待兔", "一石二鸟"]
    assert sum(math.exp(s) for s in engine.score_fillers("他希望[MASK][MASK][MASK][MASK]。", idioms)) == \
        pytest.approx(1.0)


def test_info_says_what_is_fused(engine):
    fusion = engine.info()["fusion"]
    assert fusion["enabled"] and fusion["lm"]["order"] == 3 and fusion["memory"]["works"] == 9
    assert fusion["fitted"] is False  # the tiny bundle keeps the default weights
    assert set(fusion["weights"]) == {"char", "word", "auto"}


def test_the_http_api_takes_fusion_false_and_refuses_a_bad_value(engine):
    from edge.app import create_app

    client = create_app(engine=engine).test_client()
    fused = client.post("/api/predict", json={"text": POEM}).get_json()
    assert fused["fusion"] is True and "quote" in fused["blanks"][0]["candidates"][0]
    alone = client.post("/api/predict", json={"text": POEM, "fusion": False}).get_json()
    assert alone["fusion"] is False
    bad = client.post("/api/predict", json={"text": POEM, "fusion": "no"})
    assert bad.status_code == 400 and bad.get_json()["error"] == "bad_fusion"
    assert client.get("/api/info").get_json()["fusion"]["memory"]["works"] == 9


def test_the_cli_no_fusion_flag(fused_bundle, capsys):
    from edge.cli import main

    assert main(["predict", POEM, "--bundle", str(fused_bundle), "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["fusion"] is True
    assert main(["predict", POEM, "--bundle", str(fused_bundle), "--json", "--no-fusion", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["fusion"] is False
    assert main(["predict", POEM, "--bundle", str(fused_bundle), "--threads", "1"]) == 0
    assert "静夜思" in capsys.readouterr().out  # the table shows the quote under the answer


def test_a_corrupt_lm_or_memory_file_is_refused_naming_it(fused_bundle, tmp_path):
    for name in ("lm.bin", "memory.bin"):
        bad = tmp_path / name.replace(".", "_")
        shutil.copytree(fused_bundle, bad)
        (bad / name).write_bytes(b"FMARRAY1" + b"\xff" * 64)
        # A file that no longer matches the manifest is refused by the bundle check...
        with pytest.raises(BundleError, match=name):
            Engine.from_bundle(bad, threads=1)
        # ...and one listed with its new hash is refused by the reader, naming it.
        manifest = Manifest.load(bad)
        manifest.files[name] = file_entry(bad / name)
        manifest.save(bad)
        with pytest.raises(BundleError, match=str(bad / name)):
            Engine.from_bundle(bad, threads=1)


def test_a_filler_the_model_cannot_write_gets_an_indicator_not_a_floor():
    """A character outside the model's vocabulary (逑 of 君子好逑) is not scored as if the
    model gave it e^-25: its model feature is 0 and model_oov says why, with a fitted
    weight; a bundle fitted without that weight keeps the old penalty."""
    from edge.fusion import FEATURES, MODEL_FLOOR, OOV_DEFAULT_WEIGHT, Candidate, Fusion

    fusion = Fusion(None, None)
    rows = fusion.feature_matrix([Candidate("逑", model=None, lm=-3.0), Candidate("好", model=-30.0, lm=-1.0)])
    oov, known = rows
    assert oov[FEATURES.index("model")] == 0.0 and oov[FEATURES.index("model_oov")] == 1.0
    assert known[FEATURES.index("model")] == MODEL_FLOOR and known[FEATURES.index("model_oov")] == 0.0
    old_fit = Fusion(None, None, {"weights": {"char": {"model": 0.6, "lm": 0.3}}, "fitted": True})
    assert old_fit.settings["weights"]["char"]["model_oov"] == OOV_DEFAULT_WEIGHT


def test_a_longer_filler_is_scored_on_the_characters_the_model_can_write(engine):
    """A four-character filler with one character the model lacks gets the model's ln p
    of the other three and model_oov 1 (not model 0, which beat every ordinary filler
    of a four-character blank, whose ln p is around -16); one it can write whole gets
    its sum and model_oov 0; a one-character filler is as before."""
    from edge.fusion import FEATURES, Candidate

    vocab = [ch for ch in engine.char_token if len(ch) == 1 and "\u4e00" <= ch <= "\u9fff"]
    a, b, c = vocab[:3]
    lacking = next(chr(cp) for cp in range(0x9FA5, 0x4E00, -1) if chr(cp) not in engine.char_token)
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(len(engine.id_to_token)), size=4))
    value, missing = engine._writable_logp(logp, a + b + lacking + c)
    expected = sum(float(logp[k, engine.char_token[ch]]) for k, ch in ((0, a), (1, b), (3, c)))
    assert missing == 1 and value == pytest.approx(expected)
    whole = sum(float(logp[k, engine.char_token[ch]]) for k, ch in enumerate(a + b + c + a))
    assert engine._writable_logp(logp, a + b + c + a) == (pytest.approx(whole), 0)
    assert engine._writable_logp(logp, lacking * 4) == (None, 4)
    assert engine._writable_logp(logp[:1], lacking) == (None, 1)
    assert engine._writable_logp(logp[:1], a) == (pytest.approx(float(logp[0, engine.char_token[a]])), 0)
    rows = engine.fusion.feature_matrix([Candidate(a + b + lacking + c, model=value, unwritten=missing),
                                         Candidate(lacking * 4, model=None, unwritten=4)])
    assert rows[0][FEATURES.index("model")] == pytest.approx(expected)
    assert rows[0][FEATURES.index("model_oov")] == 1.0
    assert rows[1][FEATURES.index("model")] == 0.0 and rows[1][FEATURES.index("model_oov")] == 4.0


def test_fit_weights_recovers_a_decisive_feature():
    from edge.fusion import FEATURES
    from tools.knowledge.fusion import FitItem, fit_weights

    rng = np.random.default_rng(0)
    items = []
    for _ in range(300):
        f = np.zeros((6, len(FEATURES)))
        f[:, FEATURES.index("lm")] = rng.normal(size=6)
        f[:, FEATURES.index("model")] = rng.normal(size=6)  # noise
        truth = 2.0 * f[:, FEATURES.index("lm")]
        p = np.exp(truth - truth.max())
        items.append(FitItem(f, int(rng.choice(6, p=p / p.sum())), True, "synthetic", np.array([1.0, 0.0])))
    weights, info = fit_weights(items, ("model", "lm"))
    assert weights["lm"] == pytest.approx(2.0, abs=0.5)
    assert abs(weights["model"]) < 0.4
    assert weights["null"] < -2  # the answer is always among the candidates
    assert info["items"] == 300


def test_development_queries_run_through_the_engine_for_the_fit(engine):
    from tools.evaluation.dev_sets import BlankItem
    from tools.knowledge.fusion import collect, fit_weights, KIND_FEATURES

    queries = [BlankItem(POEM, "上"), BlankItem("春眠不觉晓，处处闻啼[MASK]。", "鸟"),
               BlankItem("白日依山尽，黄河入海[MASK]。", "流"), BlankItem("我们去公[MASK]散步。", "园"),
               BlankItem("红豆生南[MASK]，春来发几枝。", "国"), BlankItem("不知细叶谁裁[MASK]", "出")]
    items = collect(engine, queries)
    assert len(items) == len(queries)
    assert all(i.answer >= 0 for i in items)  # every answer was among the candidates
    weights, info = fit_weights(items, KIND_FEATURES["char"], l2=0.1)
    assert set(weights) == set(KIND_FEATURES["char"]) | {"null", "null_z"}
