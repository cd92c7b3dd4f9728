"""Every error case returns its status and the OpenAI error shape, and leaves no request in the engine."""
import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest
from server.server_utils import MAX_MODEL_LEN, MODEL_NAME, wait_all_blocks_free

from pagedllm.server.errors import APIError
from pagedllm.server.serving import ServingContext

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def _assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("path,body,param,words", [
    (COMPLETIONS, {"prompt": "a", "temperature": -1}, "temperature", "in [0, 2]"),
    (COMPLETIONS, {"prompt": "a", "top_p": 1.5}, "top_p", "(0, 1]"),
    (COMPLETIONS, {"prompt": "a", "n": 0}, "n", ">= 1"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 0}, "max_tokens", ">= 1"),   # (echo with 0 is vLLM's scoring)
    (COMPLETIONS, {"prompt": "a", "truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens", "max_model_len"),
    (CHAT, {"messages": MESSAGES, "truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens", "max_model_len"),
    (COMPLETIONS, {"prompt": "a", "logprobs": 50}, "logprobs", "<= max_logprobs (20)"),
    (COMPLETIONS, {"prompt": "a", "min_p": 2}, "min_p", "[0, 1]"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": "many"}, "max_tokens", "integer"),
    (COMPLETIONS, {"prompt": []}, "prompt", "empty"),
    (COMPLETIONS, {"prompt": ""}, "prompt", "empty"),   # vLLM's 400 (was: BOS alone, answered)
    (COMPLETIONS, {"max_tokens": 4}, "prompt", "required"),
    (COMPLETIONS, {"prompt": [1, 2, 10**6]}, "prompt", "prompt_token_ids"),
    (CHAT, {"messages": MESSAGES, "temperature": -0.5}, "temperature", "in [0, 2]"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    (CHAT, {"messages": []}, "messages", "at least 1"),
    (CHAT, {"messages": [{"content": "no role"}]}, "messages.0.role", "required"),
    # named as the client sent them (found by a fuzz of the server)
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "<= max_logprobs (20)"),
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 4, "max_completion_tokens": -1}, "max_completion_tokens", ">= 1"),
    (CHAT, {"messages": MESSAGES, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "g", "parameters": {"type": "nonsense"}}}]},
     "tools.1.function.parameters", "nonsense"),
    (COMPLETIONS, {"prompt": 123}, "prompt", "must be str or list[str] or list[int] or list[list[int]]; got an"),
    # items of more than one form (was: "prompt.0: Input should be a valid string" for an id first)
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt", "mixes token ids and strings"),
    (COMPLETIONS, {"prompt": [[1, 2], 3]}, "prompt", "mixes lists of token ids and token ids"),
    (COMPLETIONS, {"prompt": ["a", [1]]}, "prompt", "mixes strings and lists of token ids"),
    (COMPLETIONS, {"prompt": "a", "stop": 5}, "stop", "must be str or list[str]; got an integer"),
    # a part's own keys are taken (vLLM's), a type it does not read is not
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "txt", "text": "a", "colour": "red"}]}]},
     "messages.0.content.0.type", "must be one of"),
])
def test_invalid_values_are_400_naming_the_field(server, path, body, param, words):
    r = httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=server.headers)
    error = _assert_error(r, 400, param)
    assert words in error["message"]


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    (COMPLETIONS, {"prompt": [5] * MAX_MODEL_LEN}, "prompt"),
    (COMPLETIONS, {"prompt": [5] * MAX_MODEL_LEN, "max_tokens": 4}, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "a " * MAX_MODEL_LEN}]}, "messages"),
    (CHAT, {"messages": MESSAGES, "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 4, "max_completion_tokens": MAX_MODEL_LEN}, "max_completion_tokens"),
])
def test_prompt_plus_max_tokens_over_model_length_is_400_naming_the_cause(server, path, body, param):
    r = httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=server.headers)
    error = _assert_error(r, 400, param, "context_length_exceeded")
    assert str(MAX_MODEL_LEN) in error["message"] and f"`{param}`" in error["message"]
    assert "None" not in error["message"]


def test_kv_cache_too_small_names_the_cause():
    """The KV-capacity check of ServingContext, on a fake engine whose cache holds 8 blocks of 16 tokens."""
    processor = SimpleNamespace(max_kv_tokens=8 * 16)
    ctx = ServingContext(SimpleNamespace(max_model_len=512, input_processor=processor), MODEL_NAME, None)
    ctx.check_context_length(100, 28, "prompt", "max_tokens")   # 128 tokens: fits exactly
    for num_prompt, max_tokens, param in ((100, 29, "max_tokens"), (100, None, "max_tokens"), (128, 1, "prompt"),
                                          (200, 4, "prompt")):
        with pytest.raises(APIError) as e:
            ctx.check_context_length(num_prompt, max_tokens, "prompt", "max_tokens")
        assert (e.value.param, e.value.code) == (param, "context_length_exceeded"), e.value.message
        assert "128 tokens" in e.value.message


def test_echoed_values_are_cut_short(server):
    huge = "x" * 100_000
    for path, body, param in ((COMPLETIONS, {"prompt": "a", "stop": ["", huge]}, "stop"),
                              (COMPLETIONS, {"prompt": "a", huge: 1}, huge[:200] + "..."),
                              (CHAT, {"messages": [{"role": "user", "content": "a", huge: 1}]}, None)):
        r = httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=server.headers)
        error = _assert_error(r, 400, param)
        assert len(r.content) < 1500 and "..." in error["message"], r.text[:2000]
    r = httpx.post(server.url + COMPLETIONS, json={"model": huge, "prompt": "a"}, headers=server.headers)
    assert r.status_code == 404 and len(r.content) < 1500


def test_malformed_body_is_400_and_the_engine_lives_on(server):
    for content in (b"{not json", b"[1, 2]", b'"text"', b""):
        r = httpx.post(server.url + COMPLETIONS, content=content, headers={**server.headers,
                                                                           "content-type": "application/json"})
        _assert_error(r, 400)
    for content, type_, words in ((b'{"prompt": "a"}', "text/plain", "not a JSON object"),
                                  (b"prompt=a", "application/x-www-form-urlencoded", "not a JSON object"),
                                  (b"", "application/json", "empty")):
        r = httpx.post(server.url + COMPLETIONS, content=content, headers={**server.headers, "content-type": type_})
        assert words in _assert_error(r, 400)["message"] and "Content-Type: application/json" in r.text, r.text
    r = httpx.post(server.url + COMPLETIONS, json={"model": MODEL_NAME, "prompt": "a", "max_tokens": 2},
                   headers=server.headers)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_unknown_model_is_404(server):
    for path, body in ((COMPLETIONS, {"prompt": "a"}), (CHAT, {"messages": MESSAGES})):
        r = httpx.post(server.url + path, json={"model": "no-such-model", **body}, headers=server.headers)
        _assert_error(r, 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0).completions.create(
            model="no-such-model", prompt="a")


def test_api_key_is_required_on_v1(server, servers):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
        for method, path in (("POST", COMPLETIONS), ("POST", CHAT), ("GET", "/v1/models")):
            r = httpx.request(method, server.url + path, json={"model": MODEL_NAME, "prompt": "a"}, headers=headers)
            _assert_error(r, 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    small = servers["small"]   # its key comes from --api-key
    assert httpx.get(small.url + "/v1/models").status_code == 401
    assert httpx.get(small.url + "/v1/models", headers=small.headers).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200     # health and metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200
    trailing = httpx.get(server.url + "/metrics/")   # vLLM's answers it, no 307 (it was one)
    assert trailing.status_code == 200 and "pagedllm:num_requests_running" in trailing.text


def test_refused_requests_leave_no_blocks(server):
    m = wait_all_blocks_free(server)
    assert m["pagedllm:kv_cache_usage_perc"] == 0.0 and m["pagedllm:num_requests_waiting"] == 0


def test_waiting_queue_over_its_bound_is_503_with_retry_after(servers):
    """The small server runs one sequence and lets one wait: of a burst of long requests some must be
    refused, and the admitted ones complete."""
    server = servers["small"]
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=server.headers) as client:
            return await asyncio.gather(*(client.post(COMPLETIONS, json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code == 503]
    done = [r for r in responses if r.status_code == 200]
    assert refused and done and len(refused) + len(done) == 8
    for r in refused:
        _assert_error(r, 503, code="queue_full")
        assert int(r.headers["retry-after"]) >= 1
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in done)
    assert wait_all_blocks_free(server)["pagedllm:kv_cache_usage_perc"] == 0.0
