"""The command line (edge/cli.py) and the real waitress server (edge/server.py).

The in-process tests hand the CLI the fake engine; the subprocess tests run
``python -m edge serve`` with the real engine on the tiny fixture bundle over a real
socket, then stop it with SIGTERM and check it exits cleanly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeEngine  # noqa: E402

from edge import __version__, cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_BUNDLE = ROOT / "tests" / "fixtures" / "tiny_bundle"
POEM = "床前明月光，疑是地[MASK]霜。"


def _real_engine_missing() -> str | None:
    """Why the real-engine tests cannot run, or None when they can."""
    if importlib.util.find_spec("edge.engine") is None:
        return "edge/engine.py is not there yet (the lead's engine)"
    if not (TINY_BUNDLE / "manifest.json").is_file():
        return f"the tiny fixture bundle {TINY_BUNDLE} is missing (run tests/make_tiny_checkpoint.py)"
    return None


needs_real_engine = pytest.mark.skipif(_real_engine_missing() is not None, reason=str(_real_engine_missing()))


@pytest.fixture
def fake(monkeypatch):
    """Make the CLI build a FakeEngine instead of loading a bundle."""
    engine = FakeEngine()
    monkeypatch.setattr(cli, "load_engine", lambda args: engine)
    return engine


# -- parsing -------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_serve_defaults_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no line wrapping inside "(default: ...)"
    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.http_threads, args.bundle, args.token) == ("127.0.0.1", 8000, None, None, None)
    assert (args.max_active, args.max_waiting, args.max_wait_ms) == (2, 8, 250.0)
    assert args.max_body == 16 * 1024 and args.serial is None
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 127.0.0.1)" in help_text and "(default: 8000)" in help_text


def test_token_from_environment_is_not_shown_in_help(capsys, monkeypatch):
    monkeypatch.setenv("FILLMASK_API_TOKEN", "very-secret-value")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "very-secret-value" not in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["predict", "a[MASK]", "--top-k", "0"],
    ["predict", "a[MASK]", "--top-k", "21"],
    ["predict", "a[MASK]", "--blank-length", "0"],
    ["predict", "a[MASK]", "--blank-length", "many"],
    ["serve", "--port", "notanumber"],
    ["serve", "--http-threads", "0"],
])
def test_bad_arguments_exit_2(argv, capsys, fake):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


# -- predict / info with the fake engine ---------------------------------------------

def test_predict_table(capsys, fake):
    assert cli.main(["predict", "他做事总是[MASK][MASK][MASK][MASK]，让人放心。地[MASK]霜"]) == 0
    out = capsys.readouterr().out
    assert "空 1/2" in out and "空 2/2" in out
    assert "一丝不苟" in out and "35.0%" in out
    assert "上下文信息不足，建议补充更多背景" in out
    assert " 1. 上" in out and "81.0%" in out
    assert fake.closed  # one-shot commands release the engine


def test_predict_table_aligns_cjk_columns():
    result = FakeEngine().predict("他做事总是[MASK][MASK][MASK][MASK]", top_k=3)
    rows = [line for line in cli.format_prediction("", result).splitlines() if "%" in line]
    # Same display width before the percentage in every row, whatever the candidate.
    widths = {cli.display_width(row[: row.index("%") - 5]) for row in rows}
    assert len(widths) == 1


def test_predict_json_is_the_api_shape(capsys, fake):
    assert cli.main(["predict", POEM, "--json", "--top-k", "2", "--blank-length", "auto"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["blanks"][0]["length"] == 2
    assert len(data["blanks"][0]["candidates"]) == 2
    assert fake.calls[-1] == {"text": POEM, "top_k": 2, "blank_length": "auto"}


def test_predict_input_error_exits_2(capsys, fake):
    assert cli.main(["predict", "没有空的句子"]) == 2
    err = capsys.readouterr().err
    assert "no [MASK]" in err


def test_predict_random_init_warns(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_engine", lambda args: FakeEngine(random_init=True))
    assert cli.main(["predict", POEM]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


def test_info(capsys, fake):
    assert cli.main(["info"]) == 0
    assert "fake-engine" in capsys.readouterr().out
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "fake-engine"


# -- bundles -------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("edge.engine") is None, reason="edge/engine.py is not there yet")
def test_missing_default_bundle_says_how_to_build(capsys, monkeypatch, tmp_path):
    import edge.bundle

    monkeypatch.setattr(edge.bundle, "DEFAULT_BUNDLE_DIR", tmp_path / "no_bundle_here")
    assert cli.main(["predict", POEM]) == 2
    err = capsys.readouterr().err
    assert "make model" in err and "python -m tools build" in err and "--bundle" in err


@pytest.mark.skipif(importlib.util.find_spec("edge.engine") is None, reason="edge/engine.py is not there yet")
def test_bad_bundle_path_exits_2(capsys, tmp_path):
    assert cli.main(["info", "--bundle", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


@needs_real_engine
def test_predict_real_engine_json():
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "predict", POEM, "--bundle", str(TINY_BUNDLE), "--json", "--top-k", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # logs went to stderr, stdout is pure JSON
    assert data["blanks"][0]["start"] == POEM.index("[MASK]")
    assert len(data["blanks"][0]["candidates"]) == 3


# -- the real server over a real socket ----------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    """Return (status, headers, body bytes) without raising on 4xx/5xx."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def start_server(extra_args: list[str], port: int) -> subprocess.Popen:
    """Start ``python -m edge serve`` on ``port`` and wait until /healthz answers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("FILLMASK_API_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--bundle", str(TINY_BUNDLE), "--port", str(port),
         "--threads", "1", *extra_args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            status, _, _ = http("GET", f"http://127.0.0.1:{port}/healthz", timeout=1)
            if status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not answer within 30 s:\n{proc.stdout.read()}")


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"server ignored signal {sig}:\n{output}")
    return proc.returncode, output


@needs_real_engine
def test_real_server_over_socket_and_sigterm():
    port = free_port()
    proc = start_server([], port)
    base = f"http://127.0.0.1:{port}"
    try:
        status, headers, body = http("POST", f"{base}/api/predict", json.dumps({"text": POEM}).encode(),
                                     {"Content-Type": "application/json"})
        assert status == 200
        data = json.loads(body)
        blank = data["blanks"][0]
        assert blank["start"] == POEM.index("[MASK]") and blank["length"] == 1
        assert len(blank["candidates"]) == 5
        assert all(0.0 <= c["score"] <= 1.0 and c["text"] and "[" not in c["text"] for c in blank["candidates"])
        assert data["model"]["name"]

        # Bad input over the wire: 4xx JSON, and the server keeps serving.
        status, _, body = http("POST", f"{base}/api/predict", b"\xff\xfe{", {"Content-Type": "application/json"})
        assert status == 400 and json.loads(body)["error"] == "bad_encoding"
        status, _, body = http("POST", f"{base}/api/predict", json.dumps({"text": "没有空"}).encode(),
                               {"Content-Type": "application/json"})
        assert status == 400 and json.loads(body)["error"] == "no_blank"
        status, _, body = http("POST", f"{base}/api/predict", b'{"text":"' + b"x" * 20000 + b'"}',
                               {"Content-Type": "application/json"})
        assert status == 413 and json.loads(body)["error"] == "payload_too_large"

        status, _, body = http("GET", f"{base}/api/info")
        assert status == 200 and json.loads(body)["max_length"] > 0
        status, headers, body = http("GET", f"{base}/")
        assert status == 200 and "🔮 预测缺失内容" in body.decode("utf-8")
        status, headers, body = http("GET", f"{base}/metrics")
        text = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert 'fillmask_http_requests_total{route="/api/predict",method="POST",status="200"} 1' in text
        assert 'fillmask_http_errors_total{code="payload_too_large"} 1' in text
        assert "fillmask_engine_batches_total" in text
    finally:
        returncode, output = stop_server(proc)
    assert returncode == 0, output
    assert f"serving on http://127.0.0.1:{port}" in output
    assert "received SIGTERM: shutting down" in output
    assert "Traceback" not in output
    assert output.rstrip().endswith("stopped")


@needs_real_engine
def test_real_server_token_and_sigint():
    port = free_port()
    proc = start_server(["--token", "tok123"], port)
    base = f"http://127.0.0.1:{port}"
    try:
        body = json.dumps({"text": POEM}).encode()
        status, _, reply = http("POST", f"{base}/api/predict", body, {"Content-Type": "application/json"})
        assert status == 401 and json.loads(reply)["error"] == "unauthorized"
        status, _, _ = http("POST", f"{base}/api/predict", body,
                            {"Content-Type": "application/json", "Authorization": "Bearer tok123"})
        assert status == 200
        assert http("GET", f"{base}/healthz")[0] == 200
    finally:
        returncode, output = stop_server(proc, signal.SIGINT)
    assert returncode == 0, output
    assert "received SIGINT" in output


@needs_real_engine
def test_port_in_use_exits_2():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "edge", "serve", "--bundle", str(TINY_BUNDLE), "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 2
    assert "cannot serve" in proc.stderr


@needs_real_engine
@pytest.mark.skipif(importlib.util.find_spec("edge.serial_terminal") is None, reason="no edge/serial_terminal.py")
def test_serve_with_serial_hook():
    """``serve --serial loop://`` starts the serial front end beside HTTP and stops both on SIGTERM."""
    port = free_port()
    proc = start_server(["--serial", "loop://", "--serial-mode", "line"], port)
    try:
        assert http("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        returncode, output = stop_server(proc)
    assert returncode == 0, output
    assert "loop://" in output
    assert "Traceback" not in output
