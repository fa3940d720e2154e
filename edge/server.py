"""Run the Flask app under waitress (a production WSGI server) with a clean shutdown.

SIGTERM (systemd stop) and SIGINT (Ctrl-C) stop accepting connections, let the
worker threads finish the requests in flight (waitress waits up to 5 s), then close
the engine so its worker thread and ONNX session go away before the process exits.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from waitress.server import create_server

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_HTTP_THREADS = 4


class _Shutdown(SystemExit):
    """Raised from the signal handler; waitress's main loop exits on SystemExit."""


def serve(
    app: Any,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    threads: int = DEFAULT_HTTP_THREADS,
    engine: Any = None,
    on_ready: Callable[[Any], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> int:
    """Serve ``app`` on ``host:port`` with ``threads`` worker threads until SIGTERM/SIGINT.

    ``engine`` (default: the one ``create_app`` stored in ``app.extensions``) is closed
    on the way out. ``on_ready(server)`` runs once the socket is listening (the CLI
    starts the serial front end there); ``on_shutdown()`` runs after the HTTP server
    stopped and before the engine is closed. Returns 0 after a clean shutdown.
    Must run in the main thread (signal handlers can only be installed there).
    """
    if engine is None:
        engine = getattr(app, "extensions", {}).get("fillmask_engine")
    # clear_untrusted_proxy_headers: this is not behind a proxy; ignore X-Forwarded-*.
    try:
        server = create_server(app, host=host, port=port, threads=threads, clear_untrusted_proxy_headers=True)
    except OSError:  # port taken, address not available: nothing to serve, release the engine
        _close_engine(engine)
        raise
    bound_host, bound_port = server.effective_host, server.effective_port
    log.info("serving on http://%s:%s with %d HTTP threads", bound_host, bound_port, threads)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from the network (use --token to require a token)", host)

    received: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        received.append(signum)
        raise _Shutdown(0)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, stop)
    else:  # pragma: no cover - only tests would do this
        log.warning("serve() not in the main thread: SIGTERM/SIGINT are not handled")

    try:
        if on_ready is not None:
            on_ready(server)
        # run() returns when the signal handler raises SystemExit inside the loop;
        # it then shuts the task dispatcher down (finishing requests in flight).
        server.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            log.info("received %s: shutting down", signal.Signals(received[0]).name)
        server.close()
        if on_shutdown is not None:
            try:
                on_shutdown()
            except Exception:  # noqa: BLE001 - still close the engine
                log.exception("shutdown hook failed")
        _close_engine(engine)
        log.info("stopped")
    return 0


def _close_engine(engine: Any) -> None:
    """Close the engine (its batching thread and ONNX session), logging any failure."""
    if engine is not None and hasattr(engine, "close"):
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - the process is exiting; report and go on
            log.exception("closing the engine failed")
