"""The serial front end, driven over real pseudo-terminals and pyserial's loop://.

A pty pair stands in for the USB-serial adapter: the terminal opens the slave side
with pyserial exactly as it opens /dev/ttyUSB0, and the test plays the person (or
program) at the other end by reading and writing the master side.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("serial")

from edge import serial_input, serial_render  # noqa: E402
from edge import serial_terminal as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_engine import FakeEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_BUNDLE = ROOT / "tests" / "fixtures" / "tiny_bundle"
POEM = "床前明月光，疑是地[MASK]霜。"
TIMEOUT = 10.0  # generous: the test machine is shared with a training run

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs POSIX pseudo-terminals")


# -- helpers --------------------------------------------------------------------

class PtyPeer:
    """The far end of a serial line: the master side of a pty pair."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.received = b""

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, marker: bytes, timeout: float = TIMEOUT) -> bytes:
        """Read until ``marker`` appears after what was already consumed; return the new bytes."""
        deadline = time.monotonic() + timeout
        while marker not in self.received:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; got {self.received!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self.received += os.read(self.master, 4096)
        head, _, tail = self.received.partition(marker)
        self.received = tail
        return head + marker

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def peer():
    p = PtyPeer()
    yield p
    p.close()


def start_terminal(peer: PtyPeer, engine, **kwargs) -> st.SerialTerminal:
    port = st.open_port(peer.path, baudrate=115200)
    terminal = st.SerialTerminal(port, engine, **kwargs)
    terminal.start()
    return terminal


PROMPT = st.DEFAULT_PROMPT.encode()


# -- line editing (no port) ------------------------------------------------------

def events(editor: serial_input.LineEditor, text: str):
    return list(editor.feed(text))


def test_line_endings_cr_lf_crlf():
    editor = serial_input.LineEditor()
    lines = [v.text for k, v in events(editor, "a\rb\nc\r\nd\n\n") if k == "line"]
    assert lines == ["a", "b", "c", "d", ""]  # CRLF is one end of line, LF LF two


def test_backspace_erases_whole_wide_character():
    editor = serial_input.LineEditor(editing=True, echo=True)
    out = events(editor, "ab中\x7f\x08")
    echoed = "".join(v for k, v in out if k == "echo")
    # 中 takes two columns, b one: each erased with backspace-space-backspace.
    assert echoed == "ab中" + "\b\b  \b\b" + "\b \b"
    (_, line), = [e for e in events(editor, "\r") if e[0] == "line"]
    assert line.text == "a" and line.error is None


def test_escape_sequences_and_controls_are_swallowed():
    editor = serial_input.LineEditor(editing=True, echo=True)
    out = events(editor, "a\x1b[A\x1b[1;5C\x1bOPb\tc\x00\r")
    assert [v.text for k, v in out if k == "line"] == ["abc"]


def test_ctrl_u_and_ctrl_c():
    editor = serial_input.LineEditor(editing=True, echo=True)
    out = events(editor, "错字\x15对\r")
    assert [v.text for k, v in out if k == "line"] == ["对"]
    out = events(editor, "算了\x03")
    assert [(v.text, v.error) for k, v in out if k == "line"] == [("", "cancelled")]


def test_overflow_rings_once_and_rejects_line():
    editor = serial_input.LineEditor(max_chars=3, editing=True, echo=True)
    out = events(editor, "abcdef\r")
    assert [k for k, _ in out].count("bell") == 1
    assert "".join(v for k, v in out if k == "echo") == "abc\r\n"
    (line,) = [v for k, v in out if k == "line"]
    assert line.error == "line_too_long"
    # The next line is fine again.
    assert [v.error for k, v in events(editor, "ok\r") if k == "line"] == [None]


def test_invalid_bytes_mark_line_and_can_be_erased():
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    editor = serial_input.LineEditor(editing=True, echo=True)
    text = decoder.decode(b"x\xff")
    out = events(editor, text + "\r")
    assert [v.error for k, v in out if k == "line"] == ["invalid_utf8"]
    # A person can backspace over the bad byte (shown as '?') and go on.
    out = events(editor, decoder.decode(b"\xfey\x7f\x7fz\r"))
    assert [(v.text, v.error) for k, v in out if k == "line"] == [("z", None)]


def test_format_answer_table():
    engine = FakeEngine()
    lines = serial_render.format_answer(POEM, engine.predict(POEM, top_k=2))
    assert lines[0] == "=> 床前明月光，疑是地【上】霜。"
    assert "81.0%" in lines[1] and "[################....]" in lines[1]
    assert lines[2].strip().startswith("2. 下")
    low = serial_render.format_answer("天气[MASK][MASK]", engine.predict("天气[MASK][MASK]"))
    assert any(serial_render.LOW_CONFIDENCE_HINT in line for line in low)
    loud = serial_render.format_answer(POEM, FakeEngine(random_init=True).predict(POEM))
    assert "随机" in loud[0]


# -- terminal mode over a pty ----------------------------------------------------

def test_terminal_session_split_utf8_and_crlf(peer):
    engine = FakeEngine()
    terminal = start_terminal(peer, engine)
    try:
        banner = peer.read_until(PROMPT)
        assert "fake-engine".encode() in banner and "? 查看帮助".encode() in banner
        data = POEM.encode("utf-8")
        cut = data.index("光".encode()) + 1  # split inside a three-byte character
        peer.send(data[:cut])
        time.sleep(0.3)  # make sure the halves arrive in separate reads
        peer.send(data[cut:] + b"\r")
        out = peer.read_until(PROMPT).decode("utf-8")
        assert out.startswith(POEM + "\r\n")  # echoed, then CRLF
        assert "=> 床前明月光，疑是地【上】霜。\r\n" in out
        assert "81.0%" in out and "\r\n" in out
        assert "\n" not in out.replace("\r\n", "")  # no bare LF reaches the terminal
        assert engine.calls[-1] == {"text": POEM, "top_k": 5, "blank_length": None}
    finally:
        terminal.close()


def test_terminal_editing_help_errors_and_recovery(peer):
    engine = FakeEngine()
    terminal = start_terminal(peer, engine)
    try:
        peer.read_until(PROMPT)
        peer.send("ab中\x7f[MASK]\r".encode())
        out = peer.read_until(PROMPT).decode()
        assert "\b\b  \b\b" in out
        assert engine.calls[-1]["text"] == "ab[MASK]"

        peer.send(b"?\r")
        assert "[MASK]" in peer.read_until(PROMPT).decode()

        peer.send(b"\xff\xfe[MASK]\r")  # invalid UTF-8
        assert "UTF-8".encode() in peer.read_until(PROMPT)

        peer.send("没有空\r".encode())  # engine InputError
        assert "错误：没有空".encode() in peer.read_until(PROMPT)

        peer.send(b"BOOM [MASK]\r")  # engine crash: the session goes on
        assert "内部错误".encode() in peer.read_until(PROMPT)

        peer.send(b"top 2\r")
        peer.read_until(PROMPT)
        peer.send("今天天气很[MASK][MASK]。\r".encode())
        out = peer.read_until(PROMPT).decode()
        assert serial_render.LOW_CONFIDENCE_HINT in out
        assert "3." not in out and engine.calls[-1]["top_k"] == 2
        assert terminal.alive
    finally:
        terminal.close()


def test_terminal_overlong_line(peer):
    engine = FakeEngine()
    terminal = start_terminal(peer, engine, max_line=10)
    try:
        peer.read_until(PROMPT)
        peer.send(b"x" * 30 + b"\r")
        out = peer.read_until(PROMPT)
        assert b"\a" in out and "超过 10 个字符".encode() in out
        assert engine.calls == []
    finally:
        terminal.close()


# -- line mode over a pty ------------------------------------------------------------

def read_json(peer: PtyPeer) -> dict:
    line = peer.read_until(b"\n")
    assert not line.endswith(b"\r\n"), "line mode answers end in LF"
    return json.loads(line.decode("utf-8"))


def test_line_mode_protocol(peer):
    engine = FakeEngine()
    terminal = start_terminal(peer, engine, mode="line")
    try:
        peer.send(json.dumps({"text": POEM, "top_k": 3, "id": 7}, ensure_ascii=False).encode() + b"\n")
        answer = read_json(peer)
        assert answer["id"] == 7 and answer["blanks"][0]["candidates"][0]["text"] == "上"
        assert len(answer["blanks"][0]["candidates"]) == 3

        peer.send(POEM.encode() + b"\r\n")  # a plain line, CRLF
        answer = read_json(peer)
        assert answer["cached"] is False and len(answer["blanks"][0]["candidates"]) == 5

        peer.send(b"\n")  # blank keep-alive lines get no answer
        peer.send(b'{"text": \n')
        assert read_json(peer)["error"] == "invalid_json"
        peer.send(b'{"top_k": 3}\n')
        assert read_json(peer)["error"] == "bad_request"
        peer.send(b'{"text": "[MASK]", "top_k": "5"}\n')
        assert read_json(peer)["error"] == "bad_request"
        peer.send(b"\xc3[MASK]\n")
        assert read_json(peer)["error"] == "invalid_utf8"
        peer.send(json.dumps({"text": "no blank here"}).encode() + b"\n")
        error = read_json(peer)
        assert error["error"] == "no_blank" and "[MASK]" in error["message"]
        peer.send(b"BOOM[MASK]\n")
        assert read_json(peer)["error"] == "internal_error"
        peer.send(b"x" * (serial_render.DEFAULT_MAX_LINE + 5) + b"\n")
        assert read_json(peer)["error"] == "line_too_long"
        peer.send(POEM.encode() + b"\n")
        assert read_json(peer)["cached"] is True  # still serving after every error
        assert peer.received == b""  # nothing but the answers above
    finally:
        terminal.close()


def test_reconnect_after_port_vanishes():
    first, second = PtyPeer(), PtyPeer()
    opened = []

    def reopen():
        port = st.open_port(second.path)
        opened.append(port)
        return port

    engine = FakeEngine()
    terminal = st.SerialTerminal(st.open_port(first.path), engine, mode="line", reopen=reopen, max_backoff_s=1.0)
    terminal.start()
    try:
        first.send(POEM.encode() + b"\n")
        assert read_json(first)["blanks"]
        first.close()  # the adapter is unplugged: reads now fail with EIO
        deadline = time.monotonic() + TIMEOUT
        while not opened and time.monotonic() < deadline:
            time.sleep(0.05)  # until reopened, the new pty is still in cooked (echoing) mode
        assert opened, "the terminal did not reopen the port"
        second.send(POEM.encode() + b"\n")
        assert read_json(second)["cached"] is True
        assert terminal.alive
    finally:
        terminal.close()
        second.close()


def test_stop_while_waiting_to_reopen():
    def reopen():
        raise st.serial.SerialException("could not open port /dev/ttyGONE: no such file")

    peer = PtyPeer()
    terminal = st.SerialTerminal(st.open_port(peer.path), FakeEngine(), mode="line", reopen=reopen, max_backoff_s=0.5)
    terminal.start()
    peer.close()
    time.sleep(1.5)  # a few failed reopen attempts, each logged, none fatal
    assert terminal.alive
    started = time.monotonic()
    terminal.close()
    assert not terminal.alive and time.monotonic() - started < 2.0


# -- loop:// ---------------------------------------------------------------------------

def test_loop_url_port():
    """pyserial's loop:// port: reads come from the queue the test writes into.

    loop:// echoes every write back as input, so the terminal's own answers would be
    read as new queries; the test keeps the port's real write for input and captures
    what the terminal writes instead.
    """
    port = st.open_port("loop://", baudrate=9600)
    feed = port.write
    written: list[bytes] = []
    port.write = lambda data: written.append(bytes(data)) or len(data)
    engine = FakeEngine()
    terminal = st.SerialTerminal(port, engine, mode="line")
    terminal.start()
    try:
        feed(POEM.encode()[:5])
        time.sleep(0.3)
        feed(POEM.encode()[5:] + b"\n")
        deadline = time.monotonic() + TIMEOUT
        while not written and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = json.loads(b"".join(written).decode())
        assert answer["blanks"][0]["start"] == POEM.index("[MASK]")
    finally:
        terminal.close()


# -- command line hook -------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser()
    st.add_serial_arguments(parser)
    return parser.parse_args(argv)


def test_arguments_and_start_serial(peer):
    args = parse([peer.path, "--mode", "line", "--baud", "9600", "--parity", "E", "--stopbits", "2"])
    assert (args.baud, args.parity, args.stopbits, args.bytesize) == (9600, "E", "2", 8)
    terminal = st.start_serial(args, FakeEngine())
    try:
        assert terminal.port.baudrate == 9600 and terminal.port.parity == "E" and terminal.port.stopbits == 2
        peer.send(POEM.encode() + b"\n")
        assert read_json(peer)["blanks"]
    finally:
        terminal.close()


def test_run_serial_missing_port_is_a_clear_error(caplog):
    args = parse(["/dev/ttyDOES_NOT_EXIST"])
    assert st.run_serial(args, FakeEngine()) == 2
    assert "/dev/ttyDOES_NOT_EXIST" in caplog.text


def test_bad_settings():
    with pytest.raises(ValueError, match="parity"):
        st.open_port("loop://", parity="X")
    with pytest.raises(ValueError, match="mode"):
        st.SerialTerminal(None, FakeEngine(), mode="chat")
    with pytest.raises(LookupError):
        st.SerialTerminal(None, FakeEngine(), encoding="no-such-codec")


# -- the real engine ----------------------------------------------------------------------

@pytest.mark.skipif(not (TINY_BUNDLE / "manifest.json").is_file(), reason="tests/fixtures/tiny_bundle not built yet")
def test_real_engine_on_tiny_bundle(peer):
    pytest.importorskip("onnxruntime")
    from edge.engine import Engine

    engine = Engine.from_bundle(TINY_BUNDLE, threads=1)
    terminal = start_terminal(peer, engine, mode="line")
    try:
        peer.send(json.dumps({"text": POEM, "top_k": 3}, ensure_ascii=False).encode() + b"\n")
        answer = read_json(peer)
        (blank,) = answer["blanks"]
        assert blank["start"] == POEM.index("[MASK]") and len(blank["candidates"]) == 3
        scores = [c["score"] for c in blank["candidates"]]
        assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
        assert answer["blanks"] == engine.predict(POEM, top_k=3)["blanks"]  # same answer as in-process
        peer.send("没有空\n".encode())
        assert read_json(peer)["error"] == "no_blank"
    finally:
        terminal.close()
        engine.close()


@pytest.mark.skipif(not (TINY_BUNDLE / "manifest.json").is_file(), reason="tests/fixtures/tiny_bundle not built yet")
def test_real_engine_terminal_mode(peer):
    pytest.importorskip("onnxruntime")
    from edge.engine import Engine

    engine = Engine.from_bundle(TINY_BUNDLE, threads=1)
    terminal = start_terminal(peer, engine)
    try:
        banner = peer.read_until(PROMPT).decode()
        assert engine.info()["name"] in banner
        if engine.info().get("random_init"):
            assert "随机" in banner  # the tiny bundle has random weights: say so loudly
        peer.send("今天天气很[MASK][MASK]。\r".encode())
        out = peer.read_until(PROMPT).decode()
        best = engine.predict("今天天气很[MASK][MASK]。")["blanks"][0]["candidates"][0]["text"]
        assert f"=> 今天天气很【{best}】。" in out and "%" in out
    finally:
        terminal.close()
        engine.close()


def test_serial_options_for_a_shared_engine(peer):
    """The HTTP process can serve a port too, with the same engine object."""
    engine = FakeEngine()
    options = st.serial_options(peer.path, mode="line", top_k=2)
    assert options.baud == 115200 and options.mode == "line"
    with pytest.raises(ValueError, match="speed"):
        st.serial_options(peer.path, speed=9600)
    terminal = st.start_serial(options, engine)
    try:
        peer.send(POEM.encode() + b"\n")
        assert len(read_json(peer)["blanks"][0]["candidates"]) == 2
        assert engine.calls[-1]["top_k"] == 2
    finally:
        terminal.close()


@pytest.mark.skipif(not (TINY_BUNDLE / "manifest.json").is_file(), reason="tests/fixtures/tiny_bundle not built yet")
def test_cli_serial_command_end_to_end(peer):
    """``python -m edge serial PORT`` as systemd runs it: answers, then stops cleanly on SIGTERM."""
    import signal
    import subprocess

    pytest.importorskip("onnxruntime")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serial", peer.path, "--mode", "line", "--bundle", str(TINY_BUNDLE),
         "--threads", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        # The port is configured (raw) once the terminal has opened it; until then
        # the pty would echo what we send, so wait for the log line.
        deadline = time.monotonic() + 60
        log_lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            log_lines.append(line)
            if "serving " + peer.path in line:
                break
        assert any("serving " + peer.path in line for line in log_lines), "".join(log_lines)
        peer.send(json.dumps({"text": POEM, "top_k": 2, "id": "a"}, ensure_ascii=False).encode() + b"\n")
        answer = read_json(peer)
        assert answer["id"] == "a" and len(answer["blanks"][0]["candidates"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _SlowSession:
    """An ONNX Runtime session whose every pass takes at least ``delay_s`` (a busy
    board), so that an HTTP flood really keeps the engine occupied."""

    def __init__(self, session, delay_s: float):
        self._session, self._delay_s = session, delay_s

    def run(self, *args, **kwargs):
        time.sleep(self._delay_s)
        return self._session.run(*args, **kwargs)


@pytest.mark.skipif(not (TINY_BUNDLE / "manifest.json").is_file(), reason="tests/fixtures/tiny_bundle not built yet")
def test_serial_is_answered_while_http_is_flooded(peer):
    """`serve --serial`: one engine behind the HTTP app and the serial port. A flood
    of HTTP requests past the admission limits is shed with 503s, and a query on the
    serial line is answered during the flood, after at most the passes that admission
    let in ahead of it (the engine's queue is first come, first served), not after
    the flood."""
    import threading
    import urllib.error
    import urllib.request

    from waitress.server import create_server

    from edge.app import create_app
    from edge.engine import Engine

    engine = Engine.from_bundle(TINY_BUNDLE, threads=1, batch_window_ms=0.0, cache_size=0)
    engine.sessions[0] = _SlowSession(engine.sessions[0], 0.05)
    app = create_app(engine=engine, config={"MAX_ACTIVE": 1, "MAX_WAITING": 1, "MAX_WAIT_MS": 5000})
    server = create_server(app, host="127.0.0.1", port=0, threads=12)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}/api/predict"
    flooding = threading.Event()
    flooding.set()
    statuses: list[int] = []

    def flood(worker: int) -> None:
        n = 0
        while flooding.is_set():
            body = json.dumps({"text": f"第{worker}路第{n}句[MASK]。"}).encode()
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
                time.sleep(0.01)  # a shed client comes straight back, as a flood does
            n += 1

    clients = [threading.Thread(target=flood, args=(k,)) for k in range(8)]
    terminal = start_terminal(peer, engine, mode="line")
    try:
        for client in clients:
            client.start()
        deadline = time.monotonic() + TIMEOUT
        while statuses.count(503) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert statuses.count(503) >= 5, statuses  # the HTTP side is overloaded now
        before = engine.stats()["batches_total"]
        peer.send(json.dumps({"text": POEM, "top_k": 3}, ensure_ascii=False).encode() + b"\n")
        answer = read_json(peer)
        passes = engine.stats()["batches_total"] - before
        assert flooding.is_set() and all(c.is_alive() for c in clients)  # answered during the flood
        assert len(answer["blanks"][0]["candidates"]) == 3
        # Ahead of it at most the one admitted + one waiting HTTP request (one pass
        # each for a one-character blank); a few more may start while it is read back.
        assert passes <= 6, passes
    finally:
        flooding.clear()
        for client in clients:
            client.join(timeout=TIMEOUT)
        terminal.close()
        server.close()
        engine.close()
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}
