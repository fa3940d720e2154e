"""``python -m edge`` / ``fillmask-edge``: serve the HTTP API, predict once, show model info.

::

    python -m edge serve [--bundle DIR] [--host 127.0.0.1] [--port 8000] [--token T]
    python -m edge predict "床前明月光，疑是地[MASK]霜。" [--top-k 5] [--blank-length auto] [--json] [--no-fusion]
    python -m edge info [--json]
    python -m edge serial /dev/ttyUSB0 [--mode terminal|line]   # (edge/serial_terminal.py)

Without ``--bundle`` the embedded default bundle (``edge/default_bundle/``) is used.
``serve`` logs to stdout (journald picks it up); ``predict`` and ``info`` keep stdout
for their answer and log to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import unicodedata
from typing import Any

from edge import __version__
from edge.quotes import quote_line

log = logging.getLogger("edge.cli")

PROG = "python -m edge"
TOKEN_ENV = "FILLMASK_API_TOKEN"
EXIT_USAGE = 2  # bad input or a missing/bad bundle: the user can fix it
BAR_WIDTH = 20


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with the serve, predict and info commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Chinese fill-in-the-blank (BERT masked-LM) runtime for edge boards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose (DEBUG) logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve_command(sub)
    _add_predict_command(sub)
    _add_info_command(sub)
    _add_serial_command(sub)
    return parser


def _add_serve_command(sub) -> None:
    """``serve``: the HTTP service, its admission limits, and optionally a serial port."""
    serve = sub.add_parser(
        "serve",
        help="run the HTTP service (kiosk page, JSON API, metrics) under waitress",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_engine_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 to serve the LAN")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument(
        "--http-threads", type=positive_int, default=None,
        help="waitress worker threads; None: max-active + max-waiting + 4, so that a request past the "
        "admission limits is refused at once rather than queued for a thread",
    )
    serve.add_argument("--max-active", type=positive_int, default=2, help="predict requests in the engine at once")
    serve.add_argument(
        "--max-waiting", type=non_negative_int, default=8,
        help="predict requests waiting for the engine beyond those; more get 503 + Retry-After at once",
    )
    serve.add_argument(
        "--max-wait-ms", type=non_negative_float, default=250.0,
        help="a waiting predict request gets 503 + Retry-After after this long",
    )
    serve.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on /api/*; None: read ${TOKEN_ENV}, and no token "
        "if unset (prefer the variable: a command-line token is visible in ps)",
    )
    serve.add_argument(
        "--max-body", type=positive_int, default=16 * 1024, help="largest request body accepted, bytes"
    )
    serve.add_argument(
        "--serial",
        metavar="PORT",
        default=None,
        help="also serve this serial port (e.g. /dev/ttyUSB0) in the same process, sharing the engine",
    )
    serve.add_argument(
        "--serial-mode", choices=("terminal", "line"), default="terminal",
        help="with --serial: terminal (a person) or line (a program, JSON per line)",
    )
    serve.add_argument("--serial-baud", type=positive_int, default=115200, help="with --serial: baud rate")


def _add_predict_command(sub) -> None:
    """``predict``: one sentence's candidates, as a table or the API's JSON."""
    predict = sub.add_parser(
        "predict",
        help="fill the blanks of one sentence and print the candidates",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    predict.add_argument("text", help="sentence with [MASK] blanks, e.g. '床前明月光，疑是地[MASK]霜。'")
    predict.add_argument("--top-k", type=int, default=5, help="candidates per blank (1-20)")
    predict.add_argument(
        "--blank-length",
        type=blank_length_arg,
        default=None,
        help="characters per single-[MASK] blank: a number, or 'auto' to try 1-4; None: as written",
    )
    predict.add_argument("--json", action="store_true", help="print the HTTP API's JSON instead of a table")
    add_engine_arguments(predict)


def _add_info_command(sub) -> None:
    """``info``: the bundle's manifest summary."""
    info = sub.add_parser(
        "info", help="show the bundle's manifest summary", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    add_engine_arguments(info)


def _add_serial_command(sub) -> None:
    """``serial``: serve a serial port (its options come from edge/serial_terminal.py)."""
    serial = sub.add_parser(
        "serial",
        help="serve a serial port (one line in, the answer out); see edge/serial_terminal.py",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    try:
        from edge.serial_terminal import add_serial_arguments
    except ImportError as exc:  # pyserial missing: the other commands still work
        serial.set_defaults(_serial_unavailable=str(exc))
    else:
        add_serial_arguments(serial)
    add_engine_arguments(serial)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that choose the bundle and tune the engine."""
    group = parser.add_argument_group("engine")
    group.add_argument("--bundle", default=None, help="bundle folder; None: the embedded default bundle")
    group.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="inference threads; None: one per core this process may use (see CPUAffinity=)",
    )
    group.add_argument(
        "--sessions", type=positive_int, default=1,
        help="ONNX Runtime sessions sharing the threads, each running its own batch on its own cores "
             "(2 with 2 threads: two requests at once instead of each split over both cores)",
    )
    group.add_argument(
        "--spin", nargs="?", const="always", default="query", choices=("off", "query", "always"),
        help="ONNX Runtime's threads busy-wait for work: only while a query runs (query, the default: "
             "faster, no CPU between queries), also a while after it (always; a bare --spin), or never (off)",
    )
    group.add_argument(
        "--batch-window-ms", type=float, default=2.0, help="how long to wait for more requests to batch together"
    )
    group.add_argument("--max-batch", type=positive_int, default=16, help="most rows (sequences) per model run")
    group.add_argument(
        "--batch-by-length", choices=("auto", "on", "off"), default="auto",
        help="batch only requests of the same padded length (auto: on for models of hidden size >= 512, "
             "whose runs cost what their longest row does)",
    )
    group.add_argument("--cache-size", type=int, default=1024, help="LRU cache entries (0 disables the cache)")
    group.add_argument(
        "--max-request-rows", type=positive_int, default=400,
        help="most model rows (sequences) one request may run; past it the request is refused (too_much_work)",
    )
    group.add_argument(
        "--request-timeout", type=positive_float, default=5.0,
        help="seconds one request may work; past it the request is refused (deadline_exceeded)",
    )
    group.add_argument(
        "--no-fusion", action="store_true",
        help="answer from the model alone, ignoring the bundle's word LM and phrase memory (for comparison)",
    )


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {number}")
    return number


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0."""
    number = float(value)
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    """argparse type: a finite number >= 0."""
    number = float(value)
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value}")
    return number


def blank_length_arg(value: str) -> int | str:
    """argparse type: a positive integer or 'auto'."""
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from exc


def setup_logging(debug: bool, stream: Any) -> None:
    """Log to ``stream`` (sys.stdout or sys.stderr) with timestamps; DEBUG when ``debug``."""
    from edge.logs import setup_logging as setup

    setup(debug, "stderr" if stream is sys.stderr else "stdout")


def load_engine(args: argparse.Namespace) -> Any:
    """Build the engine from the command-line options (raises BundleError on a bad bundle)."""
    from edge.engine import Engine  # onnxruntime is imported only when a command needs it

    return Engine.from_bundle(
        path=args.bundle,
        threads=args.threads,
        sessions=args.sessions,
        spin=args.spin,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        batch_by_length={"auto": None, "on": True, "off": False}[args.batch_by_length],
        cache_size=args.cache_size,
        fusion=not args.no_fusion,
        max_request_rows=args.max_request_rows,
        request_timeout_s=args.request_timeout,
    )


def bundle_error_message(exc: Exception, bundle: str | None) -> str:
    """Explain a bundle error; when the embedded default is missing, say how to build one."""
    message = f"error: {exc}"
    if bundle is None and "make model" not in str(exc):
        message += (
            "\nThe embedded default bundle is missing or broken. Build one with "
            "`make model` (or `python -m tools build --out edge/default_bundle ...`), "
            "or pass an existing bundle with --bundle DIR."
        )
    return message


def run_serve(args: argparse.Namespace, engine: Any) -> int:
    """Serve the app until SIGTERM/SIGINT."""
    from edge.app import create_app
    from edge.server import serve

    token = args.token or os.environ.get(TOKEN_ENV) or None
    app = create_app(engine=engine, config={
        "API_TOKEN": token, "MAX_CONTENT_LENGTH": args.max_body,
        "MAX_ACTIVE": args.max_active, "MAX_WAITING": args.max_waiting, "MAX_WAIT_MS": args.max_wait_ms})
    http_threads = args.http_threads or args.max_active + args.max_waiting + 4
    if http_threads <= args.max_active + args.max_waiting:
        log.warning("--http-threads %d <= max-active + max-waiting: requests past the limits queue for a "
                    "thread instead of getting 503 at once", http_threads)
    if token:
        log.info("API token required on /api/*")
    terminals: list[Any] = []

    def start_serial_front_end(_server: Any) -> None:
        if args.serial:
            from edge.serial_terminal import start_serial

            terminals.append(start_serial(serial_settings(args), engine))

    def stop_serial_front_end() -> None:
        for terminal in terminals:
            terminal.close()

    return serve(
        app,
        host=args.host,
        port=args.port,
        threads=http_threads,
        engine=engine,
        on_ready=start_serial_front_end,
        on_shutdown=stop_serial_front_end,
    )


def serial_settings(args: argparse.Namespace) -> argparse.Namespace:
    """The serial front end's settings for ``serve --serial PORT``: its defaults plus our options."""
    from edge.serial_terminal import add_serial_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_serial_arguments(parser)
    return parser.parse_args([args.serial, "--mode", args.serial_mode, "--baud", str(args.serial_baud)])


def run_serial_command(args: argparse.Namespace, engine: Any) -> int:
    """``python -m edge serial PORT``: serve one serial port until SIGTERM/SIGINT."""
    from edge.serial_terminal import run_serial

    return run_serial(args, engine)


def run_predict(args: argparse.Namespace, engine: Any) -> int:
    """Predict once and print a table (or the API JSON with --json)."""
    result = engine.predict(args.text, top_k=args.top_k, blank_length=args.blank_length)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(format_prediction(args.text, result))
    return 0


def run_info(args: argparse.Namespace, engine: Any) -> int:
    """Print the bundle summary."""
    info = dict(engine.info())
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2, default=str))
        return 0
    if info.get("random_init"):
        print("⚠️  RANDOM WEIGHTS: this bundle is for benchmarks only; its answers are meaningless.")
    width = max((len(key) for key in info), default=0)
    for key, value in info.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False, default=str)
        print(f"{key:>{width}}: {value}")
    return 0


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: CJK (wide/full-width) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def pad(text: str, width: int) -> str:
    """Left-align ``text`` in ``width`` terminal columns."""
    return text + " " * max(0, width - display_width(text))


def format_prediction(text: str, result: dict[str, Any]) -> str:
    """Render an engine result as a readable table, one section per blank."""
    lines = []
    model = result.get("model") or {}
    if model.get("random_init"):
        lines.append("⚠️  RANDOM WEIGHTS (benchmark bundle): these answers are meaningless.")
    blanks = result.get("blanks", [])
    for number, blank in enumerate(blanks, 1):
        lines.append(f"空 {number}/{len(blanks)}  (start {blank.get('start')}, length {blank.get('length')})")
        candidates = blank.get("candidates", [])
        width = max([display_width(c["text"]) for c in candidates] + [4])
        for rank, cand in enumerate(candidates, 1):
            score = float(cand.get("score", 0.0))
            bar = "█" * round(score * BAR_WIDTH)
            sources = "+".join(cand.get("sources") or [])
            lines.append(f"  {rank:>2}. {pad(cand['text'], width)}  {score * 100:5.1f}%  {pad(bar, BAR_WIDTH)}"
                         + (f"  {sources}" if sources else ""))
        quote = quote_line(candidates[0]) if candidates else None
        if quote:
            lines.append(f"  出处: {quote}")
        if blank.get("low_confidence"):
            lines.append(f"  ⚠ {blank.get('hint') or '上下文信息不足，建议补充更多背景'}")
    notes = [f"{result.get('elapsed_ms', 0):.1f} ms"]
    if result.get("fusion") is False:
        notes.append("model only")
    if result.get("cached"):
        notes.append("cached")
    if result.get("truncated"):
        notes.append("input truncated to the model's length")
    if model.get("name"):
        notes.append(f"model {model['name']}")
    lines.append("  ".join(notes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m edge`` and the ``fillmask-edge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Services log to stdout (journald); one-shot commands keep stdout for the answer.
    setup_logging(args.debug, sys.stdout if args.command in ("serve", "serial") else sys.stderr)
    if args.command == "predict" and not 1 <= args.top_k <= 20:
        parser.error("--top-k must be between 1 and 20")
    if getattr(args, "_serial_unavailable", None):
        parser.error(f"the serial front end is unavailable: {args._serial_unavailable}")

    from edge.bundle import BundleError

    try:
        engine = load_engine(args)
    except BundleError as exc:
        print(bundle_error_message(exc, args.bundle), file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "serve":
            return run_serve(args, engine)
        if args.command == "predict":
            return run_predict(args, engine)
        if args.command == "serial":
            return run_serial_command(args, engine)
        return run_info(args, engine)
    except ValueError as exc:
        # The engine's InputError (empty text, no blank, too long...): say what to fix.
        if isinstance(getattr(exc, "code", None), str):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    except OSError as exc:
        # The HTTP port is taken, or (serve --serial) the serial port cannot be
        # opened: serial.SerialException is an OSError too.
        if args.command == "serve":
            print(f"error: cannot serve: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    finally:
        if args.command != "serve":  # serve() closes the engine itself (engine.close is idempotent)
            engine.close()
