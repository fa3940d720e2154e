"""Admission control for the predict API: a bounded queue in front of the engine.

Without it an open-loop load above capacity makes every request wait behind all the
earlier ones (measured: p99 of 7-21 s at 50 req/s on bert-base, no errors, latency
growing for as long as the load lasts). With it at most ``max_active`` requests work
in the engine at once, at most ``max_waiting`` more wait for a turn, each for at most
``max_wait_ms`` (one that would likely wait longer, judged by a running mean and
deviation of the time in the engine, is refused on arrival); any other request is
refused at once
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
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


class Overloaded(Exception):
    """The request was not admitted: ``reason`` is ``queue_full``, ``wait_budget``
    (refused on arrival: it would likely wait too long) or ``waited_out`` (it waited its
    whole budget); ``retry_after`` the whole seconds after which a retry is likely to be
    admitted."""

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
        self._queue: deque[object] = deque()  # the waiting requests, first come first served
        self.admitted_total = 0
        self.shed_total: dict[str, int] = {"queue_full": 0, "wait_budget": 0, "waited_out": 0}
        self.wait_seconds_total = 0.0  # summed over admitted requests
        self.max_waiting_seen = 0
        # Running mean and mean deviation of the time in the engine (as TCP's round-trip
        # estimate: Jacobson 1988), for the wait a newcomer faces and for Retry-After.
        self._service_s = 0.05
        self._service_dev = 0.0

    @contextmanager
    def admit(self) -> Iterator[float]:
        """Hold a place in the engine for the ``with`` body (yields the seconds waited);
        raises :class:`Overloaded` when there is none to be had in time."""
        limits = self.limits
        started = time.monotonic()
        with self._cond:
            # A newcomer queues while anyone waits, even if a place has just come free:
            # otherwise it can take the place from the request woken for it, which then
            # waits again and may wait out its budget (with this rule the refusals' p99 on
            # bert-base at 50 req/s fell from 255 to 16 ms).
            if self.active >= limits.max_active or self._queue:
                if self.waiting >= limits.max_waiting:
                    self.shed_total["queue_full"] += 1
                    raise Overloaded("queue_full", self._retry_after())
                # Refused at once when the queue ahead may well take longer than the
                # wait budget: a request that waits it out is refused only after it
                # (measured on bert-base with the plain mean: over 1% of the refusals
                # came after ~260 ms, so their p99 was 260 ms). Mean + 4 deviations, as
                # TCP's retransmission timer; the budget stays the backstop.
                per_request = self._service_s + 4.0 * self._service_dev
                expected = (self.waiting + 1) * per_request / limits.max_active
                if expected * 1000.0 > limits.max_wait_ms:
                    self.shed_total["wait_budget"] += 1
                    raise Overloaded("wait_budget", self._retry_after())
                me = object()
                self._queue.append(me)
                self.max_waiting_seen = max(self.max_waiting_seen, self.waiting)
                deadline = started + limits.max_wait_ms / 1000.0
                try:
                    while self.active >= limits.max_active or self._queue[0] is not me:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self.shed_total["waited_out"] += 1
                            raise Overloaded("waited_out", self._retry_after())
                        self._cond.wait(timeout=left)
                finally:
                    self._queue.remove(me)
                    self._cond.notify_all()  # the head of the queue may have changed
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
                # Exponential mean and mean deviation of the time in the engine (gains
                # 1/8 and 1/4, TCP's): what a newcomer and a retry wait for.
                sample = time.monotonic() - entered
                self._service_dev += 0.25 * (abs(sample - self._service_s) - self._service_dev)
                self._service_s += 0.125 * (sample - self._service_s)
                self._cond.notify_all()  # the head of the queue takes the place

    @property
    def waiting(self) -> int:
        """Requests waiting for a place."""
        return len(self._queue)

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
