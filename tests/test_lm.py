"""The word n-gram LM: ARPA → lm.bin conversion, KenLM parity, segmentation into LM
words, and bad files refused with a message naming them."""

from __future__ import annotations

import json
import random
import re
import tarfile
from pathlib import Path

import pytest

from edge.ngram_lm import FillerScorer, NgramLM, NgramLMError
from tools import ToolError
from tools.knowledge.lm import convert, read_arpa

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_ARPA = FIXTURES / "tiny_lm" / "tiny.arpa"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> NgramLM:
    out = tmp_path_factory.mktemp("lm") / "lm.bin"
    convert(TINY_ARPA, out)
    return NgramLM(out)


def kenlm_model(arpa_text: str, folder: Path):
    """KenLM on an ARPA text. KenLM refuses a model without <s> / </s> (this one, like
    libime's, has none), so they are added as unigrams; with bos=False, eos=False
    they take no part in any score."""
    kenlm = pytest.importorskip("kenlm", reason="kenlm (the reference scorer) is in the test extra")
    count = int(re.search(r"ngram 1=(\d+)", arpa_text).group(1))
    marked = arpa_text.replace(f"ngram 1={count}", f"ngram 1={count + 2}", 1)
    marked = marked.replace("\\1-grams:\n", "\\1-grams:\n-99\t<s>\t0\n-99\t</s>\n", 1)
    path = folder / "marked.arpa"
    path.write_text(marked, encoding="utf-8")
    return kenlm.Model(str(path))


def error_bound(lm: NgramLM, words: int) -> float:
    """Most a sentence's log10 score can differ from KenLM's: per word one probability
    and up to two back-off weights, each off by at most its codebook's rounding."""
    e = lm.max_error
    p = max(e.get("uni_p", 0), e.get("bi_p", 0), e.get("tri_p", 0))
    bo = max(e.get("uni_bo", 0), e.get("ctx_bo", 0))
    return words * (p + 2 * bo) + 1e-6


def test_tiny_lm_scores_equal_kenlm_within_the_rounding(tiny_lm, tmp_path):
    model = kenlm_model(TINY_ARPA.read_text(encoding="utf-8"), tmp_path)
    rng = random.Random(0)
    words = [w for w in tiny_lm.words if w != "<unk>"] + ["没有的词"]
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    sentences += ["床前 明月 光", "疑是 地上 霜", "我们 去 公园 散步"]
    for sentence in sentences:
        ours = tiny_lm.score_words(sentence.split())
        ref = model.score(sentence, bos=False, eos=False)
        assert ours == pytest.approx(ref, abs=error_bound(tiny_lm, len(sentence.split()))), sentence


def test_shipped_lm_scores_equal_kenlm_on_held_apart_sentences(shared_dir, tmp_path):
    """The default bundle's lm.bin against KenLM on the ARPA it was converted from,
    over a few hundred held-apart sentences segmented as the engine segments them."""
    from edge.bundle import load_bundle

    bundle = load_bundle(None)
    if bundle.manifest.lm is None:
        pytest.skip("the default bundle carries no word LM")
    archive = shared_dir / "data" / "lm" / bundle.manifest.lm["source_file"]
    if not archive.is_file():
        pytest.skip(f"{archive} is not present")
    from tools.knowledge.lm import file_sha256, open_arpa

    assert file_sha256(archive) == bundle.manifest.lm["source_sha256"], "lm.bin was made from another file"
    handle, _ = open_arpa(archive)
    with handle:
        model = kenlm_model(handle.read(), tmp_path)
    lm = NgramLM(bundle.path / "lm.bin")
    chid = shared_dir / "data" / "fewclue" / "chid" / "dev_few_all.json"
    texts = [json.loads(line)["content"] for line in chid.read_text(encoding="utf-8").splitlines() if line]
    runs = [r for t in texts for r in re.findall(r"[\u4e00-\u9fff]{2,}", t)][:400]
    assert len(runs) >= 300
    for run in runs:
        _, words = lm.best_segmentation(run)
        ref = model.score(" ".join(words), bos=False, eos=False)
        assert lm.score_words(words) == pytest.approx(ref, abs=error_bound(lm, len(words))), run


def test_a_candidate_is_scored_as_a_word_with_its_neighbours(tiny_lm):
    # 公 + 园 make the LM word 公园: the best segmentation uses it...
    score, words = tiny_lm.best_segmentation("我们去公园散步")
    assert words == ["我们", "去", "公园", "散步"]
    # ...and among fillers of 我们去公[MASK]散步, 园 wins because it forms that word.
    scorer = FillerScorer(tiny_lm, "我们去公", "散步")
    scores = {f: scorer.score(f) for f in ["园", "司", "上", "明", "好"]}
    assert max(scores, key=scores.get) == "园"
    assert scores["园"] == pytest.approx(score)
    # Both sides count: 地上 needs the left neighbour, 上霜 is no word: 上 still first.
    scorer = FillerScorer(tiny_lm, "疑是地", "霜")
    assert max(["上", "下", "明", "霜"], key=scorer.score) == "上"


def test_filler_scores_equal_the_exact_viterbi(tiny_lm):
    rng = random.Random(1)
    chars = sorted({ch for w in tiny_lm.words if w != "<unk>" for ch in w})
    for left, right in [("我们去公", "散步"), ("疑是地", "霜"), ("", "明月光"), ("中国的首都是", ""), ("他在银", "工作")]:
        scorer = FillerScorer(tiny_lm, left, right, beam=None)
        fillers = rng.sample(chars, 20) + ["".join(rng.sample(chars, 2)) for _ in range(10)] + ["公园", "北京"]
        for filler in fillers:
            assert scorer.score(filler) == pytest.approx(tiny_lm.best_segmentation(left + filler + right)[0], abs=1e-9)


def test_conversion_is_deterministic_and_reads_tar_archives(tmp_path):
    archive = tmp_path / "tiny.arpa.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(TINY_ARPA, arcname="tiny.arpa")
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    convert(TINY_ARPA, a)
    convert(TINY_ARPA, b)
    assert a.read_bytes() == b.read_bytes()  # same input, same bytes
    convert(archive, c)  # the same model read from the archive: same tables
    from edge.arrays_file import ArraysFile

    plain, packed = ArraysFile(a), ArraysFile(c)
    assert plain.names() == packed.names()
    for name in plain.names():
        assert plain.array(name).tobytes() == packed.array(name).tobytes(), name


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("\\end\\", ""), "no \\\\end\\\\ line"),
    (lambda t: t.replace("ngram 2=49", "ngram 2=50"), "announces 50 2-grams"),
    (lambda t: t.replace("-2.007133\t一个", "zz\t一个"), "bad number"),
    (lambda t: t.replace("\\data\\", "\\data\\\nngram 4=1"), "order 4"),
    (lambda t: "hello\n", "no \\\\data\\\\ section"),
])
def test_bad_arpa_files_are_refused_naming_the_file(tmp_path, edit, message):
    bad = tmp_path / "bad.arpa"
    bad.write_text(edit(TINY_ARPA.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(ToolError, match=message) as info:
        read_arpa(bad)
    assert str(bad) in str(info.value)


def test_a_missing_or_non_utf8_arpa_is_refused(tmp_path):
    with pytest.raises(ToolError, match="not found"):
        read_arpa(tmp_path / "nope.arpa")
    bad = tmp_path / "latin1.arpa"
    bad.write_bytes(TINY_ARPA.read_text(encoding="utf-8").encode("gb18030"))
    with pytest.raises(ToolError, match="not UTF-8") as info:
        read_arpa(bad)
    assert str(bad) in str(info.value)


def test_a_corrupt_lm_file_is_refused_naming_it(tmp_path):
    good = tmp_path / "lm.bin"
    convert(TINY_ARPA, good)
    data = good.read_bytes()
    for name, blob in [("magic.bin", b"NOTANLM!" + data[8:]), ("short.bin", data[: len(data) // 2]),
                       ("tiny.bin", b"FMARRAY1")]:
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(NgramLMError) as info:
            NgramLM(path)
        assert str(path) in str(info.value)


def test_the_vocabulary_finds_every_word_and_nothing_else(tiny_lm):
    """The compact vocabulary (keys by binary search, no dict of words) gives each word
    its rank as id, and the words at a position exactly as a dict of all words would."""
    from edge.ngram_lm import NO_WORD

    words = list(tiny_lm.words)
    assert words == sorted(words) and len(words) == len(tiny_lm.words)
    ids = {w: i for i, w in enumerate(words)}
    for w, i in ids.items():
        assert tiny_lm.words.index_of(w) == i and tiny_lm.words[i] == w and w in tiny_lm.words
    chars = sorted({ch for w in words if w != "<unk>" for ch in w}) + ["鑫"]
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 9)))
        assert tiny_lm.words.index_of(text) == ids.get(text, NO_WORD)
        start = rng.randrange(len(text))
        expected = [(e, ids[text[start:e]]) for e in range(start + 1, min(len(text), start + tiny_lm.max_word_chars) + 1)
                    if text[start:e] in ids]
        if not expected or expected[0][0] != start + 1:
            expected.insert(0, (start + 1, tiny_lm.unk))
        assert tiny_lm.words_at(text, start) == expected, (text, start)


def test_the_default_lm_vocabulary_round_trips():
    """Every one of the shipped LM's 165 k words (up to 13 characters) maps to its id."""
    path = Path(__file__).resolve().parents[1] / "edge" / "default_bundle" / "lm.bin"
    if not path.is_file():
        pytest.skip("the default bundle carries no lm.bin")
    lm = NgramLM(path)
    words = lm.words
    assert all(words.index_of(words[i]) == i for i in range(len(words)))
    assert any(len(w) > 4 for w in words)  # the dict of long words is exercised too
    assert words.index_of("疑是地") == -1 and lm.word_id("疑是地") == lm.unk
