"""Overload behaviour: the admission gate (edge/admission.py) in front of the engine
refuses what it cannot take in time with 503 + Retry-After, over a real socket under
waitress; each request's work is bounded (model rows, deadline) in the engine."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeEngine, FakeInputError  # noqa: E402

from edge.admission import AdmissionGate, AdmissionLimits, Overloaded  # noqa: E402
from edge.app import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_BUNDLE = ROOT / "tests" / "fixtures" / "tiny_bundle"


def test_the_gate_admits_up_to_its_limits_and_refuses_the_rest():
    gate = AdmissionGate(AdmissionLimits(max_active=1, max_waiting=1, max_wait_ms=10_000))
    inside, release, waiter_done = threading.Event(), threading.Event(), threading.Event()
    results = {}

    def hold():
        with gate.admit():
            inside.set()
            release.wait(10)

    def wait_turn():
        with gate.admit() as waited:
            results["waited"] = waited
        waiter_done.set()

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    waiter = threading.Thread(target=wait_turn)
    waiter.start()
    while gate.stats()["waiting"] < 1:  # the second request is queued
        time.sleep(0.001)
    with pytest.raises(Overloaded) as refused:  # a third finds the queue full
        with gate.admit():
            pass
    assert refused.value.reason == "queue_full" and refused.value.retry_after >= 1
    release.set()
    assert waiter_done.wait(10)  # the queued one got its turn when the first left
    holder.join(10)
    waiter.join(10)
    stats = gate.stats()
    assert stats["admitted_total"] == 2 and stats["shed_total"] == {"queue_full": 1, "wait_budget": 0, "waited_out": 0}
    assert stats["active"] == 0 and stats["waiting"] == 0 and results["waited"] > 0


def admit_while_held(gate: AdmissionGate) -> None:
    """Ask ``gate`` for a place while another thread holds the only one."""
    inside, release = threading.Event(), threading.Event()

    def hold():
        with gate.admit():
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    try:
        with gate.admit():
            pass
    finally:
        release.set()
        holder.join(10)


def test_a_request_that_would_wait_past_its_budget_is_refused_on_arrival():
    """With the engine's time per request known to be 1 s, a request that would queue
    behind one is refused at once rather than after waiting out its 100 ms."""
    gate = AdmissionGate(AdmissionLimits(max_active=1, max_waiting=4, max_wait_ms=100))
    gate._service_s = 1.0
    with pytest.raises(Overloaded) as refused:
        admit_while_held(gate)
    assert refused.value.reason == "wait_budget" and refused.value.retry_after >= 1
    assert gate.stats()["waiting"] == 0  # it never queued


def test_a_waiting_request_gives_up_after_its_wait_budget():
    # 60 ms of budget against an expected 50 ms wait (the initial estimate, no deviation
    # yet): it queues, and the request ahead holds on, so the budget runs out while it waits.
    gate = AdmissionGate(AdmissionLimits(max_active=1, max_waiting=4, max_wait_ms=60))
    with pytest.raises(Overloaded) as refused:
        admit_while_held(gate)
    assert refused.value.reason == "waited_out"
    assert gate.stats()["shed_total"]["waited_out"] == 1 and gate.stats()["waiting"] == 0


def test_a_variable_engine_time_makes_the_gate_refuse_sooner():
    """The newcomer's wait is judged by the mean time in the engine plus 4 mean
    deviations: with the same 50 ms mean, an engine whose times vary by 20 ms makes a
    100 ms budget too short to queue behind one request (50 + 80 ms), a steady one not."""
    steady = AdmissionGate(AdmissionLimits(max_active=1, max_waiting=4, max_wait_ms=100))
    steady._service_s, steady._service_dev = 0.05, 0.0
    with pytest.raises(Overloaded) as refused:
        admit_while_held(steady)  # it queues (the holder never lets go) and waits out
    assert refused.value.reason == "waited_out"
    varying = AdmissionGate(AdmissionLimits(max_active=1, max_waiting=4, max_wait_ms=100))
    varying._service_s, varying._service_dev = 0.05, 0.02
    with pytest.raises(Overloaded) as refused:
        admit_while_held(varying)
    assert refused.value.reason == "wait_budget" and varying.stats()["waiting"] == 0


def test_the_engine_time_estimate_follows_the_requests():
    """Mean and deviation move toward what requests take in the engine (gains 1/8, 1/4)."""
    gate = AdmissionGate()
    for _ in range(60):
        with gate.admit():
            time.sleep(0.01)
    assert 0.009 < gate._service_s < 0.03
    assert gate._service_dev < 0.01


@pytest.fixture
def slow_server():
    """The app around a fake engine that takes 0.5 s a query, under waitress on a real
    socket: one request in the engine at a time, two more may wait."""
    from waitress.server import create_server

    engine = FakeEngine(delay_s=0.5)
    app = create_app(engine=engine, config={"MAX_ACTIVE": 1, "MAX_WAITING": 2, "MAX_WAIT_MS": 5000})
    server = create_server(app, host="127.0.0.1", port=0, threads=12)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()


def post(url: str, text: str):
    request = urllib.request.Request(f"{url}/api/predict", data=json.dumps({"text": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read()), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read()), time.monotonic() - started


def test_a_burst_past_the_limits_gets_503_with_retry_after_and_the_service_recovers(slow_server):
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: post(slow_server, f"第{i}句[MASK]。"), range(8)))
    ok = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] != 200]
    # One in the engine and two waiting are answered; the other five are refused.
    assert len(ok) == 3 and len(shed) == 5
    for status, headers, body, seconds in shed:
        assert status == 503 and body["error"] == "overloaded"
        assert int(headers["Retry-After"]) >= 1
        # Refused at once, not after waiting behind the admitted ones (0.5 s each).
        assert seconds < min(a[3] for a in ok)
    # The burst is over: the next request is answered normally, and /metrics tells.
    status, _, body, _ = post(slow_server, "床前明月光，疑是地[MASK]霜。")
    assert status == 200 and body["blanks"][0]["candidates"][0]["text"] == "上"
    with urllib.request.urlopen(f"{slow_server}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'fillmask_admission_shed_total{reason="queue_full"} 5' in metrics
    assert "fillmask_admission_queue_depth 0" in metrics and "fillmask_admission_active 0" in metrics
    assert "fillmask_admission_admitted_total 4" in metrics


def test_engine_refusals_over_its_work_bounds_are_clear_errors(monkeypatch):
    engine = FakeEngine()
    client = create_app(engine=engine, config={"TESTING": True}).test_client()

    def refuse(code):
        def predict(*args, **kwargs):
            raise FakeInputError(code, f"{code}: what to do")
        monkeypatch.setattr(engine, "predict", predict)

    refuse("too_much_work")
    response = client.post("/api/predict", json={"text": "我[MASK]"})
    assert response.status_code == 400 and response.get_json()["error"] == "too_much_work"
    refuse("deadline_exceeded")
    response = client.post("/api/predict", json={"text": "我[MASK]"})
    assert response.status_code == 503 and response.get_json()["error"] == "deadline_exceeded"
    assert response.headers["Retry-After"] == "1"


@pytest.mark.skipif(not (TINY_BUNDLE / "manifest.json").is_file(), reason="tiny fixture bundle missing")
def test_the_engine_bounds_one_requests_rows_and_time():
    from edge.engine import Engine, InputError

    heavy = "我[MASK]你[MASK]他[MASK]。"
    engine = Engine.from_bundle(TINY_BUNDLE, threads=1, batch_window_ms=0.0, cache_size=0, max_request_rows=20)
    try:
        engine.predict("我[MASK]。")  # one row: well within the bounds
        before = engine.stats()["inferences_total"]
        with pytest.raises(InputError) as refused:
            engine.predict(heavy, top_k=10, blank_length="auto")
        assert refused.value.code == "too_much_work"
        assert engine.stats()["inferences_total"] - before <= 20  # it stopped at the bound
        engine.predict("我[MASK]。")  # and the next request has its own budget
    finally:
        engine.close()
    engine = Engine.from_bundle(TINY_BUNDLE, threads=1, batch_window_ms=0.0, cache_size=0, request_timeout_s=1e-9)
    try:
        with pytest.raises(InputError) as refused:
            engine.predict(heavy, top_k=10, blank_length="auto")
        assert refused.value.code == "deadline_exceeded"
    finally:
        engine.close()
