"""The exact phrase memory: built from the training split only, hits with their
source and how much of the query matched, read without mapping the file, deterministic
bytes, bad files refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge.phrase_memory import PhraseMemory, PhraseMemoryError, normalize_query
from tools.knowledge.memory import build_memory, read_works

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_POETRY = FIXTURES / "tiny_poetry"


@pytest.fixture(scope="module")
def memory(tmp_path_factory) -> PhraseMemory:
    out = tmp_path_factory.mktemp("memory") / "memory.bin"
    build_memory(TINY_POETRY, out, test_fraction=0.0)
    return PhraseMemory(out)


def test_a_famous_line_is_recalled_with_its_source(memory):
    hits = memory.lookup("床前明月光，疑是地", 1, "霜。")
    assert hits[0].filler == "上"
    assert (hits[0].left, hits[0].right) == (9, 2)  # all of the left context and 霜。 matched
    assert hits[0].source == {"text": "床前明月光，疑是地上霜。", "title": "静夜思", "author": "李白",
                              "dynasty": "唐", "collection": "全唐诗"}
    assert hits[0].cover == 1.0  # the whole query is the line
    # Context the corpus does not have around the line: only part of the query matched.
    longer = memory.lookup("今天我读了：床前明月光，疑是地", 1, "霜。这首诗。")[0]
    assert longer.filler == "上" and longer.context == 11 and longer.cover == pytest.approx(11 / 21)
    # A two-character blank, and a blank at the start (right context only).
    assert memory.lookup("举头望明月，低头思", 2, "。")[0].filler == "故乡"
    assert memory.lookup("", 1, "前明月光")[0].filler == "床"
    # Chapters of the classics carry their collection, and half-width punctuation matches.
    hit = memory.lookup("学而时习之,不亦", 1, "乎?")[0]
    assert hit.filler == "说" and hit.source["title"] == "学而篇" and hit.source["collection"] == "论语"


def test_lookups_read_the_file_without_mapping_it(memory):
    """The memory is read with pread: after lookups no page of memory.bin is mapped
    into the process (so it adds nothing to the service's resident memory)."""
    memory.lookup("床前明月光，疑是地", 1, "霜。")
    memory.lookup("举头望明月，低头思", 2, "。")
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this system")
    assert str(memory.path) not in maps.read_text()


def test_unknown_contexts_give_no_hits(memory):
    assert memory.lookup("我在银行", 1, "钱。") == []
    assert memory.lookup("", 1, "") == []


def test_held_apart_documents_are_not_in_the_memory(tmp_path):
    """Each document that the training split holds apart (the same hash rule as
    pretrain) is absent; every other one is present."""
    from tools.train.corpus import is_test_document, record_text, to_simplified

    out = tmp_path / "memory.bin"
    meta = build_memory(TINY_POETRY, out, test_fraction=0.5)
    memory = PhraseMemory(out)
    records = json.loads((TINY_POETRY / "全唐诗" / "poet.tang.0.json").read_text(encoding="utf-8"))
    held = [r for r in records if is_test_document(to_simplified(record_text(r)), 0.5)]
    kept = [r for r in records if r not in held]
    assert held and kept, "the fixture should have documents on both sides of a 50% split"
    assert meta["held_apart_documents"] >= len(held)
    for record in held:
        for line in record["paragraphs"]:  # (the fixture's works share no line)
            assert memory.count(normalize_query(line)) == 0, line
    for record in kept:
        assert memory.count(normalize_query(record["paragraphs"][0])) >= 1


def test_works_keep_title_author_and_dynasty_in_nested_collections(tmp_path):
    folder = tmp_path / "corpus" / "蒙学"
    folder.mkdir(parents=True)
    (folder / "tangshisanbaishou.json").write_text(json.dumps({
        "title": "唐詩三百首", "content": [{"type": "五言絕句", "content": [
            {"chapter": "登鸛雀樓", "author": "王之渙", "paragraphs": ["白日依山盡，黃河入海流。"]}]}]},
        ensure_ascii=False), encoding="utf-8")
    (folder / "qianjiashi.json").write_text(json.dumps({
        "title": "千家詩", "content": [{"content": [
            {"chapter": "春眠", "author": "（唐）孟浩然", "paragraphs": ["春眠不覺曉，處處聞啼鳥。"]}]}]},
        ensure_ascii=False), encoding="utf-8")
    (folder / "odd.json").write_text(json.dumps([  # a title with a line break and a tab in it
        {"title": "题\n壁\t一", "author": "某", "paragraphs": ["绿树村边合，青山郭外斜。"]}], ensure_ascii=False),
        encoding="utf-8")
    works, _ = read_works(tmp_path / "corpus", test_fraction=0.0)
    got = {(w.title, w.author, w.dynasty, w.collection, w.paragraphs[0]) for w in works}
    assert ("登鹳雀楼", "王之涣", "唐", "唐诗三百首", "白日依山尽，黄河入海流。") in got
    assert ("春眠", "孟浩然", "唐", "千家诗", "春眠不觉晓，处处闻啼鸟。") in got
    out = tmp_path / "memory.bin"
    build_memory(tmp_path / "corpus", out, test_fraction=0.0)
    memory = PhraseMemory(out)
    assert memory.lookup("绿树村边", 1, "，青山")[0].source["title"] == "题 壁 一"
    assert memory.lookup("白日依山尽，黄河入海", 1, "。")[0].source["title"] == "登鹳雀楼"


def test_the_build_is_deterministic(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    build_memory(TINY_POETRY, a, test_fraction=0.0)
    copy = tmp_path / "elsewhere" / TINY_POETRY.name  # the same corpus in another place
    shutil.copytree(TINY_POETRY, copy)
    build_memory(copy, b, test_fraction=0.0)
    assert a.read_bytes() == b.read_bytes()


def test_a_corrupt_memory_file_is_refused_naming_it(tmp_path):
    good = tmp_path / "memory.bin"
    build_memory(TINY_POETRY, good, test_fraction=0.0)
    data = good.read_bytes()
    for name, blob in [("magic.bin", b"XXXXXXXX" + data[8:]), ("short.bin", data[: len(data) - 100])]:
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(PhraseMemoryError) as info:
            PhraseMemory(path)
        assert str(path) in str(info.value)


def test_the_shipped_memory_holds_the_training_split_of_chinese_poetry(shared_dir):
    """Counts in the default bundle's manifest match the split computed now: every
    chinese-poetry document is either in the memory or held apart, none both."""
    from edge.bundle import load_bundle
    from tools.train.corpus import CJK_RE, _records_of_json_file, corpus_files, is_test_document, record_text, \
        to_simplified

    memory = load_bundle(None).manifest.memory
    if memory is None:
        pytest.skip("the default bundle carries no phrase memory")
    poetry = shared_dir / "data" / "poetry"
    held = kept = 0
    for file in corpus_files(poetry):
        if file.suffix != ".json":
            continue
        for record in _records_of_json_file(file):
            text = record_text(record)
            if CJK_RE.search(text):
                if is_test_document(to_simplified(text), memory["test_fraction"]):
                    held += 1
                else:
                    kept += 1
    assert (memory["documents"], memory["held_apart_documents"]) == (kept, held)
