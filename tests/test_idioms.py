"""The idiom contexts (``idioms.bin``): built from a corpus for the word LM's idioms,
held-apart documents left out, the same bytes twice, the cue favouring the idiom whose
usual neighbourhood the query has, idiom questions without answers counted by their
posterior (held-apart ones left out), files of the first format still read, carried by
the engine into the fused ranking, and a corrupt file refused naming it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from edge.bundle import BundleError
from edge.engine import Engine
from edge.arrays_file import write_arrays
from edge.idiom_context import FORMAT_1, IdiomContext, IdiomContextError
from edge.manifest import Manifest, file_entry
from tools import ToolError
from tools.knowledge.idioms import IDIOMS_FILE, add_idioms_to_bundle, build_idioms
from tools.knowledge.lm import add_lm_to_bundle
from tools.train.corpus import is_test_document

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_ARPA = FIXTURES / "tiny_lm" / "tiny.arpa"  # its words include 马到成功 and 守株待兔
RABBIT = "农夫坐在树下守株待兔，等着兔子撞到树上。"
SUCCESS = "将军出征，马到成功，凯旋而归，战士们欢呼胜利。"
QUERY_RABBIT = "那个农夫整天坐在树桩旁边[MASK][MASK][MASK][MASK]，盼着再捡到一只兔子。"


SNAKE_QUESTION = "他画完了蛇，又给蛇添上四只脚，真是#idiom#，酒也没喝到。"
QUERY_SNAKE = "画好的蛇偏要添上脚，这就是[MASK][MASK][MASK][MASK]，多此一举。"


def _write_corpus(folder: Path, texts: list[str], questions: list[dict] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stories.json", "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"content": text}, ensure_ascii=False) + "\n")
    if questions:
        with open(folder / "unlabeled.json", "w", encoding="utf-8") as handle:
            for record in questions:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return folder


@pytest.fixture(scope="module")
def idiom_bundle(tmp_path_factory, tiny_bundle_dir) -> Path:
    root = tmp_path_factory.mktemp("idioms")
    folder = root / "bundle"
    shutil.copytree(tiny_bundle_dir, folder)
    add_lm_to_bundle(folder, TINY_ARPA, license_id="Apache-2.0", provenance="tests/make_tiny_knowledge.py")
    corpus = _write_corpus(root / "corpus", [RABBIT, RABBIT.replace("农夫", "老汉"), SUCCESS, SUCCESS + "大家"])
    add_idioms_to_bundle(folder, corpus, test_fraction=0.0, provenance="typed for the tests", license_note="none")
    return folder


def test_the_manifest_lists_the_idioms_file_with_its_counts(idiom_bundle):
    manifest = Manifest.load(idiom_bundle)
    assert manifest.idioms["idioms"] == 2 and manifest.idioms["idiom_occurrences"] == 4
    assert manifest.idioms["files"] == [IDIOMS_FILE, "idioms.README.md"]
    for name in manifest.idioms["files"]:
        assert manifest.files[name].size == (idiom_bundle / name).stat().st_size
    assert "typed for the tests" in (idiom_bundle / "idioms.README.md").read_text(encoding="utf-8")


def test_the_idiom_whose_neighbourhood_the_query_has_scores_higher(idiom_bundle):
    table = IdiomContext(idiom_bundle / IDIOMS_FILE)
    assert len(table) == 2 and table.occurrences("守株待兔") == 2 and table.occurrences("画蛇添足") == 0
    left, right = QUERY_RABBIT.split("[MASK][MASK][MASK][MASK]")
    rabbit, success, absent = table.scores(["守株待兔", "马到成功", "画蛇添足"], left, right)
    assert rabbit > 0 > success  # 农夫, 树, 兔, 子 are near 守株待兔 and not near 马到成功
    assert absent == 0.0  # no evidence either way for an idiom the corpus lacks
    # A query with nothing the corpus has near either idiom says nothing either way.
    assert table.scores(["守株待兔"], "", "") == [0.0]


def test_the_same_corpus_gives_the_same_bytes_and_held_apart_documents_are_left_out(tmp_path):
    # Find one story the 2% split holds apart and one it keeps (the rule training uses).
    kept = next(f"{RABBIT}{i}" for i in range(1000) if not is_test_document(f"{RABBIT}{i}", 0.5))
    apart = next(f"{SUCCESS}{i}" for i in range(1000) if is_test_document(f"{SUCCESS}{i}", 0.5))
    corpus = _write_corpus(tmp_path / "corpus", [kept, apart])
    first = build_idioms(corpus, {"守株待兔", "马到成功"}, tmp_path / "a.bin", test_fraction=0.5)
    build_idioms(corpus, {"守株待兔", "马到成功"}, tmp_path / "b.bin", test_fraction=0.5)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert first["documents"] == 1 and first["held_apart_documents"] == 1
    table = IdiomContext(tmp_path / "a.bin")
    assert "守株待兔" in table and "马到成功" not in table  # only in the held-apart story
    with pytest.raises(ToolError, match="no training documents"):
        build_idioms(corpus, {"守株待兔"}, tmp_path / "c.bin", test_fraction=1.0)


def test_questions_without_answers_add_their_candidates_expected_counts(tmp_path):
    # 画蛇添足 is in no story; three questions about a snake with feet offer it beside
    # 马到成功, whose stories are about generals. The posterior favours 画蛇添足 (no
    # evidence against it, and the snake passage is unlike 马到成功's), so it is counted
    # with the snake's characters; 马到成功 gets the rest, less than once.
    stories = [SUCCESS, SUCCESS + "大家"]
    question = {"content": SNAKE_QUESTION, "candidates": ["马到成功", "画蛇添足"]}
    answered = next({"content": f"农夫#idiom#，天天坐在树下{i}。", "candidates": ["守株待兔", "画蛇添足"], "answer": 0}
                    for i in range(60) if not is_test_document(f"农夫守株待兔，天天坐在树下{i}。", 0.5))
    kept = [dict(question, content=SNAKE_QUESTION + "!" * i) for i in range(60)
            if not is_test_document(SNAKE_QUESTION + "!" * i, 0.5)][:3]
    apart = next(dict(question, content=SNAKE_QUESTION + "?" * i) for i in range(60)
                 if is_test_document(SNAKE_QUESTION + "?" * i, 0.5))
    keep_stories = [t for t in (f"{s}{i}" for s in stories for i in range(60)) if not is_test_document(t, 0.5)][:4]
    corpus = _write_corpus(tmp_path / "corpus", keep_stories, kept + [apart, answered])
    idioms = {"守株待兔", "马到成功"}
    # alpha 3 instead of 3000: a corpus of a few sentences is evidence enough here.
    meta = build_idioms(corpus, idioms, tmp_path / "a.bin", test_fraction=0.5, alpha=3.0)
    assert meta["questions"] == 3 and meta["held_apart_questions"] == 1  # the answered one is running text
    table = IdiomContext(tmp_path / "a.bin")
    assert 2.0 < table.occurrences("画蛇添足") <= 3.0
    assert table.occurrences("守株待兔") == 1.0  # the answered record's text, counted whole
    left, right = QUERY_SNAKE.split("[MASK][MASK][MASK][MASK]")
    snake, success = table.scores(["画蛇添足", "马到成功"], left, right)
    assert snake > 0 > success
    # Without the questions the snake idiom is unknown: no evidence either way.
    build_idioms(corpus, idioms, tmp_path / "b.bin", test_fraction=0.5, alpha=3.0, iterations=0)
    assert "画蛇添足" not in IdiomContext(tmp_path / "b.bin")
    build_idioms(corpus, idioms, tmp_path / "c.bin", test_fraction=0.5, alpha=3.0)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "c.bin").read_bytes()


def test_a_file_of_the_first_format_reads_its_integer_counts(tmp_path):
    import numpy as np

    arrays = {
        "words_utf8": np.frombuffer("守株待兔".encode("utf-8"), dtype=np.uint8),
        "off": np.array([0, 2], dtype=np.uint32),
        "chars": np.array(sorted([ord("兔"), ord("树")]), dtype=np.uint16),
        "counts": np.array([3, 1] if ord("兔") < ord("树") else [1, 3], dtype=np.uint8),
        "totals": np.array([4], dtype=np.uint32),
        "occurrences": np.array([2], dtype=np.uint32),
        "bg_chars": np.array(sorted([ord("兔"), ord("树"), ord("天")]), dtype=np.uint16),
        "bg_counts": np.array([10, 10, 10], dtype=np.uint32),
    }
    write_arrays(tmp_path / "old.bin", arrays, {"format": FORMAT_1, "window": 30, "alpha": 3.0,
                                                 "corpus_characters": 30, "idioms": 1})
    table = IdiomContext(tmp_path / "old.bin")
    assert table.occurrences("守株待兔") == 2.0
    # 兔 (3 of 4 near the idiom, 1/3 of the corpus): ln[(3 + 1) / ((4 + 3) / 3)] / 10.
    assert table.scores(["守株待兔"], "兔", "")[0] == pytest.approx(math.log(4 / (7 / 3)) / 10)


def test_a_bundle_without_a_word_lm_is_refused(tmp_path, tiny_bundle_dir):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, folder)
    with pytest.raises(ToolError, match="no word LM"):
        add_idioms_to_bundle(folder, _write_corpus(tmp_path / "corpus", [RABBIT]))


def test_the_engine_gives_the_cue_to_given_idioms(idiom_bundle):
    engine = Engine.from_bundle(idiom_bundle, threads=1, batch_window_ms=0.0)
    try:
        assert engine.info()["fusion"]["idioms"]["idioms"] == 2
        segments = QUERY_RABBIT.split("[MASK][MASK][MASK][MASK]")
        ranked = engine._fused_given(segments, ["马到成功", "守株待兔"], [-20.0, -20.0])
        assert ranked[1].assoc > 0 > ranked[0].assoc
        column = engine.fusion.feature_matrix(ranked)[:, -1]
        assert list(column) == [ranked[0].assoc, ranked[1].assoc]
        scores = engine.score_fillers(QUERY_RABBIT, ["马到成功", "守株待兔"])  # ln p over the two
        assert sum(math.exp(s) for s in scores) == pytest.approx(1.0)
    finally:
        engine.close()


def test_a_corrupt_idioms_file_is_refused_naming_it(idiom_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(idiom_bundle, bad)
    (bad / IDIOMS_FILE).write_bytes(b"FMARRAY1" + b"\xff" * 64)
    manifest = Manifest.load(bad)
    manifest.files[IDIOMS_FILE] = file_entry(bad / IDIOMS_FILE)
    manifest.save(bad)
    with pytest.raises(BundleError, match=str(bad / IDIOMS_FILE)):
        Engine.from_bundle(bad, threads=1)
    with pytest.raises(IdiomContextError, match="a.bin"):
        IdiomContext(tmp_path / "a.bin")  # missing
