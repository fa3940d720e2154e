"""Open-loop HTTP load test of the real service (``python -m edge serve``) on loopback.

Requests are *scheduled* at a fixed offered rate (request i at t0 + i/rate) and each
is sent from its own thread at its scheduled time, whether or not earlier ones have
been answered (open loop: a slow server cannot slow the client down and hide its
queueing). Latency is measured from the scheduled time, so client-side lateness
counts against the server rather than disappearing (no coordinated omission).

The server runs at a lower CPU priority than the load generator (``nice`` +5): the
generator stands for clients on other machines, and on a shared 2-core machine a
starved generator thread sent late, which the measure above then counted as server
latency (runs where the generator's mean lateness rose from ~1 ms to 6-8 ms had their
p99 and their refusals' p99 doubled). Each rate also reports the generator's p99
lateness, so that a run where it still happened shows it.

Standard library only (threads + http.client); psutil (tools extra) reads the
server's resident memory.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)
# The server's niceness under test: below the load generator's (see the module docstring).
SERVER_NICE = 5

HEALTH_PATH = "/healthz"
PREDICT_PATH = "/api/predict"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(host: str, port: int, path: str, body: dict, timeout: float) -> tuple[int, bytes]:
    """POST ``body`` as JSON on a fresh connection; return (status, response body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class _Outcome:
    scheduled: float
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    error: str = ""
    shed: bool = False
    engine_ms: float | None = None  # the answer's own elapsed_ms (the engine's time)


@dataclass
class RateResult:
    """What one offered rate achieved."""

    offered_rps: float
    duration_s: float
    requests: int
    ok: int
    errors: int
    error_examples: list[str]
    achieved_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_send_lag_ms: float
    send_lag_p99_ms: float = float("nan")  # how late the generator sent (client-side, not server)
    shed: int = 0  # answered 503 "overloaded" by the admission gate (not errors: the service said so at once)
    shed_p99_ms: float = float("nan")  # how fast those refusals came back
    # Per answered request: its round trip (sent to answered, a fresh connection each) minus
    # the engine's own elapsed_ms in the answer: what HTTP, JSON, admission and logging add.
    http_overhead_p50_ms: float = float("nan")
    server_rss_before_mb: float | None = None
    server_rss_after_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


def run_rate(host: str, port: int, texts: Callable[[int], str], rate: float, duration_s: float,
             timeout_s: float = 30.0, top_k: int = 5) -> RateResult:
    """Offer ``rate`` requests/s for ``duration_s`` seconds (open loop) and wait for all.

    ``texts(i)`` gives the text of request ``i``. A 503 "overloaded" answer counts
    as shed (the admission gate refused it at once); any other non-200 answer, a
    malformed body, a connection error or a timeout counts as an error.
    """
    count = max(1, int(round(rate * duration_s)))
    outcomes = [_Outcome(scheduled=0.0) for _ in range(count)]
    threads: list[threading.Thread] = []

    def fire(i: int) -> None:
        out = outcomes[i]
        out.sent = time.perf_counter()
        try:
            status, body = post_json(host, port, PREDICT_PATH, {"text": texts(i), "top_k": top_k}, timeout_s)
            out.status = status
            if status == 503 and b'"overloaded"' in body:
                out.shed = True
            elif status != 200:
                out.error = f"HTTP {status}: {body[:120]!r}"
            else:
                answer = json.loads(body)
                if "blanks" not in answer:
                    out.error = f"200 without blanks: {body[:120]!r}"
                elif isinstance(answer.get("elapsed_ms"), (int, float)):
                    out.engine_ms = float(answer["elapsed_ms"])
        except Exception as exc:  # noqa: BLE001 - every failure is an error to count, not to raise
            out.error = f"{type(exc).__name__}: {exc}"
        out.done = time.perf_counter()

    start = time.perf_counter() + 0.05
    for i in range(count):
        scheduled = start + i / rate
        outcomes[i].scheduled = scheduled
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=fire, args=(i,), name=f"load-{i}", daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.perf_counter() + timeout_s + 5
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.perf_counter()))
    unfinished = sum(1 for t in threads if t.is_alive())
    finished = [o for o in outcomes if o.done]
    ok = [o for o in finished if not o.error and not o.shed]
    shed = [o for o in finished if o.shed]
    errors = [o.error for o in finished if o.error] + ["not answered in time"] * unfinished
    latencies = [(o.done - o.scheduled) * 1000 for o in ok]
    end = max((o.done for o in finished), default=start)
    span = max(end - start, 1e-9)
    return RateResult(
        offered_rps=rate,
        duration_s=duration_s,
        requests=count,
        ok=len(ok),
        errors=len(errors),
        error_examples=sorted(set(errors))[:3],
        achieved_rps=len(ok) / span,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies, default=float("nan")),
        mean_send_lag_ms=1000 * sum(o.sent - o.scheduled for o in finished) / max(1, len(finished)),
        send_lag_p99_ms=percentile([(o.sent - o.scheduled) * 1000 for o in finished], 99),
        shed=len(shed),
        shed_p99_ms=percentile([(o.done - o.scheduled) * 1000 for o in shed], 99),
        http_overhead_p50_ms=percentile([(o.done - o.sent) * 1000 - o.engine_ms for o in ok
                                         if o.engine_ms is not None], 50),
    )


class Server:
    """``python -m edge serve`` as a subprocess on a free loopback port."""

    def __init__(self, bundle: str | Path | None, threads: int, batch_window_ms: float, max_batch: int,
                 cache_size: int = 0, http_threads: int | None = None, log_path: str | Path | None = None,
                 python: str = sys.executable, cwd: str | Path | None = None, sessions: int = 1,
                 extra_args: Sequence[str] = (), nice: int = SERVER_NICE):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.command = [python, "-m", "edge", "serve", "--host", self.host, "--port", str(self.port),
                        "--threads", str(threads), "--batch-window-ms", str(batch_window_ms),
                        "--max-batch", str(max_batch), "--cache-size", str(cache_size), "--sessions", str(sessions)]
        if http_threads:  # else the server's default: enough threads to refuse at once
            self.command += ["--http-threads", str(http_threads)]
        self.command += list(extra_args)  # later options win: a configuration may override the above
        if bundle is not None:
            self.command[4:4] = ["--bundle", str(bundle)]
        self.log_path = Path(log_path) if log_path else None
        self.cwd = cwd
        self.nice = nice
        self.process: subprocess.Popen | None = None
        self._log_file = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the server and wait until /healthz answers; raise RuntimeError if it dies."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "w", encoding="utf-8")
        out = self._log_file or subprocess.DEVNULL
        # coreutils' nice execs the server in place: the pid stays the server's
        command = (["nice", "-n", str(self.nice)] if self.nice else []) + self.command
        log.info("starting: %s", " ".join(command))
        self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with status {self.process.returncode} before it was ready "
                                   f"(log: {self.log_path}): {self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
                conn.request("GET", HEALTH_PATH)
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s (log: {self.log_path})")

    def rss_mb(self) -> float | None:
        """Resident memory of the server process in MB (None without psutil)."""
        try:
            import psutil
        except ImportError:
            return None
        if self.process is None or self.process.poll() is not None:
            return None
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def metrics(self) -> str:
        """The server's /metrics text (empty on failure)."""
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode("utf-8", "replace")
            conn.close()
            return text
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        """Last lines of the server log."""
        if self._log_file:
            self._log_file.flush()
        if self.log_path and self.log_path.is_file():
            return " | ".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> int | None:
        """SIGTERM the server (clean shutdown), kill it after 15 s; return its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        return self.process.returncode

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def batch_histogram(metrics_text: str) -> dict[str, float]:
    """Pull the batch-size counters out of the Prometheus text (best effort)."""
    found = {}
    for line in metrics_text.splitlines():
        if line.startswith("#") or "batch" not in line:
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) == 2:
            try:
                found[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return found


def load_test(bundle: str | Path | None, texts: Callable[[int], str], rates: Sequence[float], duration_s: float,
              threads: int, configs: dict[str, dict[str, Any]], http_threads: int | None = None,
              log_dir: str | Path | None = None, warmup: int = 20, cwd: str | Path | None = None,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every rate against a fresh server per configuration.

    ``configs`` maps a name to ``{"batch_window_ms": .., "max_batch": ..}`` (and
    optionally ``"sessions"`` and ``"extra_args"``, more ``edge serve`` options). Each
    server runs with the cache off; ``texts(i)`` must give distinct texts across the
    whole test (the request counter runs on across rates and configurations).
    Returns ``{config: {"command": .., "rss_*": .., "rates": [RateResult dicts]}}``.
    """
    counter = [0]

    def next_texts(offset: int) -> Callable[[int], str]:
        return lambda i: texts(offset + i)

    results: dict[str, Any] = {}
    for name, settings in configs.items():
        server = Server(bundle, threads=threads, batch_window_ms=settings["batch_window_ms"],
                        max_batch=settings["max_batch"], cache_size=0, http_threads=http_threads,
                        sessions=settings.get("sessions", 1), extra_args=settings.get("extra_args", ()),
                        log_path=Path(log_dir) / f"server-{name}.log" if log_dir else None, cwd=cwd)
        entry: dict[str, Any] = {"command": server.command, "settings": settings, "rates": []}
        results[name] = entry
        try:
            started = time.monotonic()
            server.start()
            entry["startup_s"] = round(time.monotonic() - started, 2)
            entry["rss_started_mb"] = server.rss_mb()
            # Warm-up: the session's arena settles on the shapes it will see.
            for i in range(warmup):
                post_json(server.host, server.port, PREDICT_PATH, {"text": texts(counter[0] + i)}, 60)
            counter[0] += warmup
            entry["rss_before_mb"] = server.rss_mb()
            for rate in rates:
                before = server.rss_mb()
                result = run_rate(server.host, server.port, next_texts(counter[0]), rate, duration_s)
                counter[0] += result.requests
                result.server_rss_before_mb, result.server_rss_after_mb = before, server.rss_mb()
                entry["rates"].append(result.as_dict())
                progress(f"  [{name}] offered {rate:g}/s: achieved {result.achieved_rps:.1f}/s, "
                         f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, shed {result.shed} "
                         f"(p99 {result.shed_p99_ms:.1f} ms), errors {result.errors}, "
                         f"server RSS {before or 0:.0f} -> {result.server_rss_after_mb or 0:.0f} MB")
                time.sleep(1.0)  # let the queue drain fully before the next rate
            entry["rss_after_mb"] = server.rss_mb()
            entry["batch_metrics"] = batch_histogram(server.metrics())
        except RuntimeError as exc:
            entry["error"] = str(exc)
            progress(f"  [{name}] failed: {exc}")
        finally:
            entry["exit_status"] = server.stop()
    return results
