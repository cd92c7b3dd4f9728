"""Access: the API key on every route that runs the model or the tokenizer, CORS, TLS and the root path."""
import httpx
import openai
import pytest
from server.server_utils import EDGE_ORIGIN, EDGE_ROOT_PATH, MODEL_NAME

TOKENIZER_ROUTES = (("/tokenize", {"model": MODEL_NAME, "prompt": "Once upon a time"}),
                    ("/detokenize", {"model": MODEL_NAME, "tokens": [1, 400, 30]}))


def _assert_error(r: httpx.Response, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert code is None or error["code"] == code, error


@pytest.mark.parametrize("name", ["main", "edge"])   # the key from PAGEDLLM_API_KEY, and from --api-key
def test_tokenizer_routes_need_the_key_and_health_version_metrics_stay_open(servers, name, offline_llm):
    server = servers[name]
    with httpx.Client(base_url=server.url, verify=server.verify, timeout=30) as client:
        for path, body in TOKENIZER_ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
                _assert_error(client.post(path, json=body, headers=headers), 401, "invalid_api_key")
        tokens = client.post("/tokenize", json=TOKENIZER_ROUTES[0][1], headers=server.headers).json()["tokens"]
        assert tokens == offline_llm.get_tokenizer().encode("Once upon a time")
        r = client.post("/detokenize", json={"model": MODEL_NAME, "tokens": tokens}, headers=server.headers)
        assert r.json()["prompt"] == offline_llm.get_tokenizer().decode(tokens)
        for path in ("/health", "/version", "/metrics"):
            assert client.get(path).status_code == 200, path


def test_cors_preflight_and_response_headers(edge):
    preflight = {"Origin": EDGE_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with httpx.Client(base_url=edge.url, verify=edge.verify, timeout=30) as client:
        r = client.options("/v1/completions", headers=preflight)   # no key: browsers send none on a preflight
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == EDGE_ORIGIN
        assert r.headers["access-control-allow-credentials"] == "true"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "authorization,content-type"
        _assert_error(client.options("/v1/completions", headers={**preflight, "Origin": "https://evil.example"}),
                      400, "cors_refused")
        r = client.get("/v1/models", headers={**edge.headers, "Origin": EDGE_ORIGIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == EDGE_ORIGIN
        r = client.get("/v1/models", headers={**edge.headers, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_no_cors_headers_without_allowed_origins(server):
    r = httpx.get(server.url + "/v1/models", headers={**server.headers, "Origin": EDGE_ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_tls_with_a_self_signed_certificate(edge):
    if not edge.url.startswith("https://"):
        pytest.skip("no openssl CLI to make a certificate: the edge server runs plain HTTP")
    with pytest.raises(httpx.ConnectError):   # not signed by a known CA: refused by default
        httpx.get(edge.url + "/health")
    client = openai.OpenAI(base_url=edge.url + "/v1", api_key=edge.api_key, max_retries=0,
                           http_client=httpx.Client(verify=edge.verify))
    out = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


def test_root_path(edge):
    with httpx.Client(base_url=edge.url, verify=edge.verify, headers=edge.headers, timeout=30) as client:
        # A proxy may strip the prefix or pass it on: both reach the routes.
        for prefix in (EDGE_ROOT_PATH, ""):
            r = client.get(prefix + "/v1/models")
            assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL_NAME
        assert client.get(EDGE_ROOT_PATH + "/openapi.json").json()["servers"] == [{"url": EDGE_ROOT_PATH}]
        _assert_error(client.get("/other/v1/models"), 404, "not_found")
