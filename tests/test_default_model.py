"""The embedded default model: trained, sensible on everyday sentences, and its
manifest's accuracy figures are what it really scores."""

from __future__ import annotations

import pytest

from edge.bundle import load_bundle
from edge.engine import Engine

# Everyday sentences with one obvious character missing (written before looking at the
# model's answers; none of them is in the training corpus verbatim).
EVERYDAY = [
    ("床前明月光，疑是地[MASK]霜。", "上"),
    ("今天天气很好，我们去公[MASK]散步吧。", "园"),
    ("他每天早上都喝一杯咖[MASK]。", "啡"),
    ("我在北京上大[MASK]，学的是计算机。", "学"),
    ("春眠不觉晓，处处闻啼[MASK]。", "鸟"),
    ("请把窗户关上，外面风太[MASK]了。", "大"),
    ("妈妈做的饭菜非常好[MASK]。", "吃"),
    ("我们明天上午九点在学校门[MASK]见面。", "口"),
    ("火车晚点了半个小[MASK]。", "时"),
    ("学而时习之，不亦说[MASK]？", "乎"),
    ("中华人民共和[MASK]成立于一九四九年。", "国"),
    ("这部电影太好看了，我想再看一[MASK]。", "遍"),
    ("他生病了，今天没有来上[MASK]。", "班"),
    ("白日依山尽，黄河入海[MASK]。", "流"),
    ("我的手机没[MASK]了，借你的充电器用一下。", "电"),
    ("周末我们一起去超市买东[MASK]吧。", "西"),
]
# Share of EVERYDAY whose answer must be among the top 5. The shipped model scores
# 9 of 16 (the ones before it 10, 10, 8, 8, 7, 3 and 0 of 16); the floor is one below that, because
# INT8 kernels differ between CPUs and a close call may flip. A regression floor, not
# a quality bar: a model that answered these sensibly would score 12+ (see README,
# "state of the embedded default model").
MIN_TOP5 = 8 / 16


@pytest.fixture(scope="module")
def engine():
    eng = Engine.from_bundle(None, threads=2)
    yield eng
    eng.close()


def test_the_default_bundle_is_a_trained_model_with_measured_accuracy():
    manifest = load_bundle(None).manifest
    assert not manifest.random_init
    accuracy = manifest.evaluation["accuracy"]
    assert {"int8", "fp32", "chid_chance"} <= accuracy.keys()
    assert accuracy["int8"]["n_cloze"] >= 1000 and accuracy["int8"]["n_chid"] >= 200
    assert manifest.training["steps"] > 0 and manifest.training["train_minutes"] > 0
    # Trained in several runs: the manifest carries each phase and the totals over them.
    phases = manifest.training["phases"]
    assert phases and phases[-1]["steps"] == manifest.training["steps"]
    assert manifest.training["total_train_minutes"] == pytest.approx(sum(p["train_minutes"] for p in phases), abs=0.01)
    size = sum(e.size for e in manifest.files.values())
    assert size <= 20e6, f"default bundle is {size / 1e6:.1f} MB (target ≤ 20 MB)"


def test_everyday_sentences_get_the_obvious_answer_in_the_top_five(engine):
    hits = []
    for text, answer in EVERYDAY:
        result = engine.predict(text, top_k=5)
        fillers = [c["text"] for c in result["blanks"][0]["candidates"]]
        hits.append(answer in fillers)
    share = sum(hits) / len(hits)
    missed = [t for (t, _), h in zip(EVERYDAY, hits) if not h]
    assert share >= MIN_TOP5, f"only {share:.0%} in the top 5; missed: {missed}"


def test_chid_accuracy_in_the_manifest_is_reproduced(engine, shared_dir):
    """The ChID figure shipped in the manifest is what the bundle scores now (all of
    dev_few_all.json, through the same evaluation code)."""
    from tools import evaluate as ev

    chid_file = shared_dir / "data" / "fewclue" / "chid" / "dev_few_all.json"
    if not chid_file.is_file():
        pytest.skip(f"{chid_file} is not present")
    shipped = load_bundle(None).manifest.evaluation["accuracy"]["int8"]
    items = ev.read_chid(chid_file)
    result = ev.evaluate_chid(engine, items, workers=1)
    assert result["n_chid"] == shipped["n_chid"]
    # INT8 activation scales are per batch, so batched evaluation may flip a close call.
    assert result["chid_acc"] == pytest.approx(shipped["chid_acc"], abs=0.015)
    assert result["chid_acc_pmi"] == pytest.approx(shipped["chid_acc_pmi"], abs=0.015)
    # The plain joint score of this small model is at chance (it favours idioms of common
    # characters, see README); the context-minus-prior (PMI) score must beat chance.
    assert result["chid_acc_pmi"] > 1 / 7 + 0.04, "the context adds nothing over chance"
