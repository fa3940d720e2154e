"""Serial-terminal front end: one line in, the answer out, over pyserial.

Two modes share one reader:

- ``terminal`` is for a person on a serial console (minicom, screen, PuTTY):
  characters are echoed, backspace/DEL erase whole (double-width) characters,
  Ctrl-U clears the line, Ctrl-C cancels it, arrow-key escape sequences are
  swallowed, output lines end in CRLF, and answers are a readable table with
  confidence bars and the low-confidence hint. ``?`` or ``help`` shows help.
- ``line`` is for a program: each line is a plain sentence or a JSON object
  ``{"text": ..., "top_k": ..., "blank_length": ..., "id": ...}``; each answer is
  one line of JSON, the HTTP API's response or ``{"error": ..., "message": ...}``.

Bytes are decoded incrementally (a character may arrive split across reads).
Invalid bytes, overlong lines and bad queries get an error line and the session
goes on; a port that disappears (USB adapter unplugged) is reopened with
backoff. Modelled on pyserial's miniterm: a class handed an open port, with a
named reader thread; the engine may be shared with the HTTP service.

This module is the port's side (opening and reopening the port, the reader thread,
writing, the ``serial`` command's options); what a line asks for and the lines that
answer it are :mod:`edge.serial_protocol`, the line editing :mod:`edge.serial_input`,
what a person sees :mod:`edge.serial_render`.

Wiring into the command line (``python -m edge serial PORT``)::

    sub = subparsers.add_parser("serial", help="serve a serial port")
    add_serial_arguments(sub)
    ...
    return run_serial(args, engine)
"""

from __future__ import annotations

import argparse
import codecs
import logging
import signal
import threading
import time
from typing import Any, Callable

import serial

from edge.serial_input import Line, LineEditor
from edge.serial_protocol import SerialProtocol
from edge.serial_render import DEFAULT_MAX_LINE

LOG = logging.getLogger("edge.serial")

MODES = ("terminal", "line")
DEFAULT_PROMPT = "填空> "
READ_TIMEOUT_S = 0.2  # how often the reader wakes up to notice stop()
WRITE_TIMEOUT_S = 5.0  # a peer that stops reading must not hang the reader forever

PARITIES = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD,
            "M": serial.PARITY_MARK, "S": serial.PARITY_SPACE}
STOPBITS = {"1": serial.STOPBITS_ONE, "1.5": serial.STOPBITS_ONE_POINT_FIVE, "2": serial.STOPBITS_TWO}


# -- the terminal ---------------------------------------------------------------

class SerialTerminal:
    """Serve fill-in-the-blank queries on one serial port.

    ``port`` is an open pyserial port (``serial.Serial`` or ``serial_for_url``);
    ``reopen``, when given, is called to get a fresh port after the old one
    failed (device unplugged), with exponential backoff up to ``max_backoff_s``.
    ``engine`` is anything with ``predict(text, top_k=, blank_length=)`` and
    ``info()``; one engine may serve this and the HTTP app at the same time.
    """

    def __init__(self, port: Any, engine: Any, mode: str = "terminal", top_k: int = 5,
                 blank_length: int | str | None = None, max_line: int = DEFAULT_MAX_LINE,
                 prompt: str = DEFAULT_PROMPT, echo: bool = True, encoding: str = "utf-8",
                 reopen: Callable[[], Any] | None = None, max_backoff_s: float = 30.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        codecs.lookup(encoding)  # fail now, naming the encoding, not in the thread
        self.port = port
        self.mode = mode
        self.prompt = prompt
        self.encoding = encoding
        self.reopen = reopen
        self.max_backoff_s = max_backoff_s
        terminal = mode == "terminal"
        self.newline = "\r\n" if terminal else "\n"
        self.editor = LineEditor(max_line, editing=terminal, echo=terminal and echo)
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="surrogateescape")
        self.protocol = SerialProtocol(engine, mode, top_k, blank_length, max_line)
        self._last_port_name = str(getattr(port, "port", None) or "port")
        self._alive = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Start the reader thread (named ``serial-reader``) and return."""
        self._alive.set()
        self._thread = threading.Thread(target=self._reader, name="serial-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the reader thread to finish (safe from a signal handler)."""
        self._alive.clear()
        port = self.port
        if port is not None and hasattr(port, "cancel_read"):
            try:
                port.cancel_read()
            except Exception:  # the port may already be gone; stopping must not fail
                pass

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reader thread to finish."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the reader thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop, wait, and close the port."""
        self.stop()
        self.join()
        self._close_port()

    # -- reader --------------------------------------------------------------
    def _reader(self) -> None:
        backoff = 0.5
        greeted = False
        while self._alive.is_set():
            if self.port is None:
                if not self._try_reopen(backoff):
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                backoff = 0.5
                greeted = False
            try:
                if not greeted:
                    self._greet()
                    greeted = True
                data = self.port.read(max(1, getattr(self.port, "in_waiting", 0) or 1))
                if data:
                    self._handle_bytes(data)
            except (serial.SerialException, OSError) as exc:
                if not self._alive.is_set():
                    break
                LOG.warning("serial port %s failed: %s", self._port_name(), exc)
                self._close_port()
                if self.reopen is None:
                    LOG.error("no way to reopen %s; serial front end stops", self._port_name())
                    self._alive.clear()
        LOG.info("serial reader stopped after %d lines", self.protocol.lines_served)

    def _port_name(self) -> str:
        return str(getattr(self.port, "port", None) or self._last_port_name)

    def _close_port(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            self._last_port_name = str(getattr(port, "port", "port"))
            try:
                port.close()
            except Exception:  # closing a vanished device may fail; it is gone either way
                pass

    def _try_reopen(self, backoff: float) -> bool:
        """Wait ``backoff`` seconds (noticing stop()), then try to reopen the port once."""
        deadline = time.monotonic() + backoff
        while self._alive.is_set() and time.monotonic() < deadline:
            time.sleep(max(0.0, min(READ_TIMEOUT_S, deadline - time.monotonic())))
        if not self._alive.is_set() or self.reopen is None:
            return False
        try:
            self.port = self.reopen()
        except (serial.SerialException, OSError, ValueError) as exc:
            LOG.info("reopening %s failed (%s); next try in %.1f s",
                     self._last_port_name, exc, min(backoff * 2, self.max_backoff_s))
            return False
        LOG.info("serial port %s reopened", self._port_name())
        self.decoder.reset()
        self.editor.reset()
        return True

    def _greet(self) -> None:
        """Show a banner and the prompt to a person; programs get nothing."""
        if self.mode != "terminal":
            return
        info = self.protocol.model_info()
        name = info.get("name", "?")
        self._write_lines([f"中文填空 · 模型 {name} · 输入 ? 查看帮助"])
        if info.get("random_init"):
            self._write_lines(["!! 警告：模型权重是随机初始化的，只能测速，答案没有意义"])
        self._write_text(self.prompt)

    def _handle_bytes(self, data: bytes) -> None:
        text = self.decoder.decode(data)
        for kind, value in self.editor.feed(text):
            if kind == "echo":
                self._write_text(value)
            elif kind == "bell":
                self._write_text("\a")
            elif kind == "line":
                self._handle_line(value)

    # -- answers -------------------------------------------------------------
    def _handle_line(self, line: Line) -> None:
        lines = self.protocol.answer(line)
        if lines:
            self._write_lines(lines)
        if self.mode == "terminal":
            self._write_text(self.prompt)

    # -- output --------------------------------------------------------------
    def _write_text(self, text: str) -> None:
        if self.port is None:
            return
        try:
            self.port.write(text.encode(self.encoding, errors="replace"))
        except serial.SerialTimeoutException:
            LOG.warning("write to %s timed out; output dropped", self._port_name())

    def _write_lines(self, lines: list[str]) -> None:
        self._write_text("".join(line + self.newline for line in lines))


# -- opening ports and the command line -----------------------------------------

def open_port(url: str, baudrate: int = 115200, bytesize: int = 8, parity: str = "N",
              stopbits: str = "1", rtscts: bool = False, xonxoff: bool = False) -> Any:
    """Open a device path (``/dev/ttyUSB0``, ``/dev/pts/3``) or pyserial URL (``loop://``).

    Raises ``serial.SerialException`` (device missing, busy, no permission) or
    ValueError (bad setting), each naming the port.
    """
    if parity.upper() not in PARITIES:
        raise ValueError(f"{url}: parity must be one of {', '.join(PARITIES)}, got {parity!r}")
    if str(stopbits) not in STOPBITS:
        raise ValueError(f"{url}: stop bits must be one of {', '.join(STOPBITS)}, got {stopbits!r}")
    settings = dict(baudrate=baudrate, bytesize=bytesize, parity=PARITIES[parity.upper()],
                    stopbits=STOPBITS[str(stopbits)], rtscts=rtscts, xonxoff=xonxoff,
                    timeout=READ_TIMEOUT_S, write_timeout=WRITE_TIMEOUT_S)
    if "://" not in url:
        settings["exclusive"] = True  # a second reader on one tty would steal half the bytes
    return serial.serial_for_url(url, **settings)


def add_serial_arguments(parser: Any) -> None:
    """Add the ``serial`` subcommand's options to an argparse parser."""
    parser.add_argument("port", help="serial device (/dev/ttyUSB0, /dev/serial0, /dev/pts/N) "
                                     "or pyserial URL (loop://, rfc2217://host:port)")
    parser.add_argument("--mode", choices=MODES, default="terminal",
                        help="terminal: for a person (echo, editing, tables); line: one JSON answer per line")
    parser.add_argument("--baud", type=int, default=115200, help="baud rate")
    parser.add_argument("--bytesize", type=int, choices=(5, 6, 7, 8), default=8, help="data bits")
    parser.add_argument("--parity", choices=sorted(PARITIES), default="N", help="parity")
    parser.add_argument("--stopbits", choices=sorted(STOPBITS), default="1", help="stop bits")
    parser.add_argument("--rtscts", action="store_true", help="RTS/CTS hardware flow control")
    parser.add_argument("--xonxoff", action="store_true", help="XON/XOFF software flow control")
    parser.add_argument("--top-k", type=int, default=5, help="candidates per blank")
    parser.add_argument("--max-line", type=int, default=DEFAULT_MAX_LINE,
                        help="longest accepted line, in characters")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt shown in terminal mode")
    parser.add_argument("--no-echo", dest="echo", action="store_false",
                        help="do not echo typed characters (for terminals with local echo)")
    parser.add_argument("--encoding", default="utf-8",
                        help="character encoding on the wire (utf-8; gb18030 for old terminals)")
    parser.add_argument("--max-backoff", type=float, default=30.0,
                        help="longest wait, in seconds, between attempts to reopen a lost port")


def serial_options(port: str, **overrides: Any) -> argparse.Namespace:
    """Return the ``serial`` options with their defaults for ``port``, plus ``overrides``.

    For a process that serves HTTP and a serial port with one engine, e.g.
    ``start_serial(serial_options("/dev/ttyUSB0", mode="line"), engine)``.
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_serial_arguments(parser)
    options = parser.parse_args([port])
    for key, value in overrides.items():
        if not hasattr(options, key):
            raise ValueError(f"unknown serial option {key!r}")
        setattr(options, key, value)
    return options


def start_serial(args: Any, engine: Any) -> SerialTerminal:
    """Open the port named in ``args`` and start serving it in a background thread.

    For running next to the HTTP service in one process (sharing ``engine`` and its
    micro-batcher). Raises ``serial.SerialException``/ValueError if the port
    cannot be opened at start.
    """
    def reopen() -> Any:
        return open_port(args.port, args.baud, args.bytesize, args.parity, args.stopbits,
                         args.rtscts, args.xonxoff)

    port = reopen()
    terminal = SerialTerminal(port, engine, mode=args.mode, top_k=args.top_k, max_line=args.max_line,
                              prompt=args.prompt, echo=args.echo, encoding=args.encoding,
                              reopen=reopen, max_backoff_s=args.max_backoff)
    terminal.start()
    LOG.info("serving %s in %s mode (%d baud, %d%s%s)", args.port, args.mode, args.baud,
             args.bytesize, args.parity, args.stopbits)
    return terminal


def run_serial(args: Any, engine: Any) -> int:
    """Serve the serial port in ``args`` until SIGTERM/SIGINT; return an exit code.

    Returns 2, after logging a one-line reason, when the port cannot be opened.
    """
    try:
        terminal = start_serial(args, engine)
    except (serial.SerialException, ValueError, LookupError) as exc:
        LOG.error("cannot serve %s: %s", args.port, exc)
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: terminal.stop())
    try:
        while terminal.alive:
            terminal.join(0.5)
    except KeyboardInterrupt:
        pass
    terminal.close()
    return 0
