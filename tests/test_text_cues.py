"""What the query's own text says (edge/text_cues.py) and how the fusion uses it: a
filler repeated elsewhere in the text between the same neighbours (echo), a filler whose
rare characters the text already has (cohesion), the memory matched on both sides or
over the whole query."""

from __future__ import annotations

import pytest

from edge.fusion import FEATURES, MEM_WHOLE_CONTEXT, Candidate, Fusion
from edge.phrase_memory import MemoryHit
from edge.text_cues import cohesion, echoes


def test_a_filler_repeated_between_the_same_neighbours_is_an_echo():
    left = "有杕之杜，生于道左。彼君子兮，噬肯适我？有杕之"
    right = "，生于道周。"
    found = echoes(left, 1, right)
    # 杜 sits after 有杕之 (3 characters) and before ，生于道 (4): 7 in all.
    assert found["杜"] == 7
    # Every echo matched at least two neighbour characters.
    assert all(v >= 2 for v in found.values())


def test_the_blank_itself_and_one_character_of_context_are_no_echo():
    assert echoes("我们", 1, "天") == {}  # nothing repeats
    # "今天" occurs once apart from the blank, with only one neighbour matching: no echo.
    assert "天" not in echoes("今天好。今", 1, "不")
    # Two-character fillers: 北京 repeats between 在 and 工作.
    assert echoes("他在北京工作，我也在", 2, "工作。") == {"北京": 3}


def test_echo_counts_each_side_up_to_its_cap():
    run = "春夏秋冬东南西北金木"  # ten characters on each side of both places
    found = echoes(run + "甲" + run + "。" + run, 1, run, max_side=8)
    assert found == {"甲": 16}


def test_cohesion_counts_only_characters_rarer_than_common():
    rarity = {"炭": 5.3, "雪": 4.7, "中": 2.2, "送": 4.1}.get
    chars = set("冬天下雪，他把炭送到了中学")
    value = cohesion("雪中送炭", chars, lambda ch: rarity(ch, 6.0))
    # 中 is common (counts nothing); 雪, 送, 炭 count by how much rarer than 1e-4 they are.
    assert value == pytest.approx(((4.7 - 4.0) + (4.1 - 4.0) + (5.3 - 4.0)) / 2)
    assert cohesion("画蛇添足", chars, lambda ch: rarity(ch, 6.0)) == 0.0


def test_the_new_features_are_in_the_matrix():
    fusion = Fusion(None, None)
    both = MemoryHit(filler="翠", left=5, right=10, count=1, position=0, available=15)  # the whole query
    one_side = MemoryHit(filler="杨", left=0, right=3, count=3, position=9, available=15)
    rows = fusion.feature_matrix([
        Candidate("翠", model=-3.0, lm=-5.0, memory=both),
        Candidate("杨", model=-1.0, lm=0.0, memory=one_side, echo=3, cohesion=0.5),
    ])
    col = {name: FEATURES.index(name) for name in FEATURES}
    assert rows[0, col["mem_two3"]] == 1.0 and rows[1, col["mem_two3"]] == 0.0
    assert rows[0, col["mem_whole"]] == 1.0 and rows[1, col["mem_whole"]] == 0.0
    assert rows[1, col["echo"]] == pytest.approx(0.75) and rows[1, col["cohesion"]] == 0.5


def test_a_line_the_memory_holds_whole_reads_as_classical():
    """The modern LM knows famous phrases (不亦乐乎) and took 学而时习之 for modern text; a
    query the memory matches whole is classical."""
    fusion = Fusion(None, None)
    whole = MemoryHit(filler="说", left=8, right=1, count=1, position=0, available=9)
    partial = MemoryHit(filler="乐", left=2, right=1, count=1, position=0, available=9)
    assert whole.context >= MEM_WHOLE_CONTEXT
    assert fusion.register("学而时习之，不亦", "乎", [whole]) == -1.0
    assert fusion.register("学而时习之，不亦", "乎", [partial]) == 0.0  # no LM: no register


def test_the_engine_proposes_echoes_as_context(tiny_bundle_dir, tmp_path):
    """Through the engine: a filler the text repeats is a candidate with the source
    'context', which the API lists after the others."""
    import shutil

    from edge.engine import Engine
    from tools.knowledge.lm import add_lm_to_bundle
    from tests.test_fusion import TINY_ARPA

    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, folder)
    add_lm_to_bundle(folder, TINY_ARPA, license_id="Apache-2.0", provenance="tests")
    engine = Engine.from_bundle(folder, threads=1, batch_window_ms=0.0)
    try:
        text = "小明喜欢吃苹果，小红也喜欢吃苹[MASK]。"
        pool = engine.fused_candidates(text)[0]
        echo = next(c for c in pool if c.text == "果")
        assert "context" in echo.sources and echo.echo == 4  # 喜欢吃苹 before it, not 。 after
        assert engine._fused_item(echo)["sources"][-1] == "context"  # as the API lists it
    finally:
        engine.close()
