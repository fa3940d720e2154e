"""Benchmark tooling: FLOP arithmetic, the open-loop load generator, input masking,
and one quick end-to-end run of ``python -m tools bench`` on the tiny fixtures.

Numbers are never asserted against targets here (that is what the benchmark report
is for); these tests check that the tooling measures what it says it measures.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tools.benchmark import pi_estimate as pe
from tools.benchmark.inputs import MASK, load_text, mask_one, mask_run
from tools.benchmark.loadtest import percentile, run_rate

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TINY_CHECKPOINT = ROOT / "tests" / "fixtures" / "tiny_checkpoint"
TINY_BUNDLE = ROOT / "tests" / "fixtures" / "tiny_bundle"


# -- FLOP arithmetic and the Pi estimate ---------------------------------------------

def test_bert_base_flops_match_the_known_figures():
    # design.md: bert-base costs ~5.5 GFLOP at 32 tokens and ~22 GFLOP at 128 (encoder).
    assert pe.encoder_flops(pe.BERT_BASE_CHINESE, 32) / 1e9 == pytest.approx(5.47, abs=0.01)
    assert pe.encoder_flops(pe.BERT_BASE_CHINESE, 128) / 1e9 == pytest.approx(22.35, abs=0.01)


def test_mask_only_head_is_much_cheaper_than_the_full_head():
    shape = pe.BERT_BASE_CHINESE
    full = pe.head_flops(shape, positions=32)  # every position, 21128 tokens
    ours = pe.head_flops(shape, positions=1, vocab=10000)
    assert full / 1e9 == pytest.approx(2 * 32 * (768 * 768 + 768 * 21128) / 1e9)
    assert full / ours > 60
    # the full head is ~20% of bert-base's work at 32 tokens (design.md)
    assert 0.15 < full / pe.query_flops(shape, 32, 32) < 0.2


def test_estimate_scales_by_peak_and_respects_the_memory_floor():
    host = pe.Cpu("host", cores=2, ghz=2.0, fp32_flop_per_cycle=32, int8_op_per_cycle=128)
    target = pe.Cpu("board", cores=4, ghz=1.0, fp32_flop_per_cycle=8, int8_op_per_cycle=16, dram_gb_s=1.0)
    # 12.8 GOP in 100 ms = 128 GOP/s achieved; host INT8 peak on 2 threads = 512 -> 25%
    est = pe.estimate(12.8e9, 100.0, host, 2, int8=True, weight_bytes=10_000_000, targets=(target,))
    assert est["achieved_gops"] == pytest.approx(128.0)
    assert est["efficiency"] == pytest.approx(0.25)
    board = est["targets"]["board"]
    assert board["peak_gops"] == pytest.approx(64.0)
    assert board["compute_ms"] == pytest.approx(12.8e9 / (64e9 * 0.25) * 1000)
    assert board["memory_floor_ms"] == pytest.approx(10.0)
    assert board["estimate_ms"] == pytest.approx(max(board["compute_ms"], 10.0))
    big = pe.estimate(1e6, 1.0, host, 2, int8=True, weight_bytes=500_000_000, targets=(target,))
    assert big["targets"]["board"]["estimate_ms"] == pytest.approx(500.0)  # memory-bound


def test_host_cpu_has_positive_peaks():
    cpu, notes = pe.host_cpu()
    assert cpu.ghz > 0 and cpu.fp32_flop_per_cycle > 0 and cpu.int8_op_per_cycle >= cpu.fp32_flop_per_cycle
    assert notes  # every inferred figure is stated


# -- inputs ------------------------------------------------------------------------

def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0, 10], 99) == pytest.approx(9.9)
    assert percentile([7], 99) == 7


def test_masking_replaces_cjk_characters_only():
    rng = random.Random(0)
    masked, answer = mask_one("今天天气很好，我们去公园。", rng)
    assert masked.count(MASK) == 1 and len(answer) == 1
    assert masked.replace(MASK, answer) == "今天天气很好，我们去公园。"
    masked, answer = mask_run("今天天气很好，我们去公园。", rng, 4)
    assert MASK * 4 in masked and len(answer) == 4
    assert masked.replace(MASK * 4, answer) == "今天天气很好，我们去公园。"
    assert mask_run("很好，我们。", rng, 4) is None  # no run of 4 CJK characters


def test_load_texts_are_distinct():
    pool = ["今天天气很好我们去公园玩", "床前明月光疑是地上霜"]
    texts = [load_text(pool, i) for i in range(18)]
    assert len(set(texts)) == 18
    assert all(t.count(MASK) == 1 for t in texts)


# -- the open-loop load generator ---------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    fail = False
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body["text"])
        if not type(self).fail:
            time.sleep(0.03)  # an "engine" that takes 30 ms, and says so in elapsed_ms
        status, payload = (500, b'{"error": "boom"}') if type(self).fail else (200, b'{"blanks": [], "elapsed_ms": 30.0}')
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server():
    _Handler.fail, _Handler.seen = False, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_run_rate_offers_the_rate_and_counts_answers(http_server):
    port = http_server.server_address[1]
    result = run_rate("127.0.0.1", port, lambda i: f"第{i}个[MASK]", rate=40, duration_s=0.5, timeout_s=5)
    assert result.requests == 20 and result.ok == 20 and result.errors == 0
    assert sorted(_Handler.seen) == sorted(f"第{i}个[MASK]" for i in range(20))
    assert 0 < result.p50_ms <= result.p99_ms < 1000
    assert 20 < result.achieved_rps < 60
    # what HTTP adds: the round trip minus the 30 ms the answer says the engine took
    assert 0 <= result.http_overhead_p50_ms <= result.p50_ms - 29
    # how late the generator itself sent: client side, small on an idle machine
    assert 0 <= result.mean_send_lag_ms <= result.send_lag_p99_ms < 1000


def test_run_rate_counts_http_errors(http_server):
    _Handler.fail = True
    result = run_rate("127.0.0.1", http_server.server_address[1], lambda i: "x[MASK]", rate=20, duration_s=0.25,
                      timeout_s=5)
    assert result.ok == 0 and result.errors == result.requests == 5
    assert "HTTP 500" in result.error_examples[0]


def test_run_rate_counts_refused_connections():
    from tools.benchmark.loadtest import free_port

    result = run_rate("127.0.0.1", free_port(), lambda i: "x[MASK]", rate=20, duration_s=0.1, timeout_s=2)
    assert result.errors == result.requests and result.ok == 0


def test_served_process_runs_below_the_load_generators_priority():
    """The load test's server is niced (+5), so that the generator, which stands for
    clients on other machines, is not the one starved on a shared machine."""
    psutil = pytest.importorskip("psutil")
    import os

    from tools.benchmark.loadtest import SERVER_NICE, Server

    if not (TINY_BUNDLE / "manifest.json").is_file():
        pytest.skip("tiny fixtures missing: run python tests/make_tiny_checkpoint.py")
    with Server(TINY_BUNDLE, threads=1, batch_window_ms=0.0, max_batch=1, cwd=ROOT) as server:
        process = psutil.Process(server.process.pid)
        assert process.cmdline()[1:4] == ["-m", "edge", "serve"]  # nice exec'd the server in place
        assert process.nice() == min(19, os.nice(0) + SERVER_NICE)


# -- end to end ---------------------------------------------------------------------

def test_quick_bench_on_the_tiny_model(tmp_path):
    if not (TINY_BUNDLE / "manifest.json").is_file() or not (TINY_CHECKPOINT / "config.json").is_file():
        pytest.skip("tiny fixtures missing: run python tests/make_tiny_checkpoint.py")
    data = SHARED / "data" / "fewclue" / "eprstmt"
    if not data.is_dir():
        pytest.skip(f"{data} is not present (held-apart inputs come from ../shared/data)")
    pytest.importorskip("psutil")
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "tools", "bench", "--quick", "--checkpoint", str(TINY_CHECKPOINT),
               "--bundle", str(TINY_BUNDLE), "--data", str(data), "--long-tokens", "40", "--iterations", "2",
               "--warmup", "1", "--cold-runs", "0", "--agree-samples", "6", "--rates", "8",
               "--load-seconds", "1", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    systems = report["models"]["custom"]["systems"]
    for system in ("pipeline", "ort-fp32", "ours", "ours-static", "ours-int4"):
        assert "error" not in systems[system], systems[system]
        for name in ("short", "long", "short_4"):
            timing = systems[system]["sets"][name]
            assert len(timing["latencies_ms"]) == 2 and 0 < timing["median_ms"] <= timing["p99_ms"]
        assert systems[system]["rss_after_run_mb"] > 10 and systems[system]["cold_start_s"] > 0
        assert systems[system]["model_file_bytes"] > 0
    # the plain ORT and ours workers must not have imported torch: far less memory
    assert systems["ours"]["rss_after_run_mb"] < systems["pipeline"]["rss_after_run_mb"]
    assert report["models"]["custom"]["agreement"]["masked_positions"] == 6
    variants = report["models"]["custom"]["agreement_variants"]
    assert variants["ours-static"]["masked_positions"] == variants["ours-int4"]["masked_positions"] == 6
    assert systems["ours-int4"]["model_file_bytes"] < systems["ours"]["model_file_bytes"]
    load = report["load"]["custom"]["results"]
    for config in ("batching-on", "batching-off", "2-sessions", "no-queue-bound"):
        assert load[config]["rates"][0]["errors"] == 0, load[config]
        assert load[config]["rates"][0]["ok"] == 8
        assert load[config]["rates"][0]["send_lag_p99_ms"] >= 0
    assert "late p99 ms" in (out / "results.md").read_text(encoding="utf-8")
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert "| ours |" in markdown and "| ours-static |" in markdown and "| ours-int4 |" in markdown
    assert "Pi 4" in markdown and report["command"] in markdown
    assert (out / "bench.png").stat().st_size > 10_000
