"""LoRA adapters behind `pagedllm serve`, through the `openai` client: adapters chosen by a request's model give
offline LLM.generate's tokens under the same LoRARequest (greedy), /v1/models lists them, adapters load and
unload at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING), and every misuse is a clear error."""

import logging

import httpx
import openai
import pytest
from e2e.test_lora import ADAPTERS, make_adapter
from server.server_utils import CHAT_TEMPLATE, MODEL_NAME, serving, start_server, wait_all_blocks_free

from pagedllm import LoRARequest, SamplingParams

PROMPTS = ["Once upon a time", "The little dog was", "Tom and Lily went to the park"]
MAX_TOKENS = 12
FLAGS = ("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--dtype", "float32")


@pytest.fixture(scope="module")
def lora_env(tmp_path_factory):
    from conftest import make_tiny_model
    root = tmp_path_factory.mktemp("lora_server")
    base = make_tiny_model(root / "base")
    paths = {name: make_adapter(base, root / name, i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    (root / "template.jinja").write_text(CHAT_TEMPLATE)
    _resolver_dir(root / "resolver", paths)
    server = start_server(base, str(root / "serve.log"), None, *FLAGS, "--chat-template",
                          str(root / "template.jinja"), "--lora-modules", f"rs={paths['rs']}",
                          f'{{"name": "attn", "path": "{paths["attn"]}", "base_model_name": "{MODEL_NAME}"}}',
                          env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                               "VLLM_LORA_RESOLVER_CACHE_DIR": str(root / "resolver")})
    with serving({"lora": server}):
        yield base, paths, server


def _resolver_dir(resolver, paths):
    """vLLM's filesystem resolver's directory: adapters by name, one of another base model, one too large."""
    import json
    import shutil
    for name, src, edit in (("fs/rs", "rs", {}), ("other-base", "rs", {"base_model_name_or_path": "org/other"}),
                            ("too-large", "rs", {"r": 32})):
        shutil.copytree(paths[src], resolver / name)
        config = json.loads((resolver / name / "adapter_config.json").read_text())
        (resolver / name / "adapter_config.json").write_text(json.dumps({**config, **edit}))


@pytest.fixture(scope="module")
def client(lora_env):
    return openai.OpenAI(base_url=lora_env[2].url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def offline(lora_env):
    """Offline LLM.generate's texts per (adapter name or None, prompt), greedy; the ids are the server's (1, 2,
    then 3 for the adapter loaded at run time): the engine's ids need not match, only the adapters."""
    from pagedllm import LLM
    base, paths, _ = lora_env
    llm = LLM(base, dtype="float32", device="cpu", log_stats_interval=0, enable_lora=True, max_loras=3)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = {}
    for i, name in enumerate([None, "rs", "attn", "all"]):
        lora = None if name is None else LoRARequest(name, i, paths[name])
        for out, prompt in zip(llm.generate(PROMPTS, params, use_tqdm=False, lora_request=lora), PROMPTS):
            texts[name, prompt] = out.outputs[0].text
    return texts


def _complete(client, model, prompt, **kw):
    kw = {"extra_body": {"ignore_eos": True}, **kw}
    return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, **kw)


def test_adapters_by_name_match_offline(client, offline):
    for prompt in PROMPTS:
        for name in (None, "rs", "attn"):
            out = _complete(client, name or MODEL_NAME, prompt)
            assert out.choices[0].text == offline[name, prompt], (name, prompt)
            assert out.model == (name or MODEL_NAME)
    differ = sum(offline[n, p] != offline[None, p] for n in ("rs", "attn") for p in PROMPTS)
    assert differ >= len(PROMPTS)   # the adapters change the answers: the test is not passed by the base alone


def test_sagemaker_adapter_header_picks_the_adapter_on_invocations(lora_env, offline):
    """vLLM's /invocations takes SageMaker's X-Amzn-SageMaker-Adapter-Identifier header as the body's model (its
    inject_adapter_id); the header was ignored, so the base model answered a request sent to an adapter."""
    url = lora_env[2].url + "/invocations"
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True}
    for headers, name in (({"X-Amzn-SageMaker-Adapter-Identifier": "rs"}, "rs"), ({}, None)):
        out = httpx.post(url, json=body, headers=headers, timeout=60).json()
        assert out["choices"][0]["text"] == offline[name, PROMPTS[0]] and out["model"] == (name or MODEL_NAME)
    answer = httpx.post(url, json=body, headers={"X-Amzn-SageMaker-Adapter-Identifier": "nope"}, timeout=60)
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "model"


def test_streaming_and_chat_under_an_adapter(client, offline):
    prompt = PROMPTS[1]
    chunks = list(_complete(client, "rs", prompt, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline["rs", prompt]
    assert {c.model for c in chunks} == {"rs"}
    kw = dict(messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=MAX_TOKENS, temperature=0.0,
              extra_body={"ignore_eos": True})
    full = {m: client.chat.completions.create(model=m, **kw).choices[0].message.content for m in (MODEL_NAME, "attn")}
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="attn", stream=True, **kw) if c.choices)
    assert streamed == full["attn"] != full[MODEL_NAME]


def test_beam_search_under_an_adapter(client):
    """Beam search's step requests run under the request's adapter (its text is detokenized whole, so it is
    compared with the base's beam search, not with greedy streaming text)."""
    texts = [_complete(client, name, PROMPTS[0], extra_body={"use_beam_search": True, "ignore_eos": True})
             .choices[0].text for name in (MODEL_NAME, "rs", "rs")]
    assert texts[1] == texts[2] != texts[0]


def test_models_lists_base_and_adapters(client, lora_env):
    _, paths, _ = lora_env
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards)[:3] == [MODEL_NAME, "rs", "attn"]
    assert cards[MODEL_NAME].parent is None
    for name in ("rs", "attn"):
        assert cards[name].parent == MODEL_NAME and cards[name].root == paths[name]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        _complete(client, "no-such-adapter", PROMPTS[0])
    assert e.value.body["code"] == "model_not_found" and "no-such-adapter" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])


def test_load_and_unload_at_run_time(client, lora_env, offline):
    _, paths, server = lora_env
    post = _poster(server)
    r = post("/v1/load_lora_adapter", {"lora_name": "all", "lora_path": paths["all"], "is_3d_lora_weight": False})
    assert r.status_code == 200 and "all" in r.text   # vLLM's body field (its MoE layout): was a 400
    assert _complete(client, "all", PROMPTS[2]).choices[0].text == offline["all", PROMPTS[2]]
    assert "all" in {m.id for m in client.models.list().data}
    r = post("/v1/load_lora_adapter", {"lora_name": "all", "lora_path": paths["all"]})
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    r = post("/v1/unload_lora_adapter", {"lora_name": "all"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "all", PROMPTS[0])
    r = post("/v1/unload_lora_adapter", {"lora_name": "all"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    # loaded again under a new id: same tokens
    assert post("/v1/load_lora_adapter", {"lora_name": "all", "lora_path": paths["all"]}).status_code == 200
    assert _complete(client, "all", PROMPTS[2]).choices[0].text == offline["all", PROMPTS[2]]


def test_load_errors(lora_env, tmp_path):
    _, paths, server = lora_env
    post = _poster(server)
    missing = str(tmp_path / "nowhere")
    r = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": missing})
    err = r.json()["error"]   # vLLM's 404 (LoRAAdapterNotFoundError): no adapter at that path
    assert r.status_code == 404 and missing in err["message"] and "no adapter directory" in err["message"]
    assert (err["param"], err["code"]) == ("lora_path", "lora_adapter_not_found")
    (tmp_path / "empty").mkdir()
    r = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tmp_path / "empty")})
    assert r.status_code == 404 and "adapter_config.json not found" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": paths["all"] + "/adapter_config.json"})
    assert r.status_code == 404
    r = post("/v1/load_lora_adapter", {"lora_name": MODEL_NAME, "lora_path": paths["rs"]})
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", {"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = post("/v1/load_lora_adapter", {"lora_name": "", "lora_path": ""})
    assert r.status_code == 400 and "must be provided" in r.json()["error"]["message"]
    assert post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": paths["rs"]}).status_code == 200


def test_unload_in_use_as_vllms(client, lora_env, offline):
    """vLLM unloads a name while requests run under its adapter (200; they finish under it); here it was a 400
    until they ended, so a client swapping adapters under load failed at random."""
    server = lora_env[2]
    post = _poster(server)
    stream = iter(client.completions.create(model="attn", prompt=PROMPTS[0], max_tokens=60, temperature=0.0,
                                            stream=True, extra_body={"ignore_eos": True}))
    text = next(stream).choices[0].text   # it runs
    r = post("/v1/unload_lora_adapter", {"lora_name": "attn"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'attn' removed successfully."
    assert "attn" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        _complete(client, "attn", PROMPTS[0])
    chunks = list(stream)
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(offline["attn", PROMPTS[0]]) and chunks[-1].choices[0].finish_reason == "length"
    wait_all_blocks_free(server)
    assert post("/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": lora_env[1]["attn"]}).status_code == 200
    assert _complete(client, "attn", PROMPTS[1]).choices[0].text == offline["attn", PROMPTS[1]]


def _poster(server):
    return lambda path, body: httpx.post(server.url + path, json=body, timeout=30)


def test_lora_modules_without_enable_lora(tmp_path):
    from pagedllm.cli import main
    assert main(["serve", str(tmp_path), "--lora-modules", "a=/x"]) == 2


def test_bad_static_adapter_stops_the_server():
    """A --lora-modules adapter that does not load: the app's start-up fails with its error (serve() then exits
    with code 1), checked in-process on a fake engine (a real server start costs ~30 s on shared cores)."""
    from fastapi.testclient import TestClient
    from pagedllm.config import ServerConfig
    from pagedllm.server.api_server import build_app, startup_traceback_filter
    from pagedllm.server.launch import parse_lora_modules
    from pagedllm.server.lora import ServingLoRAs
    from pagedllm.server.serving import ServingContext

    class FakeEngine:
        closed = False

        def attach(self):
            pass

        def shutdown(self):
            self.closed = True

        async def add_lora(self, request):
            raise ValueError(f"LoRA adapter {request.lora_name!r} ({request.lora_path}): adapter_config.json not "
                             f"found")
    engine = FakeEngine()
    ctx = ServingContext(engine, MODEL_NAME, None)
    ctx.loras = ServingLoRAs(engine, MODEL_NAME)
    app = build_app(ctx, None, ServerConfig(), [], parse_lora_modules(["bad=/nowhere"]))
    with pytest.raises(ValueError, match="--lora-modules bad=/nowhere: LoRA adapter 'bad'"):
        with TestClient(app):
            pass
    assert ctx.startup_error.startswith("--lora-modules bad=/nowhere") and engine.closed
    # uvicorn's traceback of that exception is not printed after the message (other records are)
    keep = startup_traceback_filter(ctx)
    record = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "Traceback (most recent call last): ...",
                               None, None)
    assert not keep(record)
    assert keep(logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "Application startup failed.", None, None))
    ctx.startup_error = None
    assert keep(record)


def test_runtime_updating_off_by_default(monkeypatch):
    """Without VLLM_ALLOW_RUNTIME_LORA_UPDATING the routes answer 404 saying how to turn them on (vLLM: no route)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from pagedllm.server.errors import install_error_handlers
    from pagedllm.server.lora import lora_routes
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(lora_routes(None, []))
    r = TestClient(app).post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
    assert r.status_code == 404 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in r.json()["error"]["message"]


@pytest.mark.parametrize("items, match", [
    (["a"], "name=path"), (["=p"], "name=path"), (["{bad"], "not valid JSON"),
    (['{"name": "a"}'], "path must be"), (['{"name": "a", "path": "/p", "x": 1}'], "x"),
    (["a=/p", '{"name": "a", "path": "/q"}'], "unique")])
def test_parse_lora_modules_errors(items, match):
    from pagedllm.server.launch import parse_lora_modules
    with pytest.raises(ValueError, match=match):
        parse_lora_modules(items)


def test_parse_lora_modules():
    from pagedllm.server.launch import LoRAModulePath, parse_lora_modules
    assert parse_lora_modules(["a=/p=q", '{"name": "b", "path": "/r", "base_model_name": "m"}']) == [
        LoRAModulePath("a", "/p=q"), LoRAModulePath("b", "/r", "m")]


def test_engine_lora_error_names_the_model_field():
    """An adapter read that fails in the core (its files gone since it was registered) is a 400 on `model`."""
    from pagedllm.engine.async_llm import EngineGenerateError
    from pagedllm.server.serving import client_error
    err = client_error(EngineGenerateError("the engine failed request r: ValueError: LoRA adapter 'a' (/p): "
                                           "adapter_config.json not found", 400), "response_format")
    assert (err.status, err.param, err.code) == (400, "model", "invalid_lora_adapter")
    assert client_error(EngineGenerateError("boom", 400), "response_format").param == "response_format"


def test_adapter_named_as_a_served_model_alias_is_refused():
    """--served-model-name base alias: a request's model `alias` is the base model, so an adapter of that name
    would be listed by /v1/models and never run; refused as the first name is."""
    import asyncio

    from pagedllm.server.errors import APIError
    from pagedllm.server.lora import ServingLoRAs

    class Engine:
        async def add_lora(self, request):
            return True
    loras = ServingLoRAs(Engine(), "base", ["alias"])
    for name in ("base", "alias"):
        with pytest.raises(APIError, match="base model") as e:
            asyncio.run(loras.load(name, "/p"))
        assert e.value.status == 400 and e.value.param == "lora_name"
    asyncio.run(loras.load("other", "/p"))
    assert list(loras.adapters) == ["other"]


def test_lora_modules_as_vllm_parses_them():
    """vLLM skips an empty --lora-modules item (a template's unset list) and takes is_3d_lora_weight in the JSON
    form (its MoE layout flag: no MoE model here); both stopped the start."""
    from pagedllm.server.launch import LoRAModulePath, parse_lora_modules
    assert parse_lora_modules(["", "a=/p", " "]) == [LoRAModulePath("a", "/p")]
    assert parse_lora_modules(['{"name": "b", "path": "/r", "is_3d_lora_weight": false}']) == [
        LoRAModulePath("b", "/r")]
    with pytest.raises(ValueError, match="is_3d_lora_weight must be true or false"):
        parse_lora_modules(['{"name": "b", "path": "/r", "is_3d_lora_weight": "yes"}'])


def test_base_model_name_not_served_is_the_base_as_vllms(caplog):
    """vLLM takes a --lora-modules base_model_name only when it is a served model name, else the adapter's parent
    is the base model: /v1/models listed a parent that no request could name. Logged here."""
    import asyncio

    from pagedllm.server.launch import parse_lora_modules
    from pagedllm.server.lora import ServingLoRAs

    class Engine:
        max_model_len = 64

        async def add_lora(self, request):
            return True
    loras = ServingLoRAs(Engine(), "base", ["alias"])
    modules = parse_lora_modules(['{"name": "a", "path": "/a", "base_model_name": "alias"}',
                                  '{"name": "b", "path": "/b", "base_model_name": "meta-llama/Llama-3-8B"}'])
    with caplog.at_level(logging.WARNING):
        asyncio.run(loras.load_static(modules))
    assert {c["id"]: c["parent"] for c in loras.cards()} == {"a": "alias", "b": "base"}
    assert loras.get("a").base_model_name == "alias" and loras.get("b").base_model_name is None
    assert "base_model_name 'meta-llama/Llama-3-8B' is not a served model name" in caplog.text


def test_empty_model_is_the_base_as_vllms(client, offline):
    """vLLM serves a request whose model is "" with the base model; here it was a 404 naming no model."""
    assert _complete(client, "", PROMPTS[0]).choices[0].text == offline[None, PROMPTS[0]]


def test_filesystem_resolver_loads_an_adapter_named_by_a_request(client, offline):
    """vLLM's filesystem resolver (VLLM_LORA_RESOLVER_CACHE_DIR, with runtime updating on): a request's model that
    names no loaded adapter loads the directory of that name there, if it is a LoRA of this model; the variable
    was ignored here (404)."""
    assert _complete(client, "fs/rs", PROMPTS[1]).choices[0].text == offline["rs", PROMPTS[1]]
    assert "fs/rs" in {m.id for m in client.models.list().data}
    for name in ("other-base", "nowhere", "fs", "../rs"):   # another base model's; none; no adapter; outside it
        with pytest.raises(openai.NotFoundError):
            _complete(client, name, PROMPTS[0])
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, "too-large", PROMPTS[0])
    assert "LoRA adapter 'too-large' was found but could not be loaded" in e.value.body["message"]
    assert "max_lora_rank" in e.value.body["message"]


@pytest.mark.parametrize("env, words", [
    ({"VLLM_LORA_RESOLVER_CACHE_DIR": "/no/such/dir"}, "VLLM_LORA_RESOLVER_CACHE_DIR must be set to a valid"),
    ({"VLLM_LORA_RESOLVER_HF_REPO_LIST": "org/adapters", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"},
     "Hugging Face Hub LoRA resolver is not built")])
def test_lora_resolver_variables_checked_at_start(monkeypatch, env, words):
    """Checked before any process starts (vLLM's start fails on a resolver directory that is none)."""
    from pagedllm.config import EngineConfig, ServerConfig
    from pagedllm.server.launch import check_serve_config
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=words):
        check_serve_config(EngineConfig(enable_lora=True), ServerConfig(), 0.0)
