"""The Flask application: kiosk page, JSON predict API, model info, health and metrics.

Built by a factory (the pattern of Flask's ``examples/tutorial``) so tests hand in a
fake or a tiny engine::

    app = create_app(engine=my_engine, config={"API_TOKEN": "secret"})

Routes:

- ``GET /``: the self-contained kiosk page (``edge/static/index.html``).
- ``POST /api/predict``: ``{"text": "…[MASK]…", "top_k": 5, "blank_length": 2|"auto", "fusion": true}``
  → ``engine.predict`` (the JSON shape of design.md "HTTP API"; ``"fusion": false``
  answers from the model alone, without the bundle's word LM and phrase memory).
- ``GET /api/info``: the model summary, with a loud ``warning`` when ``random_init``.
- ``GET /healthz``: liveness.
- ``GET /metrics``: Prometheus text format (requests, errors, latency, engine counters,
  the admission queue).

Predict requests pass an admission gate (:mod:`edge.admission`): past ``MAX_ACTIVE``
in the engine and ``MAX_WAITING`` waiting (each at most ``MAX_WAIT_MS``), a request is
answered ``503`` with ``Retry-After`` at once instead of queueing without bound.

Every error is JSON ``{"error": code, "message": what to do}``; the server keeps
serving after any of them. When ``API_TOKEN`` is set (config, or the environment
variable ``FILLMASK_API_TOKEN``), ``/api/*`` needs ``Authorization: Bearer <token>``;
``/``, ``/healthz`` and ``/metrics`` stay open.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from edge import __version__
from edge.admission import AdmissionGate, AdmissionLimits, Overloaded
from edge.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from edge.metrics import Metrics

log = logging.getLogger(__name__)

TOKEN_ENV = "FILLMASK_API_TOKEN"
ENGINE_KEY = "fillmask_engine"
METRICS_KEY = "fillmask_metrics"
ADMISSION_KEY = "fillmask_admission"

DEFAULT_CONFIG: dict[str, Any] = {
    # A sentence is a few hundred bytes; 16 KiB leaves room and stops abuse early.
    "MAX_CONTENT_LENGTH": 16 * 1024,
    "API_TOKEN": None,
    "MAX_TOP_K": 20,
    "DEFAULT_TOP_K": 5,
    # Used only when no engine is passed in: build one from this bundle folder
    # (None = the embedded default bundle).
    "BUNDLE": None,
    "ENGINE_OPTIONS": {},
    "JSON_AS_ASCII": False,
    # Admission of predict requests (edge/admission.py): in the engine at once, waiting
    # beyond those, and how long one waits before it gets 503 + Retry-After.
    "MAX_ACTIVE": 2,
    "MAX_WAITING": 8,
    "MAX_WAIT_MS": 250.0,
}

RANDOM_INIT_WARNING = (
    "⚠️ 当前模型权重为随机初始化，仅用于性能测试，预测结果没有意义。"
    " / Model weights are RANDOM (benchmark bundle): predictions are meaningless."
)

# Codes of the engine's InputError that this app expects; any other code the engine
# may add later is passed through as a 400 as well.
ENGINE_INPUT_CODES = {"empty_text", "no_blank", "too_many_blanks", "text_too_long", "bad_top_k", "bad_blank_length",
                      "too_much_work", "deadline_exceeded"}
# A request that ran past its deadline may well pass when the board is less busy: 503
# with Retry-After, like a refused one. Every other engine refusal is the request's: 400.
ENGINE_RETRY_CODES = {"deadline_exceeded"}

# Content-Security-Policy: the page must work offline, so nothing may be loaded
# from anywhere but this server (the kiosk page keeps its CSS/JS inline).
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class ApiError(Exception):
    """An error the client can fix; rendered as ``{"error", "message"}`` with ``status``."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def is_engine_input_error(exc: BaseException) -> bool:
    """True for the engine's ``InputError``: a ValueError carrying a string ``.code``.

    Checked by shape rather than by class so this module does not import
    ``edge.engine`` (and onnxruntime) just to build an app around a fake engine.
    """
    return isinstance(exc, ValueError) and isinstance(getattr(exc, "code", None), str)


def error_response(code: str, message: str, status: int) -> Response:
    """Build the JSON error response and remember the code for the metrics."""
    g.error_code = code
    response = jsonify({"error": code, "message": message})
    response.status_code = status
    return response


def create_app(engine: Any = None, config: dict[str, Any] | None = None) -> Flask:
    """Create the Flask app around ``engine`` (built from ``config["BUNDLE"]`` when None).

    ``config`` overrides :data:`DEFAULT_CONFIG` keys (and any Flask setting).
    """
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config.update(DEFAULT_CONFIG)
    if config:
        app.config.update(config)
    if app.config.get("API_TOKEN") is None and os.environ.get(TOKEN_ENV):
        app.config["API_TOKEN"] = os.environ[TOKEN_ENV]
    app.json.ensure_ascii = False  # Chinese stays readable in responses and logs
    app.json.sort_keys = False  # keep the engine's field order ("blanks" first)

    if engine is None:
        # Imported here so that building an app around a fake engine needs no onnxruntime.
        from edge.engine import Engine

        engine = Engine.from_bundle(path=app.config["BUNDLE"], **(app.config.get("ENGINE_OPTIONS") or {}))
    app.extensions[ENGINE_KEY] = engine
    metrics = Metrics()
    app.extensions[METRICS_KEY] = metrics
    gate = AdmissionGate(AdmissionLimits(int(app.config["MAX_ACTIVE"]), int(app.config["MAX_WAITING"]),
                                         float(app.config["MAX_WAIT_MS"])))
    app.extensions[ADMISSION_KEY] = gate

    model_info = _model_summary(engine)
    if model_info.get("random_init"):
        log.warning("MODEL IS RANDOMLY INITIALISED (%s): answers are meaningless", model_info.get("name"))
    _add_request_hooks(app, metrics)
    _add_error_handlers(app)
    _add_routes(app, engine, metrics, gate, model_info)
    return app


def _token_refusal(token: str | None) -> Response | None:
    """None when the request may use ``/api/*``; else the 401 answer."""
    if not token:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken must not reveal how much of the token matched.
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), str(token).encode()):
        return None
    response = error_response(
        "unauthorized",
        "需要访问令牌：请在请求头加入 Authorization: Bearer <token>。"
        " / This API needs a token: send the header 'Authorization: Bearer <token>'.",
        401,
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="fillmask"'
    return response


def _add_request_hooks(app: Flask, metrics: Metrics) -> None:
    """Time every request, check the token on ``/api/*``, set the security headers,
    count the request in the metrics and log failures."""

    @app.before_request
    def start_timer() -> Response | None:
        g.start = time.perf_counter()
        g.error_code = None
        if request.path.startswith("/api/"):
            return _token_refusal(app.config.get("API_TOKEN"))
        return None

    @app.after_request
    def finish(response: Response) -> Response:
        seconds = time.perf_counter() - g.get("start", time.perf_counter())
        # Label by the matched rule, never by the raw path: unknown paths must not
        # create unbounded metric series.
        rule = request.url_rule.rule if request.url_rule is not None else "other"
        metrics.observe(rule, request.method, response.status_code, seconds, g.get("error_code"))
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if response.status_code >= 400:
            log.info("%s %s -> %d %s", request.method, request.path, response.status_code, g.get("error_code"))
        else:
            log.debug("%s %s -> %d in %.1f ms", request.method, request.path, response.status_code, seconds * 1000)
        return response


def _add_error_handlers(app: Flask) -> None:
    """Every error becomes the JSON ``{"error", "message"}`` answer; the server goes on."""

    @app.errorhandler(ApiError)
    def handle_api_error(exc: ApiError) -> Response:
        return error_response(exc.code, exc.message, exc.status)

    @app.errorhandler(HTTPException)
    def handle_http_error(exc: HTTPException) -> Response:
        code, message = HTTP_ERROR_TEXT.get(
            exc.code or 500, ("http_error", exc.description or "HTTP error")
        )
        if exc.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = message.format(limit=limit)
        response = error_response(code, message, exc.code or 500)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception) -> Response:
        # The traceback goes to the log, not to the client; the server keeps serving.
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(
            "internal_error",
            "服务器内部错误，请重试；若反复出现请查看服务日志。"
            " / Internal server error: retry, and check the service log if it persists.",
            500,
        )


def _predict(engine: Any, gate: AdmissionGate, body: Any, max_top_k: int, default_top_k: int) -> Response:
    """Validate a predict request, run it through the admission gate and the engine,
    and answer it (503 + Retry-After when overloaded or past its deadline)."""
    text, top_k, blank_length, fusion = validate_predict(body, max_top_k, default_top_k)
    try:
        # ``fusion`` is passed only when the client turned it off, so an engine
        # without the option (a fake, an older one) still serves the default.
        options = {} if fusion else {"fusion": False}
        with gate.admit():
            result = engine.predict(text, top_k=top_k, blank_length=blank_length, **options)
    except Overloaded as exc:
        response = error_response(
            "overloaded",
            f"服务繁忙，请 {exc.retry_after} 秒后重试。"
            f" / The service is busy ({exc.reason.replace('_', ' ')}): retry in {exc.retry_after} s.",
            503,
        )
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except Exception as exc:  # noqa: BLE001 - input errors become 400, the rest 500
        if is_engine_input_error(exc):
            code = exc.code  # type: ignore[attr-defined]
            if code not in ENGINE_INPUT_CODES:
                log.debug("engine input error code %r not in the known list", code)
            if code in ENGINE_RETRY_CODES:
                response = error_response(code, str(exc), 503)
                response.headers["Retry-After"] = "1"
                return response
            raise ApiError(code, str(exc), 400) from exc
        raise
    return jsonify(result)


def _add_routes(app: Flask, engine: Any, metrics: Metrics, gate: AdmissionGate, model_info: dict) -> None:
    """The kiosk page, the JSON API, health and metrics."""

    @app.get("/")
    def index() -> Response:
        response = app.send_static_file("index.html")
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "uptime_s": round(time.time() - metrics.started, 1)})

    @app.get("/api/info")
    def info() -> Response:
        summary = _model_summary(engine)
        summary["api"] = {
            "max_top_k": app.config["MAX_TOP_K"],
            "default_top_k": app.config["DEFAULT_TOP_K"],
            "max_body_bytes": app.config.get("MAX_CONTENT_LENGTH"),
            "server_version": __version__,
        }
        return jsonify(summary)

    @app.post("/api/predict")
    def predict() -> Response:
        return _predict(engine, gate, read_json_body(), app.config["MAX_TOP_K"], app.config["DEFAULT_TOP_K"])

    @app.get("/metrics")
    def prometheus() -> Response:
        stats: dict[str, Any] | None
        try:
            stats = engine.stats()
        except Exception:  # noqa: BLE001 - a broken engine must not hide the HTTP metrics
            log.exception("engine.stats() failed")
            stats = None
        text = metrics.render(stats, model_info, gate.stats())
        return Response(text, content_type=METRICS_CONTENT_TYPE)


# HTTP-level errors raised by Flask/Werkzeug, as (code, bilingual message).
HTTP_ERROR_TEXT: dict[int, tuple[str, str]] = {
    404: ("not_found", "没有这个地址；接口见 /api/predict、/api/info、/healthz、/metrics。"
                       " / No such URL: see /api/predict, /api/info, /healthz, /metrics."),
    405: ("method_not_allowed", "请求方法不对（预测请用 POST）。 / Method not allowed (use POST for /api/predict)."),
    413: ("payload_too_large", "请求体太大（上限 {limit} 字节），请缩短文本。"
                               " / Request body too large (limit {limit} bytes): send a shorter text."),
    400: ("bad_request", "请求格式错误。 / Malformed request."),
}


def read_json_body() -> Any:
    """Return the parsed JSON body of the current request, or raise ApiError.

    Checks, in order: content type, size (via MAX_CONTENT_LENGTH), UTF-8, JSON syntax.
    """
    if request.mimetype != "application/json":
        raise ApiError(
            "unsupported_media_type",
            "请以 JSON 发送：Content-Type: application/json。"
            " / Send JSON with 'Content-Type: application/json'.",
            415,
        )
    charset = request.mimetype_params.get("charset")
    if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise ApiError(
            "unsupported_media_type",
            f"只接受 UTF-8 编码（收到 charset={charset}）。 / Only UTF-8 JSON is accepted (got charset={charset}).",
            415,
        )
    raw = request.get_data(cache=False)  # raises 413 beyond MAX_CONTENT_LENGTH
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            "bad_encoding",
            f"请求体不是有效的 UTF-8（第 {exc.start} 字节）。 / The body is not valid UTF-8 (byte {exc.start}).",
            400,
        ) from exc
    try:
        return json.loads(decoded)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f"（第 {exc.lineno} 行第 {exc.colno} 列）" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(
            "invalid_json",
            f"请求体不是有效的 JSON{where}，示例：{{\"text\": \"今天天气很[MASK]。\"}}。"
            " / The body is not valid JSON; example: {\"text\": \"今天天气很[MASK]。\", \"top_k\": 5}.",
            400,
        ) from exc


def validate_predict(body: Any, max_top_k: int, default_top_k: int) -> tuple[str, int, int | str | None, bool]:
    """Check the predict request's fields; return (text, top_k, blank_length, fusion) or raise ApiError.

    Text content (empty, no blank, too long…) is the engine's to judge; this checks
    the JSON types and ranges that belong to the HTTP API.
    """
    if not isinstance(body, dict):
        raise ApiError(
            "invalid_request",
            "请求体必须是 JSON 对象，例如 {\"text\": \"今天天气很[MASK]。\"}。"
            " / The body must be a JSON object such as {\"text\": \"今天天气很[MASK]。\"}.",
        )
    text = body.get("text")
    if not isinstance(text, str):
        raise ApiError(
            "invalid_request",
            "缺少字符串字段 text。 / Missing string field 'text' (the sentence with [MASK] blanks).",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates such as "\ud800" in the JSON
        raise ApiError(
            "bad_encoding",
            "文本含有无效字符（孤立的代理码位）。 / The text contains invalid characters (lone surrogates).",
        ) from exc

    top_k = body.get("top_k", default_top_k)
    # bool is an int subclass in Python; true/false is not a count.
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= max_top_k:
        raise ApiError(
            "bad_top_k",
            f"top_k 必须是 1 到 {max_top_k} 的整数。 / top_k must be an integer from 1 to {max_top_k}.",
        )

    blank_length = body.get("blank_length")
    valid_length = blank_length is None or blank_length == "auto" or (
        isinstance(blank_length, int) and not isinstance(blank_length, bool) and blank_length >= 1
    )
    if not valid_length:
        raise ApiError(
            "bad_blank_length",
            "blank_length 必须是正整数或 \"auto\"。 / blank_length must be a positive integer or \"auto\".",
        )
    fusion = body.get("fusion", True)
    if not isinstance(fusion, bool):
        raise ApiError(
            "bad_fusion",
            "fusion 必须是 true 或 false。 / fusion must be true (model + word LM + phrase memory) or false (model alone).",
        )
    return text, top_k, blank_length, fusion


def _model_summary(engine: Any) -> dict[str, Any]:
    """Return ``engine.info()`` plus a loud ``warning`` when the weights are random."""
    summary = dict(engine.info())
    summary["random_init"] = bool(summary.get("random_init"))
    if summary["random_init"]:
        # Ours is bilingual, for the Chinese UI; it replaces the engine's English one.
        summary["warning"] = RANDOM_INIT_WARNING
    return summary
