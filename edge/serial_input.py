"""The serial terminal's input side: bytes decoded as they come become lines, with echo and
editing for a person (backspace over double-width characters, Ctrl-U, Ctrl-C, arrow keys
swallowed) or kept as sent for a program; overlong and undecodable lines are marked."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Iterator

from edge.serial_render import DEFAULT_MAX_LINE, char_width

@dataclass
class Line:
    """A completed input line; ``error`` is set when it must not be run."""

    text: str
    error: str | None = None


def _is_undecodable(char: str) -> bool:
    # surrogateescape maps each invalid byte to U+DC80..U+DCFF; valid UTF-8
    # never decodes to a lone surrogate, so these mark bad input exactly.
    return "\udc80" <= char <= "\udcff"


class LineEditor:
    """Turns decoded characters into lines, with optional echo and editing.

    ``feed`` yields events in order: ``("echo", text)`` to write back to the
    terminal, ``("bell", "")`` and ``("line", Line)``. With ``editing`` off (line
    mode) every character except the line ends is kept as sent. CR, LF and CRLF
    each end one line.
    """

    def __init__(self, max_chars: int = DEFAULT_MAX_LINE, editing: bool = False, echo: bool = False):
        self.max_chars = max_chars
        self.editing = editing
        self.echo = echo
        self.reset()

    def reset(self) -> None:
        """Forget the partial line (e.g. after the port was reopened)."""
        self.chars: list[str] = []
        self.overflow = False
        self._after_cr = False
        self._escape = ""  # "" | "esc" | "csi" | "ss3"

    def _show(self, text: str) -> Iterator[tuple[str, Any]]:
        if self.echo and text:
            yield ("echo", text)

    def _erase(self, count: int) -> Iterator[tuple[str, Any]]:
        """Remove ``count`` characters from the end, erasing their columns."""
        columns = 0
        for _ in range(min(count, len(self.chars))):
            char = self.chars.pop()
            columns += 1 if _is_undecodable(char) else char_width(char)
        yield from self._show("\b" * columns + " " * columns + "\b" * columns)

    def _end_line(self) -> Line:
        text = "".join(self.chars)
        if self.overflow:
            line = Line(text, "line_too_long")
        elif any(_is_undecodable(c) for c in text):
            line = Line(text, "invalid_utf8")
        else:
            line = Line(text)
        self.chars = []
        self.overflow = False
        return line

    def _escape_step(self, char: str) -> None:
        """Swallow one character of an ANSI escape sequence (arrow keys etc.)."""
        if self._escape == "esc":
            self._escape = {"[": "csi", "O": "ss3"}.get(char, "")
        elif self._escape == "ss3":
            self._escape = ""
        elif "\x40" <= char <= "\x7e":  # CSI final byte
            self._escape = ""

    def feed(self, text: str) -> Iterator[tuple[str, Any]]:
        """Consume decoded characters; yield echo/bell/line events in order."""
        for char in text:
            after_cr, self._after_cr = self._after_cr, False
            if char == "\n" and after_cr:
                continue  # the LF of a CRLF pair
            if char in "\r\n":
                self._after_cr = char == "\r"
                self._escape = ""
                yield from self._show("\r\n")
                yield ("line", self._end_line())
                continue
            if not self.editing:
                self._append(char)
                continue
            if self._escape:
                self._escape_step(char)
            elif char == "\x1b":
                self._escape = "esc"
            elif char in ("\x08", "\x7f"):
                yield from self._erase(1)
            elif char == "\x15":  # Ctrl-U: kill the line
                yield from self._erase(len(self.chars))
                self.overflow = False
            elif char == "\x03":  # Ctrl-C: cancel the line
                self.chars, self.overflow = [], False
                yield ("echo", "^C\r\n")
                yield ("line", Line("", "cancelled"))
            elif unicodedata.category(char) == "Cc" and not _is_undecodable(char):
                continue  # other control characters (tab, NUL, bell) are ignored
            else:
                if not self._append(char):
                    yield ("bell", "")
                elif not self.overflow:
                    yield from self._show("?" if _is_undecodable(char) else char)

    def _append(self, char: str) -> bool:
        """Add a character unless the line is full; return False when it was dropped."""
        if len(self.chars) >= self.max_chars:
            first = not self.overflow
            self.overflow = True
            return not first  # ring the bell once, stay quiet after
        self.chars.append(char)
        return True
