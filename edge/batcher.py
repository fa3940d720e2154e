"""Micro-batching: one worker thread owns the ONNX Runtime session.

Callers submit *rows* (a token-id sequence and the positions whose logits they
want) and block until their logits come back. The worker takes the first waiting
request, waits up to ``window_ms`` for more (only while ``busy()`` says other callers
are at work and may submit soon: a query alone does not wait for company that is not
coming, which cost every single HTTP query the whole window), pads them into one batch
(to its longest row, or with ``pad_to_bucket`` to that row's length bucket) and runs
the session once.

Padding is masked out by the attention mask. For FP32, static INT8 and int4 a row's
logits are exactly the same whoever shares its batch at the same padded length
(``tests/test_engine.py``), so the engine pads those to buckets: with batching by
length a row's padded length, and so its answer, does not depend on its mates.
Dynamic INT8 scales activations over the whole batch, padding included, so its rows
move a little with their mates anyway; the engine pads those only to the longest row,
which spares a lone query the padding (bert-base: a 17-token query no longer runs as
24 tokens). Buckets also say which requests batching by length puts together.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Multiples of 8 up to 32, then steps of ~1.5x: a 19-token query runs at 24, not 32
# (bert-base: 25% less work). The engine runs ONNX Runtime without its memory arena,
# so more distinct shapes no longer mean more resident memory.
DEFAULT_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class Row:
    """One sequence to run: token ids and the positions to read logits at."""

    ids: Sequence[int]
    positions: Sequence[int]


@dataclass
class _Request:
    rows: list[Row]
    future: Future = field(default_factory=Future)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length (or length itself past the largest bucket)."""
    for size in buckets:
        if length <= size:
            return size
    return length


def pad_rows(rows: Sequence[Row], buckets: Sequence[int] | None, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad rows into (input_ids, attention_mask, mask_positions) int64 arrays: to the
    longest row, rounded up to a bucket when ``buckets`` are given."""
    longest = max(len(r.ids) for r in rows)
    seq = bucket_length(longest, buckets) if buckets else longest
    n_pos = max(len(r.positions) for r in rows)
    input_ids = np.full((len(rows), seq), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), seq), dtype=np.int64)
    positions = np.zeros((len(rows), n_pos), dtype=np.int64)  # extra slots read [CLS]; ignored
    for i, row in enumerate(rows):
        input_ids[i, : len(row.ids)] = row.ids
        attention[i, : len(row.ids)] = 1
        positions[i, : len(row.positions)] = row.positions
    return input_ids, attention, positions


class MicroBatcher:
    """Collects concurrent requests for a short window and runs them as one batch.

    ``run_batch(input_ids, attention_mask, mask_positions) -> logits`` is called
    only from the worker thread. ``max_rows`` bounds a batch; a single request with
    more rows than that is still run whole (its rows belong together).

    ``run_batch`` may be a list: one worker thread per entry (one ONNX Runtime
    session each), all taking batches from the same first-come-first-served queue,
    so that two requests can run at once on different cores.
    ``on_thread_start(index)`` runs in worker ``index`` before it starts.
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | Sequence[Callable],
        pad_id: int,
        window_ms: float = 2.0,
        max_rows: int = 16,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        on_thread_start: Callable[[int], None] | None = None,
        busy: Callable[[], bool] | None = None,
        by_length: bool = False,
        pad_to_bucket: bool = True,
    ):
        if window_ms < 0:
            raise ValueError(f"batch window must be >= 0 ms, got {window_ms}")
        if max_rows < 1:
            raise ValueError(f"max batch must be >= 1, got {max_rows}")
        self.runners = list(run_batch) if isinstance(run_batch, (list, tuple)) else [run_batch]
        if not self.runners:
            raise ValueError("at least one run_batch is needed")
        self.pad_id = pad_id
        self.window_s = window_ms / 1000.0
        self.max_rows = max_rows
        self.buckets = tuple(buckets)
        self._on_thread_start = on_thread_start
        self._busy = busy
        self.by_length = by_length
        self.pad_to_bucket = pad_to_bucket
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self.batches_total = 0
        self.inferences_total = 0  # rows run
        self.batch_size_counts: dict[int, int] = {}  # requests per batch -> count
        self.worker_batches = [0] * len(self.runners)  # batches each worker (session) ran
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, args=(k,), name=f"ort-worker-{k}", daemon=True)
                         for k in range(len(self.runners))]
        for thread in self._threads:
            thread.start()

    def submit(self, rows: list[Row], timeout: float | None = 60.0) -> list[np.ndarray]:
        """Run ``rows`` (in some batch) and return each row's logits ``[n_positions, vocab]``."""
        return self.submit_async(rows).result(timeout=timeout)

    def submit_async(self, rows: list[Row]):
        """Queue ``rows`` and return a future of what :meth:`submit` returns: the caller
        may work on (ONNX Runtime releases the GIL while it runs) and wait later."""
        if self._closed:
            raise RuntimeError("the inference worker is shut down")
        request = _Request(rows=list(rows))
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:  # one stop mark per worker
                self._queue.put(None)
            for thread in self._threads:
                thread.join(timeout=10)

    def stats(self) -> dict:
        """Counters for /metrics."""
        with self._lock:
            return {
                "batches_total": self.batches_total,
                "inferences_total": self.inferences_total,
                "batch_size_counts": dict(self.batch_size_counts),
                "worker_batches": list(self.worker_batches),
            }

    # -- worker ----------------------------------------------------------------
    def _length(self, request: _Request) -> int:
        """The bucket a request's rows pad to."""
        return bucket_length(max(len(r.ids) for r in request.rows), self.buckets)

    def _fits(self, request: _Request, rows: int, length: int | None) -> bool:
        return rows + len(request.rows) <= self.max_rows and (length is None or self._length(request) == length)

    def _collect(self, first: _Request, pending: deque) -> tuple[list[_Request], bool]:
        """Gather requests arriving within the window after ``first``; return them and
        whether a stop mark was met. Requests that do not fit (too many rows, or with
        ``by_length`` another bucket) go to ``pending``, served before the queue."""
        batch = [first]
        rows = len(first.rows)
        # By length: only requests padding to the first one's bucket join it. A 12-token
        # query padded to 32 beside a 30-token one costs what a 32-token one does, and on a
        # compute-bound model that ate what batching saves (see EngineConfig.batch_by_length).
        length = self._length(first) if self.by_length else None
        for item in list(pending):  # earlier ones set aside go first
            if self._fits(item, rows, length):
                pending.remove(item)
                batch.append(item)
                rows += len(item.rows)
        wait = self.window_s if self._busy is None or self._busy() else 0.0
        deadline = time.monotonic() + wait
        stop = False
        while rows < self.max_rows:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            if not self._fits(item, rows, length):
                # Doesn't fit: it runs in a later batch, ahead of the queue. A lone worker
                # looks on for more of its length; with several, the rest of the queue stays
                # there for the others (set aside here, only this worker could take it).
                pending.append(item)
                if length is None or len(self.runners) > 1:
                    break
                continue
            batch.append(item)
            rows += len(item.rows)
        return batch, stop

    def _worker(self, index: int) -> None:
        if self._on_thread_start is not None:
            self._on_thread_start(index)
        pending: deque = deque()
        stop = False
        while not stop:
            first = pending.popleft() if pending else self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first, pending)
            self._run(batch, index)
        while pending:  # set aside before the stop mark: they were queued before close()
            self._run([pending.popleft()], index)
        # Fail whatever is left so no caller waits forever (each worker took one stop
        # mark; another worker's mark goes back for it).
        while True:
            try:
                item = pending.popleft() if pending else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            if not item.future.done():
                item.future.set_exception(RuntimeError("the inference worker is shut down"))

    def _run(self, batch: list[_Request], index: int) -> None:
        rows = [row for request in batch for row in request.rows]
        try:
            arrays = pad_rows(rows, self.buckets if self.pad_to_bucket else None, self.pad_id)
            logits = self.runners[index](*arrays)
        except Exception as exc:  # a failure answers every waiting caller
            log.exception("inference failed for a batch of %d rows", len(rows))
            for request in batch:
                request.future.set_exception(exc)
            return
        with self._lock:
            self.batches_total += 1
            self.worker_batches[index] += 1
            self.inferences_total += len(rows)
            self.batch_size_counts[len(batch)] = self.batch_size_counts.get(len(batch), 0) + 1
        offset = 0
        for request in batch:
            out = []
            for row in request.rows:
                out.append(logits[offset, : len(row.positions)])
                offset += 1
            request.future.set_result(out)
