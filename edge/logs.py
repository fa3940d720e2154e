"""Logging set-up shared by the command-line tools (logs go to stdout for the journal)."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CurrentStreamHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is *now*.

    A handler that captured the stream object at set-up would keep writing to a
    stream that has since been replaced and closed (tests swap sys.stdout; a main()
    may run several times in one process).
    """

    def __init__(self, which: str = "stdout"):
        super().__init__()
        self.which = which

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, _value) -> None:
        pass  # the stream is always looked up at emit time


def setup_logging(debug: bool = False, which: str = "stdout") -> None:
    """Send log records to sys.stdout (or sys.stderr) with timestamps.

    Replaces a handler this function installed before and leaves any other root
    handler (pytest's log capture, say) alone.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, CurrentStreamHandler)]:
        root.removeHandler(handler)
    handler = CurrentStreamHandler(which)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
