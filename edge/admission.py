"""Admission control for the predict API: a bounded queue in front of the engine.

Without it an open-loop load above capacity makes every request wait behind all the
earlier ones (measured: p99 of 7-21 s at 50 req/s on bert-base, no errors, latency
growing for as long as the load lasts). With it at most ``max_active`` requests work
in the engine at once, at most ``max_waiting`` more wait for a turn, each for at most
``max_wait_ms`` (one that would likely wait longer, judged by a running mean of the
time in the engine, is refused on arrival); any other request is refused at once
(HTTP 503 with ``Retry-After``),
so the admitted ones keep their latency and the service is back to normal as soon as
the load drops. Nothing is queued anywhere else: the HTTP server has more threads
than ``max_active + max_waiting``, so a refused request is answered within
milliseconds instead of waiting for a thread.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


class Overloaded(Exception):
    """The request was not admitted: ``reason`` is ``queue_full`` or ``wait_budget``;
    ``retry_after`` the whole seconds after which a retry is likely to be admitted."""

    def __init__(self, reason: str, retry_after: int):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class AdmissionLimits:
    """How much the predict API takes on at once (see the module docstring)."""

    max_active: int = 2  # in the engine at once (the engine has one inference worker)
    max_waiting: int = 8  # waiting for a turn beyond those
    max_wait_ms: float = 250.0  # a waiting request gives up after this

    def __post_init__(self) -> None:
        if self.max_active < 1 or self.max_waiting < 0 or self.max_wait_ms < 0:
            raise ValueError(f"bad admission limits: {self}")


class AdmissionGate:
    """Counts the requests in the engine and waiting for it; admits or refuses."""

    def __init__(self, limits: AdmissionLimits | None = None):
        self.limits = limits or AdmissionLimits()
        self._cond = threading.Condition()
        self.active = 0
        self.waiting = 0
        self.admitted_total = 0
        self.shed_total: dict[str, int] = {"queue_full": 0, "wait_budget": 0}
        self.wait_seconds_total = 0.0  # summed over admitted requests
        self.max_waiting_seen = 0
        self._service_s = 0.05  # running mean of the time in the engine (for Retry-After)

    @contextmanager
    def admit(self) -> Iterator[float]:
        """Hold a place in the engine for the ``with`` body (yields the seconds waited);
        raises :class:`Overloaded` when there is none to be had in time."""
        limits = self.limits
        started = time.monotonic()
        with self._cond:
            if self.active >= limits.max_active:
                if self.waiting >= limits.max_waiting:
                    self.shed_total["queue_full"] += 1
                    raise Overloaded("queue_full", self._retry_after())
                # Refused at once when the queue ahead will likely take longer than the
                # wait budget (measured: on bert-base, requests that waited out the
                # budget were refused only after 250 ms); the budget stays the backstop.
                expected = (self.waiting + 1) * self._service_s / limits.max_active
                if expected * 1000.0 > limits.max_wait_ms:
                    self.shed_total["wait_budget"] += 1
                    raise Overloaded("wait_budget", self._retry_after())
                self.waiting += 1
                self.max_waiting_seen = max(self.max_waiting_seen, self.waiting)
                deadline = started + limits.max_wait_ms / 1000.0
                try:
                    while self.active >= limits.max_active:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self.shed_total["wait_budget"] += 1
                            raise Overloaded("wait_budget", self._retry_after())
                        self._cond.wait(timeout=left)
                finally:
                    self.waiting -= 1
            self.active += 1
            self.admitted_total += 1
            waited = time.monotonic() - started
            self.wait_seconds_total += waited
        entered = time.monotonic()
        try:
            yield waited
        finally:
            with self._cond:
                self.active -= 1
                # An exponential mean of the time in the engine: what a retry waits for.
                self._service_s = 0.9 * self._service_s + 0.1 * (time.monotonic() - entered)
                self._cond.notify()

    def _retry_after(self) -> int:
        """Whole seconds until the queue ahead has likely drained (at least 1)."""
        ahead = self.active + self.waiting
        return max(1, math.ceil(ahead * self._service_s / self.limits.max_active))

    def stats(self) -> dict:
        """Counters and gauges for /metrics."""
        with self._cond:
            return {
                "active": self.active,
                "waiting": self.waiting,
                "admitted_total": self.admitted_total,
                "shed_total": dict(self.shed_total),
                "wait_seconds_total": self.wait_seconds_total,
                "max_active": self.limits.max_active,
                "max_waiting": self.limits.max_waiting,
                "max_wait_ms": self.limits.max_wait_ms,
            }
