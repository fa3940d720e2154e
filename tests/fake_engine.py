"""A fake engine with the Engine API (predict, info, stats, close) for front-end tests.

It finds blanks the way the real engine does ([MASK] runs, adjacent masks form one
blank), validates its input with the same error codes, and answers with fixed,
deterministic candidates: single-character blanks get a confident answer,
multi-character blanks a low-confidence one (so the hint shows). A text containing
``BOOM`` makes ``predict`` raise RuntimeError, to test the 500 path.

Run as a script it serves the app with this engine under waitress, for the browser
test: ``python tests/fake_engine.py --port 8123 [--random-init] [--token T]``.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

MASK_RUN_RE = re.compile(r"(?:[\[［]MASK[\]］]\s*)*[\[［]MASK[\]］]", re.IGNORECASE)
SINGLE_MASK_RE = re.compile(r"[\[［]MASK[\]］]", re.IGNORECASE)
HINT = "上下文信息不足，建议补充更多背景"

# Candidate pools by blank length; scores are fixed so tests can assert on them.
POOLS = {
    1: ["上", "下", "好", "吃", "热", "冷", "面", "中", "里", "外", "前", "后", "左", "右", "东", "西", "南", "北", "大", "小"],
    2: ["不错", "很好", "晴朗", "吃饭", "一般"],
    3: ["差不多", "不得了", "了不起", "好得很", "没问题"],
    4: ["一丝不苟", "踏踏实实", "认认真真", "兢兢业业", "稳稳当当"],
}
CONFIDENT = [0.81, 0.09, 0.04, 0.02, 0.01]
# A text holding this gets, fused, a first candidate from the phrase memory with its source.
FAMOUS = "床前明月光"
QUOTE = {"text": "床前明月光，疑是地上霜。", "title": "静夜思", "author": "李白", "dynasty": "唐"}
UNSURE = [0.35, 0.25, 0.15, 0.1, 0.05]


class FakeInputError(ValueError):
    """Same shape as edge.engine.InputError: a ValueError with a ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeEngine:
    """Deterministic stand-in for edge.engine.Engine."""

    def __init__(self, random_init: bool = False, max_blanks: int = 4, max_chars: int = 200, delay_s: float = 0.0):
        """``delay_s`` makes each prediction sleep (to test concurrency/latency paths)."""
        self.random_init = random_init
        self.max_blanks = max_blanks
        self.max_chars = max_chars
        self.delay_s = delay_s
        self.calls: list[dict[str, Any]] = []
        self.closed = False
        self._seen: set[tuple] = set()
        self._lock = threading.Lock()
        self._stats = {"cache_hits": 0, "cache_misses": 0, "batches_total": 0, "inferences_total": 0}
        self._batch_sizes: dict[int, int] = {}

    def predict(self, text: str, top_k: int = 5, blank_length: int | str | None = None,
                fusion: bool = True) -> dict[str, Any]:
        """Return the API JSON shape for ``text``; raise FakeInputError on bad input."""
        started = time.perf_counter()
        with self._lock:
            call = {"text": text, "top_k": top_k, "blank_length": blank_length}
            if not fusion:
                call["fusion"] = False
            self.calls.append(call)
        if "BOOM" in text:
            raise RuntimeError("fake engine failure (BOOM in the text)")
        if not text.strip():
            raise FakeInputError("empty_text", "文本为空 / the text is empty: type a sentence with [MASK]")
        if len(text) > self.max_chars:
            raise FakeInputError("text_too_long", f"文本太长 / text longer than {self.max_chars} characters")
        runs = list(MASK_RUN_RE.finditer(text))
        if not runs:
            raise FakeInputError("no_blank", "没有空 / no [MASK] in the text: mark the blank with [MASK]")
        if len(runs) > self.max_blanks:
            raise FakeInputError("too_many_blanks", f"空太多 / at most {self.max_blanks} blanks")
        if not isinstance(top_k, int) or not 1 <= top_k <= 20:
            raise FakeInputError("bad_top_k", "top_k must be 1..20")
        if blank_length is not None and blank_length != "auto" and not (
            isinstance(blank_length, int) and 1 <= blank_length <= 4
        ):
            raise FakeInputError("bad_blank_length", "blank_length must be 1..4 or 'auto'")
        if self.delay_s:
            time.sleep(self.delay_s)

        key = (text, top_k, blank_length, fusion)
        with self._lock:
            cached = key in self._seen
            self._seen.add(key)
            if cached:
                self._stats["cache_hits"] += 1
            else:
                self._stats["cache_misses"] += 1
                self._stats["batches_total"] += 1
                self._stats["inferences_total"] += 1
                self._batch_sizes[1] = self._batch_sizes.get(1, 0) + 1

        blanks = []
        for run in runs:
            n_masks = len(SINGLE_MASK_RE.findall(run.group()))
            length = n_masks
            if n_masks == 1 and isinstance(blank_length, int):
                length = blank_length
            elif n_masks == 1 and blank_length == "auto":
                length = 2
            length = min(length, 4)
            scores = CONFIDENT if length == 1 else UNSURE
            pool = POOLS[length]
            candidates = [
                {"text": pool[i], "score": scores[i] if i < len(scores) else 0.001,
                 "sources": ["model", "lm"] if fusion and i % 2 else ["model"]}
                for i in range(min(top_k, len(pool)))
            ]
            if fusion and FAMOUS in text and length == 1:
                candidates[0]["sources"] = ["lm", "memory"]
                candidates[0]["quote"] = dict(QUOTE)
            blank = {"start": run.start(), "length": length, "candidates": candidates,
                     "low_confidence": candidates[0]["score"] < 0.6}
            if blank["low_confidence"]:
                blank["hint"] = HINT
            blanks.append(blank)
        return {
            "blanks": blanks,
            "truncated": False,
            "cached": cached,
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 3),
            "fusion": fusion,
            "model": {"name": "fake-engine", "random_init": self.random_init},
        }

    def info(self) -> dict[str, Any]:
        """Return a manifest-like summary."""
        return {
            "name": "fake-engine",
            "source": "tests/fake_engine.py",
            "random_init": self.random_init,
            "vocab_size": 100,
            "architecture": {"model_type": "bert", "num_layers": 1, "hidden_size": 8, "num_heads": 1},
            "quantization": None,
            "evaluation": {},
            "files": {},
            "max_length": 64,
            "threads": 1,
            "version": "0.0-fake",
        }

    def stats(self) -> dict[str, Any]:
        """Return counters in the shape of Engine.stats()."""
        with self._lock:
            return {**self._stats, "batch_size_counts": dict(self._batch_sizes)}

    def close(self) -> None:
        """Mark the engine closed (the server must call this on shutdown)."""
        self.closed = True


def main(argv: list[str] | None = None) -> int:
    """Serve the app with a FakeEngine under waitress (used by the browser test)."""
    import argparse
    import logging

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge.app import create_app
    from edge.server import serve

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = FakeEngine(random_init=args.random_init)
    app = create_app(engine=engine, config={"API_TOKEN": args.token})
    return serve(app, host=args.host, port=args.port, threads=2, engine=engine)


if __name__ == "__main__":
    sys.exit(main())
