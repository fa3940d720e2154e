"""The engine on the committed tiny bundle: parsing, joint scoring, batching, cache, errors.

The tiny model has random weights, so these tests check the mechanics against
independent computations (direct ONNX Runtime runs, exhaustive enumeration), not
the quality of the answers (that is tests/test_default_model.py's job).
"""

from __future__ import annotations

import math
import shutil
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from edge.blanks import find_blanks
from edge.bundle import BundleError, load_bundle
from edge.engine import LOW_CONFIDENCE_HINT, Engine, InputError

POEM = "床前明月光，疑是地[MASK]霜。"


@pytest.fixture(scope="module")
def engine(tiny_fp32_bundle_dir):
    """The FP32 tiny bundle: exact comparisons with direct ONNX Runtime runs."""
    eng = Engine.from_bundle(tiny_fp32_bundle_dir, threads=1, batch_window_ms=0.0, cache_size=0)
    yield eng
    eng.close()


def direct_logits(engine, ids, positions):
    """Run the bundle's ONNX model directly (no batcher, no padding)."""
    session = ort.InferenceSession(str(engine.bundle.model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "mask_positions": np.array([positions], dtype=np.int64),
    })[0][0]


def valid_softmax(engine, logits):
    x = np.where(engine.invalid, -np.inf, logits.astype(np.float64))
    p = np.exp(x - x.max())
    return p / p.sum()


def test_find_blanks_groups_adjacent_masks():
    segments, blanks = find_blanks("他[MASK][mask] [MASK]好，我［MASK］。")
    assert [b.n_masks for b in blanks] == [3, 1]
    assert segments == ["他", "好，我", "。"]
    assert blanks[0].start == 1 and blanks[1].start == len("他[MASK][mask] [MASK]好，我")


def test_single_blank_matches_direct_onnx_run(engine):
    result = engine.predict(POEM, top_k=5)
    (blank,) = result["blanks"]
    assert blank["start"] == POEM.index("[MASK]") and blank["length"] == 1
    ids = [engine.cls_id] + engine.tokenizer.encode("床前明月光，疑是地", add_special_tokens=False).ids
    position = len(ids)
    ids += [engine.mask_id] + engine.tokenizer.encode("霜。", add_special_tokens=False).ids + [engine.sep_id]
    probs = valid_softmax(engine, direct_logits(engine, ids, [position])[0])
    expected = np.argsort(-probs)[:5]
    assert [c["text"] for c in blank["candidates"]] == [engine.id_to_token[i] for i in expected]
    for cand, index in zip(blank["candidates"], expected):
        assert cand["score"] == pytest.approx(probs[index], rel=1e-3)
    assert result["model"]["random_init"] is True
    assert result["truncated"] is False and result["cached"] is False


def test_candidates_never_special_or_wordpiece(engine):
    result = engine.predict("[MASK][MASK]是[MASK]", top_k=20)
    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    for blank in result["blanks"]:
        for cand in blank["candidates"]:
            assert cand["text"] not in specials
            assert "##" not in cand["text"] and "[unused" not in cand["text"] and "[UNK]" not in cand["text"]


def test_low_confidence_flag_and_hint(engine):
    blank = engine.predict(POEM)["blanks"][0]
    # A random tiny model spreads probability thinly: far under 0.6.
    assert blank["candidates"][0]["score"] < 0.6
    assert blank["low_confidence"] is True and blank["hint"] == LOW_CONFIDENCE_HINT


def test_multichar_blank_scores_are_joint_chain_rule(engine):
    text = "他做事总是[MASK][MASK]，让人放心。"
    result = engine.predict(text, top_k=5)
    candidates = result["blanks"][0]["candidates"]
    assert result["blanks"][0]["length"] == 2
    assert all(len(c["text"]) == 2 for c in candidates)
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
    joint = engine.score_fillers(text, [c["text"] for c in candidates])
    for cand, logp in zip(candidates, joint):
        assert cand["score"] == pytest.approx(math.exp(logp), rel=1e-3)


def test_wide_beam_equals_exhaustive_joint_search(tiny_fp32_bundle_dir):
    """With a beam as wide as the vocabulary, beam search is exact: compare with enumeration."""
    eng = Engine.from_bundle(tiny_fp32_bundle_dir, threads=1, batch_window_ms=0.0, cache_size=0, beam_width=600, max_batch=1024)
    try:
        text = "一[MASK][MASK]鸟"
        got = eng.predict(text, top_k=3)["blanks"][0]["candidates"]
        # Exhaustive: p(c1) * p(c2 | c1) for every valid c1, c2.
        left = [eng.cls_id] + eng.tokenizer.encode("一", add_special_tokens=False).ids
        right = eng.tokenizer.encode("鸟", add_special_tokens=False).ids + [eng.sep_id]
        p1 = valid_softmax(eng, direct_logits(eng, left + [eng.mask_id, eng.mask_id] + right, [len(left)])[0])
        valid = np.flatnonzero(~eng.invalid)
        session = ort.InferenceSession(str(eng.bundle.model_path), providers=["CPUExecutionProvider"])
        ids = np.array([left + [int(c), eng.mask_id] + right for c in valid], dtype=np.int64)
        logits = session.run(None, {
            "input_ids": ids, "attention_mask": np.ones_like(ids),
            "mask_positions": np.full((len(valid), 1), len(left) + 1, dtype=np.int64),
        })[0][:, 0]
        joint = np.array([p1[c] * valid_softmax(eng, row) for c, row in zip(valid, logits)])
        flat = np.argsort(-joint, axis=None)[:3]
        expected = [(eng.id_to_token[valid[i // joint.shape[1]]] + eng.id_to_token[i % joint.shape[1]], joint.flat[i]) for i in flat]
        assert [c["text"] for c in got] == [t for t, _ in expected]
        for cand, (_, p) in zip(got, expected):
            assert cand["score"] == pytest.approx(p, rel=1e-3)
    finally:
        eng.close()


def test_several_blanks_are_consistent(engine):
    text = "我们[MASK]去吃[MASK]吧。"
    result = engine.predict(text, top_k=5)
    a, b = result["blanks"]
    # Easy-first: the blank answered second was answered given the first one's best fill.
    first_is_a = a["candidates"][0]["score"] >= b["candidates"][0]["score"]
    if first_is_a:
        again = engine.predict(text.replace("[MASK]", a["candidates"][0]["text"], 1), top_k=5)
        assert again["blanks"][0]["candidates"] == b["candidates"]
    else:
        tail = text.rsplit("[MASK]", 1)
        again = engine.predict(tail[0] + b["candidates"][0]["text"] + tail[1], top_k=5)
        assert again["blanks"][0]["candidates"] == a["candidates"]


def test_blank_length_option_and_auto(engine):
    fixed = engine.predict("今天天气很[MASK]。", blank_length=2)
    assert fixed["blanks"][0]["length"] == 2
    assert all(len(c["text"]) == 2 for c in fixed["blanks"][0]["candidates"])
    auto = engine.predict("今天天气很[MASK]。", blank_length="auto", top_k=10)
    lengths = {len(c["text"]) for c in auto["blanks"][0]["candidates"]}
    assert lengths <= {1, 2, 3, 4}
    scores = [c["score"] for c in auto["blanks"][0]["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert auto["blanks"][0]["length"] == len(auto["blanks"][0]["candidates"][0]["text"])


def test_long_text_keeps_window_around_blank(engine):
    filler = "我们一起去吃饭吧。" * 100  # far beyond the tiny model's window
    text = filler + "床前明月光，疑是地[MASK]霜。" + filler
    result = engine.predict(text)
    assert result["truncated"] is True
    assert result["blanks"][0]["start"] == text.index("[MASK]")
    # The window is centred on the blank, so the answer matches the short context's
    # model input only in length; the point is it answers instead of failing.
    assert len(result["blanks"][0]["candidates"]) == 5


@pytest.mark.parametrize(
    "text,kwargs,code",
    [
        ("", {}, "empty_text"),
        ("   ", {}, "empty_text"),
        ("没有空格的句子。", {}, "no_blank"),
        ("[MASK]" + "，[MASK]" * 8, {}, "too_many_blanks"),
        ("好" * 5000 + "[MASK]", {}, "text_too_long"),
        (POEM, {"top_k": 0}, "bad_top_k"),
        (POEM, {"top_k": 21}, "bad_top_k"),
        (POEM, {"top_k": "5"}, "bad_top_k"),
        (POEM, {"blank_length": 9}, "bad_blank_length"),
        (POEM, {"blank_length": "long"}, "bad_blank_length"),
        ("他" + "[MASK]" * 9, {}, "bad_blank_length"),
        (123, {}, "bad_text"),
    ],
)
def test_bad_input_raises_input_error(engine, text, kwargs, code):
    with pytest.raises(InputError) as info:
        engine.predict(text, **kwargs)
    assert info.value.code == code
    assert info.value.message
    # ...and the engine still answers afterwards.
    assert engine.predict(POEM)["blanks"]


def test_blanks_too_far_apart_for_the_window(engine):
    text = "[MASK]" + "好" * (engine.window + 10) + "[MASK]"
    with pytest.raises(InputError) as info:
        engine.predict(text)
    assert info.value.code == "text_too_long"


def test_cache_answers_repeats(tiny_bundle_dir):
    eng = Engine.from_bundle(tiny_bundle_dir, threads=1, cache_size=2)
    try:
        first = eng.predict(POEM)
        second = eng.predict(POEM)
        assert first["cached"] is False and second["cached"] is True
        assert second["blanks"] == first["blanks"]
        second["blanks"][0]["candidates"].clear()  # callers may mutate their copy
        assert eng.predict(POEM)["blanks"] == first["blanks"]
        assert eng.stats()["cache_hits"] == 2
        eng.predict("今天[MASK]气很好。")
        eng.predict("我们去吃[MASK]。")  # evicts the poem (size 2)
        assert eng.predict(POEM)["cached"] is False
    finally:
        eng.close()


def run_concurrently(bundle, texts, **settings):
    """Ask all texts at once from as many threads; return answers and engine stats."""
    eng = Engine.from_bundle(bundle, threads=1, cache_size=0, **settings)
    results: dict = {}
    barrier = threading.Barrier(len(texts))

    def ask(text):
        barrier.wait()
        results[text] = eng.predict(text)["blanks"]

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = eng.stats()
    eng.close()
    return results, stats


BATCH_TEXTS = [
    POEM, "今天天气很[MASK]。", "我们一起去[MASK]饭吧。", "他做事总是[MASK][MASK][MASK][MASK]，让人放心。",
    "[MASK]前明月光", "北京是中国的首[MASK]。", "她笑着说[MASK][MASK]。", "画蛇添[MASK]。",
]


@pytest.mark.parametrize("kind", ["fp32", "static", "int4"])
def test_concurrent_requests_are_batched_with_identical_results(kind, request):
    """FP32, static INT8 (scales fixed at build time) and int4 weight-only (activations
    quantized per row inside the kernel): a row's logits do not depend on its batch
    mates, so batched answers equal one-at-a-time ones (dynamic INT8's move with them)."""
    bundle = request.getfixturevalue(f"tiny_{kind}_bundle_dir")
    expected, _ = run_concurrently(bundle, BATCH_TEXTS, batch_window_ms=0.0, max_batch=1)
    got, stats = run_concurrently(bundle, BATCH_TEXTS, batch_window_ms=50.0, max_batch=64)
    assert max(stats["batch_size_counts"]) > 1, stats  # requests really shared batches
    for text in BATCH_TEXTS:
        assert [[c["text"] for c in b["candidates"]] for b in got[text]] == \
            [[c["text"] for c in b["candidates"]] for b in expected[text]]
        for gb, wb in zip(got[text], expected[text]):
            for gc, wc in zip(gb["candidates"], wb["candidates"]):
                assert gc["score"] == pytest.approx(wc["score"], rel=1e-4)


@pytest.mark.parametrize("kind", ["fp32", "static", "int4"])
def test_a_rows_logits_are_bit_identical_whatever_its_batch_mates(kind, request):
    """At equal padded length, a row's logits are exactly the same alone and beside
    any mates for FP32 and static INT8, and within float rounding for int4 (dynamic
    INT8 is the one quantization whose activation scales depend on the mates)."""
    from edge.manifest import Manifest

    bundle = request.getfixturevalue(f"tiny_{kind}_bundle_dir")
    manifest = Manifest.load(bundle)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    special = manifest.special_ids
    seq = 24

    def rows(n):
        ids = rng.integers(special["[MASK]"] + 1, manifest.vocab_size, size=(n, seq)).astype(np.int64)
        ids[:, 0], ids[:, -1] = special["[CLS]"], special["[SEP]"]
        ids[:, 5] = special["[MASK]"]
        return ids

    row = rows(1)
    alone = session.run(None, {"input_ids": row, "attention_mask": np.ones_like(row),
                               "mask_positions": np.array([[5]], dtype=np.int64)})[0][0]
    for mates in (1, 3, 7):
        batch = np.concatenate([row, rows(mates)])
        mask = np.ones_like(batch)
        for i in range(1, len(batch)):  # mates of other lengths, padded to the row's
            length = int(rng.integers(8, seq))
            batch[i, length:], mask[i, length:] = special["[PAD]"], 0
        got = session.run(None, {"input_ids": batch, "attention_mask": mask,
                                 "mask_positions": np.full((len(batch), 1), 5, dtype=np.int64)})[0][0]
        if kind == "int4":
            # MatMulNBits' kernel sums in an order that depends on the row count on some
            # CPUs (1.2e-7 measured on an AVX2 EPYC without AVX-512 or VNNI; exact on the
            # machine where this test was written), so int4 is held to float rounding.
            assert np.abs(got - alone).max() <= 1e-5, (kind, mates, float(np.abs(got - alone).max()))
        else:
            assert np.array_equal(got, alone), (kind, mates, float(np.abs(got - alone).max()))


def test_int8_batched_answers_stay_within_quantization_noise(tiny_bundle_dir):
    """INT8 (dynamic): activation scales are computed per batch, so scores move a
    little with batch contents; the answers must stay essentially the same."""
    expected, _ = run_concurrently(tiny_bundle_dir, BATCH_TEXTS, batch_window_ms=0.0, max_batch=1)
    got, stats = run_concurrently(tiny_bundle_dir, BATCH_TEXTS, batch_window_ms=50.0, max_batch=64)
    assert max(stats["batch_size_counts"]) > 1, stats
    for text in BATCH_TEXTS:
        for gb, wb in zip(got[text], expected[text]):
            g = {c["text"]: c["score"] for c in gb["candidates"]}
            w = {c["text"]: c["score"] for c in wb["candidates"]}
            shared = set(g) & set(w)
            assert len(shared) >= 3, (text, g, w)
            for cand in shared:
                assert g[cand] == pytest.approx(w[cand], rel=0.15), (text, cand)


def test_bundle_verification_names_file_and_values(tiny_bundle_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, copy)
    load_bundle(copy)  # intact copy loads
    with open(copy / "tokenizer.json", "ab") as handle:
        handle.write(b" ")
    with pytest.raises(BundleError, match=r"tokenizer\.json: size mismatch: manifest says \d+ bytes, file has \d+"):
        load_bundle(copy)
    shutil.copy(tiny_bundle_dir / "tokenizer.json", copy / "tokenizer.json")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch: manifest says [0-9a-f]{64}, file has [0-9a-f]{64}"):
        load_bundle(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx: missing"):
        load_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_info_and_stats(engine):
    info = engine.info()
    assert info["random_init"] is True and "RANDOM" in info["warning"]
    assert info["vocab_size"] == engine.manifest.vocab_size
    assert info["threads"] == 1
    stats = engine.stats()
    assert stats["batches_total"] >= 1 and stats["inferences_total"] >= stats["batches_total"]


def test_packaged_bundles_load_by_name():
    """Bundles shipped in edge/bundles/ are chosen by name (--bundle distilled-2x128)."""
    from edge.bundle import PACKAGED_BUNDLES_DIR, BundleError, load_bundle

    names = sorted(p.name for p in PACKAGED_BUNDLES_DIR.iterdir() if p.is_dir())
    assert "distilled-2x128" in names
    bundle = load_bundle("distilled-2x128")
    assert bundle.path == PACKAGED_BUNDLES_DIR / "distilled-2x128"
    assert not bundle.manifest.random_init and bundle.manifest.training["teacher"]
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle("no-such-bundle")


def test_a_lone_query_does_not_wait_the_batch_window(tiny_fp32_bundle_dir):
    """The batcher waits for company only while another call is at work in the engine:
    with a 5 s window a query alone is still answered at once (it used to wait the
    whole window, which every single HTTP query paid)."""
    import time

    eng = Engine.from_bundle(tiny_fp32_bundle_dir, threads=1, batch_window_ms=5000.0, cache_size=0)
    try:
        started = time.monotonic()
        eng.predict("今天天气很[MASK]。")
        assert time.monotonic() - started < 4.0
        assert eng.batcher._busy() is False  # nothing else in flight now
    finally:
        eng.close()


def test_two_sessions_share_the_queue_and_answer_as_one(tiny_fp32_bundle_dir):
    """--sessions 2: two ONNX Runtime sessions (one thread each) take batches from the
    same queue; concurrent requests run on both and get the answers one session gives."""
    expected, _ = run_concurrently(tiny_fp32_bundle_dir, BATCH_TEXTS, batch_window_ms=0.0, max_batch=1)
    results: dict[str, dict] = {}
    eng = Engine.from_bundle(tiny_fp32_bundle_dir, threads=2, sessions=2, batch_window_ms=0.0, max_batch=1,
                             cache_size=0)
    try:
        assert len(eng.sessions) == 2 and eng.info()["sessions"] == 2 and eng.threads_per_session == 1

        def ask(text: str) -> None:
            for _ in range(5):
                results[text] = eng.predict(text)

        threads = [threading.Thread(target=ask, args=(t,)) for t in BATCH_TEXTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        per_worker = eng.stats()["worker_batches"]
    finally:
        eng.close()
    assert len(per_worker) == 2 and min(per_worker) > 0, per_worker  # both sessions ran batches
    for text in BATCH_TEXTS:
        got, want = results[text]["blanks"], expected[text]
        assert [[c["text"] for c in b["candidates"]] for b in got] == [[c["text"] for c in b["candidates"]] for b in want]
        for gb, wb in zip(got, want):
            for gc, wc in zip(gb["candidates"], wb["candidates"]):
                assert gc["score"] == pytest.approx(wc["score"], rel=1e-4)


def test_sessions_must_fit_the_threads(tiny_bundle_dir):
    with pytest.raises(ValueError, match="3 sessions need at least as many threads, got 2"):
        Engine.from_bundle(tiny_bundle_dir, threads=2, sessions=3)
    with pytest.raises(ValueError, match="sessions must be a positive integer"):
        Engine.from_bundle(tiny_bundle_dir, threads=2, sessions=0)


def test_spin_modes_answer_alike_and_a_bad_mode_is_refused(tiny_bundle_dir):
    from edge.cli import build_parser
    from edge.engine import spin_mode

    assert [spin_mode(v) for v in (True, False, "query", "off", "always")] == \
        ["always", "off", "query", "off", "always"]
    answers = []
    for mode in ("off", "query", "always"):
        eng = Engine.from_bundle(tiny_bundle_dir, threads=2, spin=mode, batch_window_ms=0.0, cache_size=0)
        try:
            assert eng.info()["spin"] == mode
            answers.append(eng.predict("今天天气很[MASK]。")["blanks"][0]["candidates"])
        finally:
            eng.close()
    assert [c["text"] for c in answers[0]] == [c["text"] for c in answers[1]] == [c["text"] for c in answers[2]]
    with pytest.raises(ValueError, match="spin must be one of"):
        Engine.from_bundle(tiny_bundle_dir, threads=1, spin="sometimes")
    parser = build_parser()
    assert parser.parse_args(["serve"]).spin == "query"  # the default
    assert parser.parse_args(["serve", "--spin"]).spin == "always"  # the old flag keeps its meaning
    assert parser.parse_args(["serve", "--spin", "off"]).spin == "off"


@pytest.mark.parametrize("by_length", [False, True])
def test_batching_by_length_keeps_buckets_apart_and_answers_everyone(by_length):
    from edge.batcher import MicroBatcher, Row

    seen: list[tuple[int, int]] = []  # (rows, padded length) of each run
    started, gate = threading.Event(), threading.Event()

    def run(ids, mask, positions):
        started.set()
        gate.wait(5)  # the first run holds the worker while the others queue up
        seen.append(ids.shape)
        return np.repeat(mask.sum(axis=1, keepdims=True)[:, :, None], 3, axis=2).astype(np.float32)

    batcher = MicroBatcher(run, pad_id=0, window_ms=0.0, max_rows=16, buckets=(8, 16, 32), by_length=by_length)
    try:
        blocker = batcher.submit_async([Row(ids=[1] * 3, positions=[0])])
        assert started.wait(5)
        lengths = [5, 30, 6, 12, 7, 31, 14]
        futures = [batcher.submit_async([Row(ids=[1] * n, positions=[0])]) for n in lengths]
        gate.set()
        answers = [f.result(timeout=10)[0][0, 0] for f in futures]
        assert blocker.result(timeout=10)[0][0, 0] == 3
    finally:
        batcher.close()
    assert answers == lengths  # each row got its own logits back, whatever its batch
    if by_length:
        # first come first served by bucket: the 8s with the first (5), then the 32s with
        # the oldest set aside (30), then the 16s; never a 5-token row padded to 32
        assert seen[1:] == [(3, 8), (2, 32), (2, 16)]
    else:
        assert seen[1:] == [(7, 32)]  # everything queued ran together, padded to the longest


def test_batching_by_length_with_two_workers_answers_everyone():
    from edge.batcher import MicroBatcher, Row

    def run(ids, mask, positions):
        time.sleep(0.002)
        return np.repeat(mask.sum(axis=1, keepdims=True)[:, :, None], 3, axis=2).astype(np.float32)

    batcher = MicroBatcher([run, run], pad_id=0, window_ms=1.0, max_rows=4, buckets=(8, 16, 32), by_length=True)
    try:
        lengths = [(i * 7) % 31 + 1 for i in range(60)]
        futures = [batcher.submit_async([Row(ids=[1] * n, positions=[0])]) for n in lengths]
        assert [f.result(timeout=10)[0][0, 0] for f in futures] == lengths
        assert all(count > 0 for count in batcher.stats()["worker_batches"])  # both workers took work
    finally:
        batcher.close()


@pytest.mark.parametrize("kind, arena, padded", [
    ("", False, "exact"),        # dynamic INT8: its rows move with their mates anyway
    ("", True, "bucket"),        # the memory arena keeps a block per shape
    ("fp32", False, "bucket"),   # batch-independent: a row keeps its padded length
    ("static", False, "bucket"),
])
def test_lone_query_padding_by_quantization(kind, arena, padded, request):
    """A lone query runs at its own length on dynamic INT8 bundles and padded to its
    length bucket on the batch-independent ones (and whenever the arena is on)."""
    bundle = request.getfixturevalue(f"tiny_{kind + '_' if kind else ''}bundle_dir")
    engine = Engine.from_bundle(bundle, threads=1, cache_size=0, memory_arena=arena)
    seen = []
    runner = engine.batcher.runners[0]

    def recording(input_ids, attention_mask, mask_positions):
        seen.append(input_ids.shape)
        return runner(input_ids, attention_mask, mask_positions)

    engine.batcher.runners[0] = recording
    try:
        text = "床前明月光，疑是地[MASK]霜。"
        tokens = len(engine.tokenizer.encode(text).ids)
        result = engine.predict(text)
    finally:
        engine.close()
    assert result["blanks"][0]["candidates"]
    assert tokens == 14  # [CLS] + 12 + [SEP]: the bucket is 16
    assert seen == [(1, 14 if padded == "exact" else 16)]


def test_top_indices_equal_a_stable_full_sort():
    """The engine's top-k selection (block maxima bound, then a sort of the few values
    above it) picks and orders exactly as a stable full sort would: ties by index,
    -inf last, any k and length."""
    from edge.engine import _top_indices

    rng = np.random.default_rng(7)
    for trial in range(3000):
        n = int(rng.integers(1, 3000))
        values = rng.standard_normal(n)
        if trial % 3 == 0:
            values = np.round(values, 1)  # many ties, some across the cut
        if trial % 5 == 0:
            values[rng.integers(0, n, size=n // 2)] = -np.inf
        if trial % 11 == 0:
            values[:] = -np.inf
            values[rng.integers(0, n, size=2)] = 0.5  # fewer finite values than k
        k = int(rng.integers(1, 30))
        want = np.lexsort((np.arange(n), -values))[:k]
        assert _top_indices(values, k).tolist() == want.tolist(), (trial, n, k)
    assert _top_indices(np.zeros(5), 0).tolist() == []  # nothing asked, nothing picked
