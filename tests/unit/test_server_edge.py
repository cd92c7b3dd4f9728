"""The server's edge in-process, without an engine: the request body guard, error shapes, the tokenizer
thread, and the server flags the CLI generates (lists as JSON, as vLLM takes them)."""
import asyncio
import json
import threading

import httpx
import pytest
from fastapi import FastAPI

from pagedllm.cli import main as cli_main
from pagedllm.config import ServerConfig
from pagedllm.server.errors import install_error_handlers
from pagedllm.server.request_body import RequestBodyGuard
from pagedllm.server.serving import ServingContext

MAX_BYTES = 1000


def _app(max_bytes: int) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestBodyGuard, max_bytes=max_bytes)

    @app.post("/echo")
    async def echo(body: dict):
        return body

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals")
    return app


def _request(method: str, path: str, content=None, max_bytes: int = MAX_BYTES) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=_app(max_bytes), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, content=content, headers={"content-type": "application/json"})
    return asyncio.run(go())


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_unexpected_exception_is_a_generic_500_in_openai_shape():
    error = _error(_request("GET", "/boom"), 500)
    assert error["code"] == "internal_error" and "secret" not in error["message"]


@pytest.mark.parametrize("body, param", [
    ('{"a": [1, {"b": "x\\ud800"}]}', "a.1.b"),
    ('{"a": "\\udfff\\ud800"}', "a"),             # a low then a high surrogate: no pair
    ('{"a": {"k\\ud83d": 1}}', "a.k\ud83d"),      # in a key
])
def test_a_lone_surrogate_is_400_naming_where_it_is(body, param):
    error = _error(_request("POST", "/echo", body.encode()), 400)
    assert error["param"] == param and "surrogate" in error["message"]


def test_a_surrogate_in_model_is_404():
    assert _error(_request("POST", "/echo", b'{"model": "\\udabc"}'), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("body, expected", [
    ('{"a": "\\ud83d\\ude00"}', {"a": "\U0001F600"}),   # a pair is text (json.dumps writes emoji so)
    ('{"a": "\\\\ud800"}', {"a": "\\ud800"}),           # an escaped backslash, then "ud800": plain text
])
def test_surrogate_pairs_and_escaped_backslashes_pass(body, expected):
    r = _request("POST", "/echo", body.encode())
    assert r.status_code == 200 and r.json() == expected


def test_a_body_over_the_limit_is_413_with_or_without_content_length():
    body = json.dumps({"a": "x" * MAX_BYTES}).encode()

    async def chunks():   # no Content-Length: sent chunked
        yield body[:10]
        yield body[10:]
    for content in (body, chunks()):
        error = _error(_request("POST", "/echo", content), 413)
        assert error["code"] == "request_too_large" and str(MAX_BYTES) in error["message"]
    assert _request("POST", "/echo", json.dumps({"a": "x" * (MAX_BYTES - 20)}).encode()).status_code == 200


def _nested(depth: int, leaf="x", pad: str = "") -> str:
    """JSON of `depth` arrays, one in the other; pad: an item before each inner array."""
    text = json.dumps(leaf)
    for _ in range(depth):
        text = f"[{pad}{text}]"
    return text


def test_a_body_nested_past_the_bound_is_400_naming_the_field():
    """A request's JSON is passed on (pickled to the engine core, through schema walkers, jinja's tojson) by code
    that recurses per level: a schema nested ~700 levels once killed the thread sending requests to the core, and
    every later request hung. The bound refuses such a body where it enters, naming its field and the limit;
    brackets inside strings (escaped quotes and backslashes among them) do not count, nor do they hide depth."""
    from pagedllm.server.request_body import MAX_JSON_DEPTH
    ok = f'{{"a": {_nested(MAX_JSON_DEPTH - 1)}}}'
    assert _request("POST", "/echo", ok.encode(), max_bytes=1 << 20).status_code == 200
    strings = json.dumps({"a": "[{" * 5000, "b": '"\\[' * 5000, "c": [[{"d": "]}"}]] * 500})
    assert _request("POST", "/echo", strings.encode(), max_bytes=1 << 20).status_code == 200
    closing = json.dumps("]}") + ", "          # a string of closing brackets before each inner array
    escapes = json.dumps('\\"]}') + ", "       # an escaped backslash, an escaped quote, then brackets
    for deep in ('{"s": 1, "schema": ' + _nested(MAX_JSON_DEPTH) + "}",
                 '{"schema": ' + _nested(700, pad=closing) + "}", '{"schema": ' + _nested(700, pad=escapes) + "}"):
        json.loads(deep)   # valid JSON
        error = _error(_request("POST", "/echo", deep.encode(), max_bytes=1 << 20), 400)
        assert error["param"] == "schema" and str(MAX_JSON_DEPTH) in error["message"], error


def _guard_app(**guard) -> tuple[FastAPI, list]:
    """An app behind the body guard that records what reached its keyed route."""
    reached = []
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestBodyGuard, max_bytes=MAX_BYTES, **guard)

    @app.post("/v1/echo")
    async def echo(body: dict):
        reached.append(body)
        return body
    return app, reached


def _post_echo(app, receive) -> list:
    """The ASGI messages app sends for a POST /v1/echo whose body comes from receive()."""
    sent = []

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "POST", "path": "/v1/echo", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "server": ("t", 80), "scheme": "http"}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


def test_a_keyed_route_without_the_key_is_401_before_its_body_is_read():
    """An unauthenticated client must not make the server buffer up to max_bytes of body (per connection)."""
    app, reached = _guard_app(authorized=lambda scope: (b"authorization", b"Bearer k") in scope["headers"])
    received = []

    async def receive():   # a body that never ends: it must not be read at all
        received.append(1)
        await asyncio.sleep(3600)
    sent = _post_echo(app, receive)
    assert sent[0]["status"] == 401 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "invalid_api_key"
    assert received == [] and reached == []

    async def keyed():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/echo", json={"a": 1}, headers={"authorization": "Bearer k"})
    assert asyncio.run(keyed()).json() == {"a": 1} and reached == [{"a": 1}]


def test_a_body_that_never_finishes_is_408():
    """Slowloris: a body whose rest never comes is not waited for (and held) forever."""
    app, reached = _guard_app(timeout=0.2)
    received = []

    async def receive():
        if not received:
            received.append(1)
            return {"type": "http.request", "body": b'{"a":', "more_body": True}
        await asyncio.sleep(3600)
    sent = _post_echo(app, receive)
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout" and reached == []


@pytest.mark.parametrize("method, path, content, status, words", [
    ("GET", "/nope", None, 404, "no such route"),
    ("DELETE", "/echo", None, 405, "POST"),
    ("POST", "/echo", b'{"a": "\xff"}', 400, "UTF-8"),
    ("POST", "/echo", b"[" * 50_000 + b"]" * 50_000, 400, "nested"),
    ("POST", "/echo", b"{not json", 400, "JSON"),
])
def test_framework_errors_are_in_openai_shape(method, path, content, status, words):
    assert words in _error(_request(method, path, content, max_bytes=1 << 20), status)["message"]


def test_off_loop_runs_on_the_tokenizer_thread():
    ctx = ServingContext(engine=None, model_name="m", chat_template=None)

    async def go():
        return await ctx.off_loop(threading.get_ident), threading.get_ident()
    worker, loop = asyncio.run(go())
    assert worker != loop
    ctx.tokenizer_pool.shutdown()


def test_cli_takes_server_lists_as_json(monkeypatch):
    seen = {}
    monkeypatch.setattr("pagedllm.server.launch.serve", lambda e, s: seen.setdefault("server", s))
    assert cli_main(["serve", "--allowed-origins", '["https://a.example", "http://b"]', "--allowed-methods",
                     '["GET"]', "--allow-credentials", "--root-path", "/llm", "--max-request-body-bytes", "5"]) == 0
    config = seen["server"]
    assert config.allowed_origins == ["https://a.example", "http://b"] and config.allowed_methods == ["GET"]
    assert config.allowed_headers == ["*"] and config.allow_credentials and config.root_path == "/llm"
    assert config.max_request_body_bytes == 5
    with pytest.raises(SystemExit):
        cli_main(["serve", "--allowed-origins", "https://a.example"])   # not JSON: argparse's usage error


@pytest.mark.parametrize("kwargs, field", [
    ({"ssl_keyfile": "k.pem"}, "ssl_keyfile"), ({"root_path": "llm"}, "root_path"),
    ({"max_request_body_bytes": 0}, "max_request_body_bytes"), ({"allowed_origins": "*"}, "allowed_origins"),
    ({"responses_store": -1}, "responses_store"), ({"responses_store": 5, "api_server_count": 2}, "responses_store"),
])
def test_server_config_checks_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ServerConfig(**kwargs)


def test_metrics_are_served_while_the_engine_core_does_not_answer():
    """/metrics stays Prometheus text when the core is stopped, hung or dead (then /health says 503): the API
    process's histograms and counters, without the core's gauges (not a JSON 500 that drops them all)."""
    from fastapi.testclient import TestClient
    from pagedllm.engine.async_llm import EngineDeadError
    from pagedllm.metrics import FinishedRequestStats, StepStats
    from pagedllm.server.api_server import build_app
    from pagedllm.server.metrics import ServerMetrics

    class SilentEngine:
        async def get_stats(self):
            raise EngineDeadError("the engine core has not responded for 5 s")
    metrics = ServerMetrics("m")
    metrics.record(StepStats(finished=[FinishedRequestStats("stop", 0.5, 3, 4)]))
    app = build_app(ServingContext(SilentEngine(), "m", None), metrics, ServerConfig(), [])
    r = TestClient(app).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    assert 'pagedllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0' in r.text
    assert "pagedllm:e2e_request_latency_seconds_count" in r.text and "num_requests_running" not in r.text


def test_a_non_ascii_api_key_sent_as_utf8_is_accepted():
    from pagedllm.server.api_server import _authorized
    authorized = _authorized(["clé-ü"])
    key = "Bearer clé-ü".encode()
    path = {"path": "/v1/models"}
    assert authorized({**path, "headers": [(b"authorization", key)]})
    assert authorized({**path, "headers": [(b"x-api-key", "clé-ü".encode())]})
    assert not authorized({**path, "headers": [(b"authorization", "Bearer clé-ü".encode("latin-1"))]})
    assert not authorized({**path, "headers": [(b"authorization", b"Bearer cl")]})
    # the scheme in any case, as vLLM's (RFC 9110: case-insensitive); another scheme or a second space is no key
    for scheme, ok in ((b"bearer ", True), (b"BEARER ", True), (b"Basic ", False), (b"Bearer  ", False)):
        assert bool(authorized({**path, "headers": [(b"authorization", scheme + key[7:])]})) == ok, scheme
    # keyed routes only: /tokenize (and under a root path) need it, /health does not
    assert not authorized({"path": "/api/tokenize", "root_path": "/api", "headers": []})
    assert authorized({"path": "/health", "headers": []})


def test_the_api_key_comes_from_vllms_variable_too(monkeypatch):
    """vLLM's VLLM_API_KEY guards a server started without --api-key: a deployment that sets it must not get an
    open server here. --api-key comes first, then PAGEDLLM_API_KEY, then VLLM_API_KEY."""
    from pagedllm.server.api_server import resolved_api_keys
    monkeypatch.delenv("PAGEDLLM_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "vllm-key")
    assert resolved_api_keys(ServerConfig()) == ["vllm-key"]
    monkeypatch.setenv("PAGEDLLM_API_KEY", "own-key")
    assert resolved_api_keys(ServerConfig()) == ["own-key"]
    assert resolved_api_keys(ServerConfig(api_key="flag-key")) == ["flag-key"]
    assert resolved_api_keys(ServerConfig(api_key=["k1", "k2"])) == ["k1", "k2"]
    monkeypatch.setenv("VLLM_API_KEY", "")
    monkeypatch.setenv("PAGEDLLM_API_KEY", "")
    assert resolved_api_keys(ServerConfig()) == []


def test_several_api_keys_each_open_the_keyed_routes():
    """vLLM's --api-key k1 k2: a request with any one of them is let in, with none of them it is a 401."""
    import argparse

    from fastapi.testclient import TestClient

    from pagedllm.cli import add_config_args
    from pagedllm.server.api_server import _authorized, build_app
    parser = argparse.ArgumentParser()
    add_config_args(parser, ServerConfig, "server")
    args = parser.parse_args(["--api-key", "k1", "k2"])
    assert args.api_key == ["k1", "k2"]
    authorized = _authorized(ServerConfig(api_key=args.api_key).api_key)
    for key, ok in (("k1", True), ("k2", True), ("k3", False), ("k1k2", False)):
        assert bool(authorized({"path": "/v1/models", "headers": [(b"authorization", f"Bearer {key}".encode())]})) \
            == ok, key
    app = build_app(ServingContext(None, "m", None), None, ServerConfig(), ["k1", "k2"])
    client = TestClient(app)
    assert client.post("/detokenize", json={"tokens": [1]}).status_code == 401
    with pytest.raises(ValueError, match="api_key must be non-empty strings"):
        ServerConfig(api_key=["k1", ""])
