"""Prometheus text-format metrics for the HTTP service, without prometheus_client.

The board runtime keeps its dependency list short, and the exposition format
(version 0.0.4) is simple enough to write by hand: ``# HELP`` / ``# TYPE`` lines,
then ``name{label="value"} number`` samples. Counters live in :class:`Metrics`
(thread-safe: waitress serves from several threads); engine counters are read
from ``engine.stats()`` at scrape time.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Iterable, Mapping

PREFIX = "fillmask"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: a Pi answers in tens of milliseconds, a cold or
# overloaded one in a second or more.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def escape_label(value: Any) -> str:
    """Escape a label value as the text format requires (backslash, quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float | int) -> str:
    """Format a sample value: integers plainly, floats with repr, +Inf/-Inf/NaN by name."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def sample(name: str, labels: Mapping[str, Any] | None, value: float | int) -> str:
    """Return one sample line ``name{labels} value``."""
    if labels:
        inner = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels.items())
        return f"{name}{{{inner}}} {format_value(value)}"
    return f"{name} {format_value(value)}"


def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    """Return the HELP and TYPE header lines followed by the samples of one metric."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class Metrics:
    """HTTP request counters and a latency histogram, safe to update from many threads."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        """Start with empty counters; ``buckets`` are the histogram's upper bounds in seconds."""
        self.buckets = tuple(sorted(buckets))
        self.started = time.time()
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._errors: dict[str, int] = {}
        # route -> [count per bucket (cumulative at render time), +Inf count, sum]
        self._latency: dict[str, list[float]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float, error: str | None = None) -> None:
        """Record one finished request (and its error code, if it failed)."""
        with self._lock:
            key = (route, method, int(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            if error:
                self._errors[error] = self._errors.get(error, 0) + 1
            counts = self._latency.setdefault(route, [0.0] * (len(self.buckets) + 2))
            for index, bound in enumerate(self.buckets):
                if seconds <= bound:
                    counts[index] += 1
                    break
            else:
                counts[len(self.buckets)] += 1
            counts[-1] += seconds

    def snapshot(self) -> dict[str, Any]:
        """Return copies of the counters (for tests and for rendering)."""
        with self._lock:
            return {
                "requests": dict(self._requests),
                "errors": dict(self._errors),
                "latency": {route: list(v) for route, v in self._latency.items()},
            }

    def render(self, engine_stats: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None,
               admission: Mapping[str, Any] | None = None) -> str:
        """Return the whole exposition text, including engine counters, the admission
        queue (``AdmissionGate.stats()``) and model info."""
        snap = self.snapshot()
        lines: list[str] = []

        lines += family(
            f"{PREFIX}_http_requests_total",
            "counter",
            "HTTP requests by route, method and status code.",
            (
                sample(f"{PREFIX}_http_requests_total", {"route": r, "method": m, "status": s}, n)
                for (r, m, s), n in sorted(snap["requests"].items())
            ),
        )
        lines += family(
            f"{PREFIX}_http_errors_total",
            "counter",
            "HTTP error responses by error code (the 'error' field of the JSON body).",
            (sample(f"{PREFIX}_http_errors_total", {"code": c}, n) for c, n in sorted(snap["errors"].items())),
        )

        name = f"{PREFIX}_http_request_duration_seconds"
        hist: list[str] = []
        for route, counts in sorted(snap["latency"].items()):
            cumulative = 0
            for bound, count in zip(self.buckets, counts):
                cumulative += int(count)
                hist.append(sample(f"{name}_bucket", {"route": route, "le": format_value(bound)}, cumulative))
            cumulative += int(counts[len(self.buckets)])
            hist.append(sample(f"{name}_bucket", {"route": route, "le": "+Inf"}, cumulative))
            hist.append(sample(f"{name}_sum", {"route": route}, float(counts[-1])))
            hist.append(sample(f"{name}_count", {"route": route}, cumulative))
        lines += family(name, "histogram", "Time to answer an HTTP request, by route.", hist)

        if engine_stats:
            lines += render_engine_stats(engine_stats)
        if admission:
            lines += render_admission(admission)
        if model:
            lines += family(
                f"{PREFIX}_model_info",
                "gauge",
                "The loaded model bundle (value is always 1).",
                [
                    sample(
                        f"{PREFIX}_model_info",
                        {
                            "name": model.get("name", ""),
                            "random_init": str(bool(model.get("random_init"))).lower(),
                            "version": model.get("version", ""),
                        },
                        1,
                    )
                ],
            )
        lines += family(
            f"{PREFIX}_process_start_time_seconds",
            "gauge",
            "Unix time the service started.",
            [sample(f"{PREFIX}_process_start_time_seconds", None, self.started)],
        )
        return "\n".join(lines) + "\n"


def render_admission(stats: Mapping[str, Any]) -> list[str]:
    """Render the admission queue's counters and gauges (see edge.admission)."""
    lines: list[str] = []
    for key, metric, kind, help_text in (
        ("active", "admission_active", "gauge", "Predict requests in the engine now."),
        ("waiting", "admission_queue_depth", "gauge", "Predict requests waiting for the engine now."),
        ("admitted_total", "admission_admitted_total", "counter", "Predict requests let into the engine."),
        ("wait_seconds_total", "admission_wait_seconds_total", "counter",
         "Seconds admitted requests waited for the engine, summed."),
        ("max_active", "admission_max_active", "gauge", "Limit: requests in the engine at once."),
        ("max_waiting", "admission_max_waiting", "gauge", "Limit: requests waiting beyond those."),
    ):
        if key in stats:
            name = f"{PREFIX}_{metric}"
            lines += family(name, kind, help_text, [sample(name, None, stats[key])])
    shed = stats.get("shed_total")
    if isinstance(shed, Mapping):
        name = f"{PREFIX}_admission_shed_total"
        lines += family(name, "counter", "Predict requests refused with 503, by reason (queue_full, wait_budget, waited_out).",
                        [sample(name, {"reason": r}, int(n)) for r, n in sorted(shed.items())])
    return lines


def render_engine_stats(stats: Mapping[str, Any]) -> list[str]:
    """Render ``engine.stats()`` (cache hits/misses, batches, batch sizes) as metric lines."""
    lines: list[str] = []
    simple = (
        ("cache_hits", "engine_cache_hits_total", "Predictions answered from the LRU cache."),
        ("cache_misses", "engine_cache_misses_total", "Predictions that had to run the model."),
        ("batches_total", "engine_batches_total", "Model runs (micro-batches)."),
        ("inferences_total", "engine_inferences_total", "Sequences run through the model."),
    )
    for key, metric, help_text in simple:
        if key in stats:
            name = f"{PREFIX}_{metric}"
            lines += family(name, "counter", help_text, [sample(name, None, int(stats[key]))])
    sizes = stats.get("batch_size_counts")
    if isinstance(sizes, Mapping):
        name = f"{PREFIX}_engine_batch_size_total"
        # Sort numerically: JSON round trips may have turned the sizes into strings.
        ordered = sorted(sizes.items(), key=lambda item: int(item[0]))
        lines += family(
            name,
            "counter",
            "Model runs by micro-batch size (how many requests shared one run).",
            (sample(name, {"size": int(size)}, int(count)) for size, count in ordered),
        )
    return lines
