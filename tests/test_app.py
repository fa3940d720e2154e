"""The Flask app (edge/app.py) and metrics (edge/metrics.py) against the fake engine."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import HINT, FakeEngine  # noqa: E402

from edge.app import RANDOM_INIT_WARNING, create_app  # noqa: E402
from edge.metrics import Metrics, escape_label  # noqa: E402

POEM = "床前明月光，疑是地[MASK]霜。"


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def app(engine, monkeypatch):
    monkeypatch.delenv("FILLMASK_API_TOKEN", raising=False)
    return create_app(engine=engine, config={"TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


def post_raw(client, data, content_type="application/json", **kw):
    return client.post("/api/predict", data=data, content_type=content_type, **kw)


def assert_still_serving(client):
    response = client.post("/api/predict", json={"text": POEM})
    assert response.status_code == 200
    assert response.get_json()["blanks"][0]["candidates"][0]["text"] == "上"


# -- happy paths -------------------------------------------------------------------

def test_predict_returns_engine_json(client, engine):
    response = client.post("/api/predict", json={"text": POEM, "top_k": 3})
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    data = response.get_json()
    assert list(data)[:1] == ["blanks"]  # engine's field order kept
    blank = data["blanks"][0]
    assert blank["start"] == POEM.index("[MASK]")
    assert blank["length"] == 1
    assert [c["text"] for c in blank["candidates"]] == ["上", "下", "好"]
    assert blank["low_confidence"] is False
    assert data["model"] == {"name": "fake-engine", "random_init": False}
    assert engine.calls[-1] == {"text": POEM, "top_k": 3, "blank_length": None}
    # Chinese is sent as UTF-8, not as \\u escapes.
    assert "上".encode("utf-8") in response.data


def test_predict_defaults_top_k_to_5(client, engine):
    data = client.post("/api/predict", json={"text": POEM}).get_json()
    assert len(data["blanks"][0]["candidates"]) == 5
    assert engine.calls[-1]["top_k"] == 5


def test_predict_multi_blank_and_low_confidence(client):
    text = "他做事总是[MASK][MASK][MASK][MASK]，让人放心。我们一起去[MASK]饭吧。"
    data = client.post("/api/predict", json={"text": text}).get_json()
    first, second = data["blanks"]
    assert first["length"] == 4 and first["low_confidence"] is True and first["hint"] == HINT
    assert first["candidates"][0]["text"] == "一丝不苟"
    assert second["start"] == text.index("去[MASK]") + 1 and second["length"] == 1


@pytest.mark.parametrize("blank_length", [2, "auto"])
def test_predict_passes_blank_length(client, engine, blank_length):
    response = client.post("/api/predict", json={"text": "今天天气很[MASK]。", "blank_length": blank_length})
    assert response.status_code == 200
    assert engine.calls[-1]["blank_length"] == blank_length
    assert response.get_json()["blanks"][0]["length"] == 2


def test_charset_utf8_accepted_and_unknown_fields_ignored(client):
    body = json.dumps({"text": POEM, "future_option": True}, ensure_ascii=False).encode("utf-8")
    response = post_raw(client, body, content_type="application/json; charset=UTF-8")
    assert response.status_code == 200


def test_second_request_is_cached(client):
    assert client.post("/api/predict", json={"text": POEM}).get_json()["cached"] is False
    assert client.post("/api/predict", json={"text": POEM}).get_json()["cached"] is True


def test_index_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "🔮 预测缺失内容" in page
    assert "上下文信息不足，建议补充更多背景" in page
    for example in ("床前明月光，疑是地[MASK]霜。", "今天天气很[MASK]。", "我们一起去[MASK]饭吧。",
                    "他做事总是[MASK][MASK][MASK][MASK]，让人放心。"):
        assert example in page
    # No CDN: the board may be offline. Nothing is loaded from another host.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_info_summary(client):
    data = client.get("/api/info").get_json()
    assert data["name"] == "fake-engine"
    assert data["random_init"] is False
    assert "warning" not in data
    assert data["api"]["max_top_k"] == 20
    assert data["api"]["max_body_bytes"] == 16 * 1024


def test_info_warns_loudly_on_random_init(monkeypatch):
    monkeypatch.delenv("FILLMASK_API_TOKEN", raising=False)
    client = create_app(engine=FakeEngine(random_init=True)).test_client()
    data = client.get("/api/info").get_json()
    assert data["random_init"] is True
    assert data["warning"] == RANDOM_INIT_WARNING
    assert "随机" in data["warning"] and "RANDOM" in data["warning"]
    assert 'random_init="true"' in client.get("/metrics").get_data(as_text=True)


# -- bad input: each gives a 4xx JSON error and the server keeps serving --------------

BAD_JSON_BODIES = [
    # (description, body dict, expected status, expected code)
    ("empty text", {"text": ""}, 400, "empty_text"),
    ("blank-only whitespace", {"text": "   "}, 400, "empty_text"),
    ("no blank", {"text": "今天天气很好。"}, 400, "no_blank"),
    ("too many blanks", {"text": "[MASK]的[MASK]的[MASK]的[MASK]的[MASK]"}, 400, "too_many_blanks"),
    ("too long", {"text": "长" * 300 + "[MASK]"}, 400, "text_too_long"),
    ("top_k zero", {"text": POEM, "top_k": 0}, 400, "bad_top_k"),
    ("top_k 21", {"text": POEM, "top_k": 21}, 400, "bad_top_k"),
    ("top_k string", {"text": POEM, "top_k": "5"}, 400, "bad_top_k"),
    ("top_k float", {"text": POEM, "top_k": 2.5}, 400, "bad_top_k"),
    ("top_k bool", {"text": POEM, "top_k": True}, 400, "bad_top_k"),
    ("blank_length zero", {"text": POEM, "blank_length": 0}, 400, "bad_blank_length"),
    ("blank_length word", {"text": POEM, "blank_length": "long"}, 400, "bad_blank_length"),
    ("blank_length list", {"text": POEM, "blank_length": [2]}, 400, "bad_blank_length"),
    ("blank_length too big for engine", {"text": POEM, "blank_length": 9}, 400, "bad_blank_length"),
    ("text missing", {"top_k": 5}, 400, "invalid_request"),
    ("text not a string", {"text": 42}, 400, "invalid_request"),
]


@pytest.mark.parametrize("description,body,status,code", BAD_JSON_BODIES, ids=[b[0] for b in BAD_JSON_BODIES])
def test_bad_json_fields(client, description, body, status, code):
    response = client.post("/api/predict", json=body)
    assert response.status_code == status, description
    data = response.get_json()
    assert data["error"] == code
    assert isinstance(data["message"], str) and len(data["message"]) > 5
    assert_still_serving(client)


BAD_RAW_BODIES = [
    ("invalid json", b'{"text": "a[MASK]', "application/json", 400, "invalid_json"),
    ("empty body", b"", "application/json", 400, "invalid_json"),
    ("json array", b'["a[MASK]"]', "application/json", 400, "invalid_request"),
    ("json string", b'"a[MASK]"', "application/json", 400, "invalid_request"),
    ("deeply nested", b"[" * 10000, "application/json", 400, "invalid_json"),
    ("not utf-8", '{"text": "地[MASK]霜"}'.encode("gbk"), "application/json", 400, "bad_encoding"),
    ("lone surrogate", b'{"text": "\\ud800[MASK]"}', "application/json", 400, "bad_encoding"),
    ("form content type", b"text=a%5BMASK%5D", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("text/plain", b'{"text": "a[MASK]"}', "text/plain", 415, "unsupported_media_type"),
    ("latin-1 charset", b'{"text": "a[MASK]"}', "application/json; charset=latin-1", 415, "unsupported_media_type"),
    ("over the size limit", b'{"text": "' + b"a" * (17 * 1024) + b'[MASK]"}', "application/json", 413,
     "payload_too_large"),
]


@pytest.mark.parametrize("description,body,ctype,status,code", BAD_RAW_BODIES, ids=[b[0] for b in BAD_RAW_BODIES])
def test_bad_raw_bodies(client, description, body, ctype, status, code):
    response = post_raw(client, body, content_type=ctype)
    assert response.status_code == status, description
    assert response.mimetype == "application/json"
    data = response.get_json()
    assert data["error"] == code
    assert data["message"]
    assert_still_serving(client)


def test_missing_content_type(client):
    response = client.post("/api/predict", data=b'{"text": "a[MASK]"}')
    assert response.status_code == 415
    assert response.get_json()["error"] == "unsupported_media_type"


def test_body_limit_is_configurable(engine):
    client = create_app(engine=engine, config={"MAX_CONTENT_LENGTH": 64}).test_client()
    response = client.post("/api/predict", json={"text": "很长" * 40 + "[MASK]"})
    assert response.status_code == 413
    assert "64" in response.get_json()["message"]
    assert client.post("/api/predict", json={"text": "地[MASK]霜"}).status_code == 200


def test_engine_crash_is_500_json_and_logged(client, caplog):
    with caplog.at_level("ERROR", logger="edge.app"):
        response = client.post("/api/predict", json={"text": "BOOM [MASK]"})
    assert response.status_code == 500
    data = response.get_json()
    assert data["error"] == "internal_error"
    assert "BOOM" not in data["message"]  # internals stay in the log, not in the answer
    assert any("fake engine failure" in (r.exc_text or "") for r in caplog.records)
    assert_still_serving(client)


def test_unknown_route_and_wrong_method_are_json(client):
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"
    response = client.get("/api/predict")
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


# -- token ---------------------------------------------------------------------------

@pytest.fixture
def token_client(engine, monkeypatch):
    monkeypatch.delenv("FILLMASK_API_TOKEN", raising=False)
    return create_app(engine=engine, config={"API_TOKEN": "s3cret"}).test_client()


@pytest.mark.parametrize("header", [None, "Bearer wrong", "s3cret", "Basic s3cret", "Bearer "])
def test_token_required_on_api(token_client, engine, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, url, kwargs in (("post", "/api/predict", {"json": {"text": POEM}}), ("get", "/api/info", {})):
        response = getattr(token_client, method)(url, headers=headers, **kwargs)
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert engine.calls == []  # the engine never saw an unauthorised request


def test_token_accepted(token_client):
    headers = {"Authorization": "Bearer s3cret"}
    assert token_client.post("/api/predict", json={"text": POEM}, headers=headers).status_code == 200
    assert token_client.get("/api/info", headers=headers).status_code == 200
    assert token_client.get("/api/info", headers={"Authorization": "bearer s3cret"}).status_code == 200


def test_open_routes_without_token(token_client):
    assert token_client.get("/").status_code == 200
    assert token_client.get("/healthz").status_code == 200
    assert token_client.get("/metrics").status_code == 200


def test_token_from_environment(engine, monkeypatch):
    monkeypatch.setenv("FILLMASK_API_TOKEN", "from-env")
    client = create_app(engine=engine).test_client()
    assert client.get("/api/info").status_code == 401
    assert client.get("/api/info", headers={"Authorization": "Bearer from-env"}).status_code == 200


# -- metrics -------------------------------------------------------------------------

def metric_value(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in metrics:\n{text}"
    return float(match.group(1))


def test_metrics_after_requests(client):
    for _ in range(3):
        client.post("/api/predict", json={"text": POEM})
    client.post("/api/predict", json={"text": "没有空"})
    post_raw(client, b"{oops", "application/json")
    client.post("/api/predict", json={"text": "BOOM[MASK]"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    text = response.get_data(as_text=True)

    ok = 'route="/api/predict",method="POST",status="200"'
    assert metric_value(text, "fillmask_http_requests_total", ok) == 3
    assert metric_value(text, "fillmask_http_requests_total", 'route="/api/predict",method="POST",status="400"') == 2
    assert metric_value(text, "fillmask_http_requests_total", 'route="/api/predict",method="POST",status="500"') == 1
    assert metric_value(text, "fillmask_http_errors_total", 'code="no_blank"') == 1
    assert metric_value(text, "fillmask_http_errors_total", 'code="invalid_json"') == 1
    assert metric_value(text, "fillmask_http_errors_total", 'code="internal_error"') == 1
    # Histogram: +Inf bucket and _count equal the number of requests; buckets are cumulative.
    assert metric_value(text, "fillmask_http_request_duration_seconds_count", 'route="/api/predict"') == 6
    assert metric_value(text, "fillmask_http_request_duration_seconds_bucket", 'route="/api/predict",le="+Inf"') == 6
    buckets = [float(v) for v in re.findall(
        r'^fillmask_http_request_duration_seconds_bucket\{route="/api/predict",le="[^"]+"\} (\S+)$', text, re.M)]
    assert buckets == sorted(buckets)
    assert metric_value(text, "fillmask_http_request_duration_seconds_sum", 'route="/api/predict"') > 0
    # Engine counters: the first poem request missed the cache, the next two hit it.
    assert metric_value(text, "fillmask_engine_cache_hits_total") == 2
    assert metric_value(text, "fillmask_engine_cache_misses_total") == 1
    assert metric_value(text, "fillmask_engine_batch_size_total", 'size="1"') == 1
    assert "# TYPE fillmask_http_request_duration_seconds histogram" in text
    assert 'fillmask_model_info{name="fake-engine",random_init="false"' in text


def test_metrics_survive_broken_engine_stats(engine, monkeypatch):
    monkeypatch.setattr(engine, "stats", lambda: 1 / 0)
    client = create_app(engine=engine).test_client()
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "fillmask_http_requests_total" in response.get_data(as_text=True)


def test_unknown_paths_do_not_create_metric_series(client):
    for i in range(5):
        client.get(f"/random/{i}")
    text = client.get("/metrics").get_data(as_text=True)
    assert "/random/" not in text
    assert metric_value(text, "fillmask_http_requests_total", 'route="other",method="GET",status="404"') == 5


def test_metrics_render_escapes_labels():
    metrics = Metrics(buckets=(0.1, 1.0))
    metrics.observe('a"b\\c\nd', "GET", 200, 0.5)
    metrics.observe('a"b\\c\nd', "GET", 200, 5.0)
    text = metrics.render()
    label = escape_label('a"b\\c\nd')
    assert label == 'a\\"b\\\\c\\nd'
    assert f'fillmask_http_request_duration_seconds_bucket{{route="{label}",le="0.1"}} 0' in text
    assert f'fillmask_http_request_duration_seconds_bucket{{route="{label}",le="1.0"}} 1' in text
    assert f'fillmask_http_request_duration_seconds_bucket{{route="{label}",le="+Inf"}} 2' in text
    assert all("\n" not in line for line in text.splitlines())


def test_concurrent_requests_are_counted(engine):
    """Several threads at once (as under waitress): no lost updates in the counters."""
    from concurrent.futures import ThreadPoolExecutor

    # A line all 8 fit in, with no wait budget to run out: under QEMU (make arm-check)
    # a query takes ~100 ms, and the default 250 ms budget refused one on arrival.
    app = create_app(engine=engine, config={"MAX_WAITING": 8, "MAX_WAIT_MS": 60_000})

    def one(i):
        with app.test_client() as c:
            return c.post("/api/predict", json={"text": f"第{i}句[MASK]"}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(one, range(40))) == [200] * 40
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert metric_value(text, "fillmask_http_requests_total", 'route="/api/predict",method="POST",status="200"') == 40
