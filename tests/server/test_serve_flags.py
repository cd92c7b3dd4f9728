"""vLLM's chat and usage serve flags: --response-role, --default-chat-template-kwargs,
--exclude-tools-when-tool-choice-none, --enable-prompt-tokens-details, --enable-force-include-usage,
--enable-per-request-metrics, and the HTTP
ones --disable-fastapi-docs, --enable-request-id-headers; one server with all of them, and the main server (none of
them) for the defaults."""
import json

import httpx
import pytest
from server.server_utils import CHAT_TEMPLATE, MODEL_NAME, serving, start_server

from pagedllm.config import ServerConfig
from pagedllm.server.serving import ServingContext

MESSAGES = [{"role": "user", "content": "Tell me a story"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
# A prompt of several full blocks: sent twice, the second finds them in the prefix cache
LONG_PROMPT = [1] + list(range(100, 180))


@pytest.fixture(scope="module")
def flagged(tiny_model_dirs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve_flags")
    template = logs / "template.jinja"
    template.write_text(CHAT_TEMPLATE + "{% if tools %} tools: {{ tools | length }}{% endif %}")
    server = start_server(tiny_model_dirs["llama"], str(logs / "flags.log"), None, "--chat-template", str(template),
                          "--response-role", "narrator", "--default-chat-template-kwargs", '{"note": "default"}',
                          "--exclude-tools-when-tool-choice-none", "--enable-prompt-tokens-details",
                          "--enable-force-include-usage", "--enable-per-request-metrics", "--disable-fastapi-docs",
                          "--enable-request-id-headers",
                          "--override-generation-config", '{"max_new_tokens": 8}',
                          "--fingerprint-mode", "custom", "--fingerprint-value", "fp-42")
    with serving({"flags": server}):
        yield server


def _post(server, path: str, body: dict) -> httpx.Response:
    r = httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    return r


def _chunks(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def _prompt_text(server, **body) -> str:
    return _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "return_prompt_text": True,
                                                  **body}).json()["prompt_text"]


def test_response_role_names_the_answers_role(flagged, server):
    r = _post(flagged, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert r.json()["choices"][0]["message"]["role"] == "narrator"
    r = _post(flagged, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "stream": True})
    assert _chunks(r)[0]["choices"][0]["delta"]["role"] == "narrator"
    # continuing the last message: its own role, whatever the flag (vLLM's)
    r = _post(flagged, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2,
                                                "add_generation_prompt": False, "continue_final_message": True})
    assert r.json()["choices"][0]["message"]["role"] == "user"
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})   # the default
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_default_chat_template_kwargs_under_the_requests_own(flagged, server):
    assert _prompt_text(flagged).startswith("[default]\n")
    assert _prompt_text(flagged, chat_template_kwargs={"note": "mine"}).startswith("[mine]\n")
    assert _prompt_text(server).startswith("user: ")   # no flag: no note


def test_tools_left_out_of_the_template_with_tool_choice_none(flagged):
    assert " tools: 1" not in _prompt_text(flagged, tools=TOOLS, tool_choice="none")


def test_prompt_tokens_details_with_the_cached_tokens(flagged, server):
    body = {"prompt": LONG_PROMPT, "max_tokens": 2, "temperature": 0}
    first = _post(flagged, "/v1/completions", body).json()["usage"]
    second = _post(flagged, "/v1/completions", body).json()["usage"]
    # nothing cached: 0 (vLLM 0.26's); its answer's details have every key, null where unset
    assert first["prompt_tokens_details"] == {"cached_tokens": 0, "created_cache_tokens": None,
                                              "multimodal_tokens": None}
    assert 0 < second["prompt_tokens_details"]["cached_tokens"] < len(LONG_PROMPT)
    assert "completion_tokens_details" not in second
    r = _post(flagged, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert _chunks(r)[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": second["prompt_tokens_details"][
        "cached_tokens"]}   # a stream leaves the nulls out
    fresh = {**body, "prompt": [1] + list(range(200, 280)), "stream": True}
    assert _chunks(_post(flagged, "/v1/completions", fresh))[-1]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0}
    messages = [{"role": "user", "content": " ".join(["story"] * 60)}]
    _post(flagged, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    chat = _post(flagged, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}).json()["usage"]
    assert chat["prompt_tokens_details"]["cached_tokens"] > 0
    # chat's also says created_cache_tokens (vLLM 0.26's): the full blocks the prefill wrote, less those it found
    tale = {"messages": [{"role": "user", "content": " ".join(["tale"] * 60)}], "max_tokens": 2}
    streamed = _chunks(_post(flagged, "/v1/chat/completions", {**tale, "stream": True}))[-1]["usage"]
    full = streamed["prompt_tokens"] // 16 * 16   # the default --block-size
    assert streamed["prompt_tokens_details"] == {"cached_tokens": 0, "created_cache_tokens": full}
    again = _post(flagged, "/v1/chat/completions", tale).json()["usage"]["prompt_tokens_details"]
    assert again["cached_tokens"] + again["created_cache_tokens"] == full and again["cached_tokens"] > 0
    _post(server, "/v1/completions", body)
    assert _post(server, "/v1/completions", body).json()["usage"]["prompt_tokens_details"] is None   # no flag


def test_anthropic_usage_counts_the_cached_prompt_tokens_apart(flagged):
    """/v1/messages under --enable-prompt-tokens-details, as vLLM's: the prompt tokens read from the cache are
    cache_read_input_tokens, those the prefill wrote into it cache_creation_input_tokens (chat's
    created_cache_tokens), input_tokens the rest, in the answer and in the stream's message_delta."""
    body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": " ".join(["fable"] * 60)}]}
    post = lambda **kw: httpx.post(flagged.url + "/v1/messages", json={**body, **kw}, timeout=60)   # noqa: E731
    first = post().json()["usage"]   # a prompt not seen before: its full blocks are written, none read
    assert first["cache_creation_input_tokens"] > 0 and first["cache_read_input_tokens"] == 0
    usage = post().json()["usage"]
    assert usage["cache_read_input_tokens"] == first["cache_creation_input_tokens"] and usage["input_tokens"] > 0
    assert usage["cache_creation_input_tokens"] == 0 and usage["input_tokens"] == first["input_tokens"]
    events = [json.loads(line[6:]) for line in post(stream=True).text.splitlines() if line.startswith("data: ")]
    [delta] = [e for e in events if e["type"] == "message_delta"]
    assert delta["usage"] == usage
    start = events[0]["message"]["usage"]   # the prompt's length, as vLLM's first chunk gives it
    assert start == {"input_tokens": usage["input_tokens"] + usage["cache_read_input_tokens"], "output_tokens": 0}


def test_force_include_usage_ends_every_stream_with_usage(flagged, server):
    """vLLM's should_include_usage: the flag turns on include_usage and continuous_usage_stats both, whatever
    stream_options says: every chunk carries its choice's usage so far, and a usage chunk ends the stream."""
    for path, body in (("/v1/completions", {"prompt": "Once upon a time"}), ("/v1/chat/completions",
                                                                             {"messages": MESSAGES})):
        for options in ({}, {"stream_options": {"include_usage": False, "continuous_usage_stats": False}}):
            chunks = _chunks(_post(flagged, path, {**body, "max_tokens": 3, "stream": True, "ignore_eos": True,
                                                   **options}))
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
            counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
            assert counts[-3:] == [1, 2, 3] and all("usage" in c for c in chunks), chunks
        chunks = _chunks(_post(server, path, {**body, "max_tokens": 3, "stream": True}))
        assert all("usage" not in c for c in chunks)   # the default: only when asked


def test_per_request_metrics_time_one_sequence(flagged, server):
    """vLLM's --enable-per-request-metrics: an answer of one sequence carries `metrics`, its timings in ms (a stream:
    on its usage chunk, without the null fields); n > 1 or several prompts: null, the timings would be one
    sequence's. Without the flag: no metrics."""
    fields = {"time_to_first_token_ms", "generation_time_ms", "queue_time_ms", "mean_itl_ms", "tokens_per_second"}
    for path, body in (("/v1/completions", {"prompt": "Once upon a time"}), ("/v1/chat/completions",
                                                                             {"messages": MESSAGES})):
        body = {**body, "max_tokens": 4, "ignore_eos": True}
        m = _post(flagged, path, body).json()["metrics"]
        assert set(m) == fields and all(m[k] >= 0 for k in fields), m
        assert m["mean_itl_ms"] == pytest.approx(m["generation_time_ms"] / 3)
        assert m["tokens_per_second"] > 0
        assert _post(flagged, path, {**body, "n": 2}).json()["metrics"] is None
        assert _post(server, path, body).json()["metrics"] is None   # vLLM's answer has every key
        chunks = _chunks(_post(flagged, path, {**body, "stream": True}))
        assert set(chunks[-1]["metrics"]) == fields and all("metrics" not in c for c in chunks[:-1])
        one = _chunks(_post(flagged, path, {**body, "max_tokens": 1, "stream": True}))[-1]["metrics"]
        assert set(one) == fields - {"mean_itl_ms"}   # one token: no gap between tokens
        assert "metrics" not in _chunks(_post(flagged, path, {**body, "n": 2, "stream": True}))[-1]
    two = _post(flagged, "/v1/completions", {"prompt": ["Once", "upon"], "max_tokens": 2}).json()
    assert two["metrics"] is None


def test_override_generation_configs_max_new_tokens_caps_max_tokens(flagged, server):
    """vLLM's override_max_tokens: with --generation-config auto, --override-generation-config's max_new_tokens
    caps a request's own max_tokens (the model's generation config would only fill an unset one)."""
    for path, body in (("/v1/completions", {"prompt": "Once upon a time"}), ("/v1/chat/completions",
                                                                             {"messages": MESSAGES})):
        body = {**body, "max_tokens": 12, "ignore_eos": True}
        assert _post(flagged, path, body).json()["usage"]["completion_tokens"] == 8
        assert _post(server, path, body).json()["usage"]["completion_tokens"] == 12   # no override: no cap


def test_fingerprint_mode_names_the_answers_fingerprint(flagged):
    """vLLM's --fingerprint-mode custom with --fingerprint-value: the answers' system_fingerprint is that value;
    none: no fingerprint; hash: full's without the parallelism (the flags were unknown: the server did not start)."""
    from pagedllm.config import EngineConfig
    from pagedllm.server.serving import system_fingerprint
    for path, body in (("/v1/completions", {"prompt": "Once upon a time"}), ("/v1/chat/completions",
                                                                             {"messages": MESSAGES})):
        assert _post(flagged, path, {**body, "max_tokens": 2}).json()["system_fingerprint"] == "fp-42"
    config = EngineConfig(tensor_parallel_size=2)
    assert system_fingerprint(config, "none") is None and system_fingerprint(config, "custom", "v") == "v"
    full, hashed = system_fingerprint(config, "full"), system_fingerprint(config, "hash")
    version, digest = hashed.rsplit("-", 1)
    assert full == f"{version}-tp2-{digest}"
    assert system_fingerprint(EngineConfig(seed=1)) != system_fingerprint(EngineConfig(seed=2))


def test_reserved_default_chat_template_kwargs_fail_at_start_up():
    config = ServerConfig(default_chat_template_kwargs='{"tokenize": true}')
    with pytest.raises(ValueError, match="default_chat_template_kwargs may not set 'tokenize'"):
        ServingContext(None, "m", None, default_chat_template_kwargs=config.default_chat_template_kwargs)
    with pytest.raises(ValueError, match="default_chat_template_kwargs must be a JSON object"):
        ServerConfig(default_chat_template_kwargs='["a"]')


def test_fastapi_docs_are_off_with_the_flag(flagged, server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(flagged.url + path, timeout=10).status_code == 404
        assert httpx.get(server.url + path, timeout=10).status_code == 200   # the default: served


def test_request_id_headers_name_each_response(flagged, server):
    given = {**flagged.headers, "X-Request-Id": "trace-42"}
    r = httpx.post(flagged.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Once", "max_tokens": 2,
                                                           "stream": True}, headers=given, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    ids = {httpx.get(flagged.url + "/health", timeout=10).headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)   # a new one each
    r = httpx.post(flagged.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": -1},
                   headers=flagged.headers, timeout=60)
    assert r.status_code == 400 and "x-request-id" in r.headers   # errors too
    assert "x-request-id" not in httpx.get(server.url + "/health", timeout=10).headers   # the default: none
