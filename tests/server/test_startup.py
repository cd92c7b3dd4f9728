"""A server with a generation config (--generation-config DIR): its start-up log, and requests that leave
sampling fields unset take the defaults."""
import json

import httpx
import pytest
from server.server_utils import CHAT_TEMPLATE, MAX_MODEL_LEN, MODEL_NAME, start_server, stop_server, wait_healthy

from pagedllm import SamplingParams


@pytest.fixture(scope="module")
def gen_server(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_server")
    (root / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 1, "max_new_tokens": 5}))
    server = start_server(tiny_model_dirs["llama"], str(root / "serve.log"), None, "--log-level", "info",
                          "--generation-config", str(root), "--chat-template", CHAT_TEMPLATE)
    try:
        wait_healthy(server)
        yield server
    finally:
        stop_server(server)


def test_startup_log(gen_server):
    log = open(gen_server.log_path).read()
    assert "sampling defaults from" in log and "{'temperature': 0.7, 'top_k': 1, 'max_tokens': 5}" in log
    line = next(x for x in log.splitlines() if "engine core ready in" in x)
    assert " on cpu (float32), weights loaded in " in line and " KV blocks of 16 tokens, no CUDA graphs" in line


def test_unset_fields_take_the_defaults(gen_server, offline_llm):
    prompt = "Once upon a time"

    def complete(**kw):
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 5, **kw}   # the file's max_new_tokens caps it
        return httpx.post(gen_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    def offline(**kw):
        return offline_llm.generate(prompt, SamplingParams(max_tokens=5, **kw), use_tqdm=False)[0].outputs[0].text

    assert complete() == offline(temperature=0.0)                 # top_k 1 from the generation config
    assert complete(top_k=0, seed=3) == offline(temperature=0.7, seed=3) != offline(temperature=0.0)


def test_max_new_tokens_fills_and_caps_max_tokens(gen_server):
    """vLLM's get_max_tokens: a chat request without max_tokens gets the generation config's max_new_tokens, capped
    at what its prompt leaves of max_model_len (not a 400); and with --generation-config DIR (not auto or vllm),
    that max_new_tokens caps every request's max_tokens too (override_max_tokens), after the context check, which
    reads the request's own. Completions' max_tokens is 16, null too (vLLM 0.26's normalize_null_max_tokens)."""
    def post(route, **body):
        return httpx.post(gen_server.url + route, json={"model": MODEL_NAME, "ignore_eos": True, **body}, timeout=60)

    def usage(route, **body):
        r = post(route, **body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    chat = [{"role": "user", "content": "hi"}]
    assert usage("/v1/chat/completions", messages=chat)["completion_tokens"] == 5
    assert usage("/v1/chat/completions", messages=chat, max_tokens=12)["completion_tokens"] == 5
    assert usage("/v1/chat/completions", messages=chat, max_completion_tokens=3)["completion_tokens"] == 3
    for max_tokens in (None, 16, 12):
        assert usage("/v1/completions", prompt="Once upon a time", max_tokens=max_tokens)["completion_tokens"] == 5
    assert usage("/v1/completions", prompt="Once upon a time")["completion_tokens"] == 5
    assert usage("/v1/completions", prompt="Once upon a time", max_tokens=2)["completion_tokens"] == 2
    long = [1] + [300] * (MAX_MODEL_LEN - 3)   # leaves 2 tokens: the request's 16 do not fit, cap or not
    r = post("/v1/completions", prompt=long, max_tokens=None)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    # a min_tokens above the cap is refused as above max_tokens (vLLM checks it against the capped value)
    r = post("/v1/completions", prompt="Once upon a time", max_tokens=12, min_tokens=8)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
