"""The server's tokenizer and model-management routes in-process, over a fake engine with the demo tokenizer:
vLLM's request fields and answers (/tokenize, /v1/models, /v1/load_lora_adapter, /generative_scoring's ids)."""
import asyncio
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from conftest import DEMO_DIR
from pagedllm.config import ServerConfig
from pagedllm.server.api_server import build_app
from pagedllm.server.lora import ServingLoRAs
from pagedllm.server.serving import ServingContext

MAX_MODEL_LEN = 96


class FakeEngine:
    """What the tokenizer and LoRA routes read of AsyncLLM; add_lora / remove_lora as the core's (ids kept)."""

    def __init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained(str(DEMO_DIR))
        self.max_model_len = MAX_MODEL_LEN
        self.config = type("Config", (), {"model": "/models/base"})()
        self.loras: dict[int, str] = {}

    def attach(self):
        pass

    def shutdown(self):
        pass

    async def add_lora(self, request):
        self.loras[request.lora_int_id] = request.lora_path

    async def remove_lora(self, lora_int_id: int) -> bool:
        return self.loras.pop(lora_int_id, None) is not None

    async def list_loras(self):
        return set(self.loras)


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    engine = FakeEngine()
    ctx = ServingContext(engine, "m", None)
    ctx.loras = ServingLoRAs(engine, "m")
    with TestClient(build_app(ctx, None, ServerConfig(), [])) as c:
        c.engine = engine
        yield c


def test_tokenize_returns_token_strs_when_asked(client):
    """vLLM's return_token_strs: the tokens' strings (convert_ids_to_tokens) beside their ids."""
    tokenizer = client.engine.tokenizer
    r = client.post("/tokenize", json={"prompt": "Once upon a time", "return_token_strs": True})
    assert r.status_code == 200, r.text
    ids = tokenizer.encode("Once upon a time")
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": MAX_MODEL_LEN,
                        "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    for asked in ({"return_token_strs": False}, {"return_token_strs": None}, {}):
        # vLLM's answer has the key, null: a client that reads it gets None, not a KeyError
        r = client.post("/tokenize", json={"prompt": "Once upon a time", **asked})
        assert r.status_code == 200, r.text
        assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": MAX_MODEL_LEN, "token_strs": None}


def test_load_lora_adapter_load_inplace(client):
    """vLLM's load_inplace: false (its default) is a plain load; true replaces a loaded adapter's weights under
    its name (a fresh id, so nothing cached under the old weights is reused), and loads one not yet loaded."""
    load = lambda **body: client.post("/v1/load_lora_adapter", json=body)
    assert load(lora_name="a", lora_path="/p1", load_inplace=False).status_code == 200
    r = load(lora_name="a", lora_path="/p2", load_inplace=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    r = load(lora_name="a", lora_path="/p2", load_inplace=True)
    assert r.status_code == 200, r.text
    assert client.engine.loras == {2: "/p2"}   # the old weights are off the host
    assert load(lora_name="b", lora_path="/p3", load_inplace=True).status_code == 200
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["a"]["root"] == "/p2" and cards["b"]["root"] == "/p3"


def test_lora_model_cards_have_max_model_len(client):
    """Every card has the fields of the base model's (a client reading card["max_model_len"] of an adapter)."""
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/p"}).status_code == 200
    cards = client.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["m", "a"]
    assert set(cards[0]) == set(cards[1]) and cards[1]["max_model_len"] == MAX_MODEL_LEN
    assert cards[1]["parent"] == "m" and cards[1]["root"] == "/p"


def test_model_cards_have_vllms_permission(client):
    """vLLM's cards (base model and adapters) carry `permission`: one model_permission object with its fields
    (a client reading card["permission"] must not fail on this server)."""
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/p"}).status_code == 200
    for card in client.get("/v1/models").json()["data"]:
        [permission] = card["permission"]
        assert permission["id"].startswith("modelperm-") and permission["object"] == "model_permission"
        assert {k: permission[k] for k in ("allow_create_engine", "allow_sampling", "allow_logprobs",
                                            "allow_search_indices", "allow_view", "allow_fine_tuning",
                                            "organization", "group", "is_blocking")} == {
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
            "group": None, "is_blocking": False}
        assert isinstance(permission["created"], int)


def test_invocations_body_nested_too_deeply_is_400(client):
    """/invocations reads its body itself: JSON nested past the parser's depth is the client's error, as on the
    other routes (the body guard's 400, request_body.MAX_JSON_DEPTH), not a 500 that also drops the
    connection."""
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/invocations", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json" and "nested too deeply" in r.json()["error"]["message"]


def test_metrics_have_vllms_request_length_histograms():
    """vLLM's dashboards' "Request Prompt Length" and "Request Generation Length" panels: a histogram of each
    finished sequence's prompt and generated tokens (each of n counts, as vLLM's child requests)."""
    from pagedllm.metrics import FinishedRequestStats, StepStats
    from pagedllm.server.metrics import ServerMetrics
    metrics = ServerMetrics("m")
    metrics.record(StepStats(finished=[FinishedRequestStats("stop", 0.5, 3, 40)]))
    text = metrics.render(None).decode()
    assert 'pagedllm:request_prompt_tokens_bucket{engine="0",le="5.0",model_name="m"} 1.0' in text
    assert 'pagedllm:request_prompt_tokens_bucket{engine="0",le="2.0",model_name="m"} 0.0' in text
    assert 'pagedllm:request_generation_tokens_sum{engine="0",model_name="m"} 40.0' in text
    assert 'pagedllm:request_generation_tokens_bucket{engine="0",le="50.0",model_name="m"} 1.0' in text


def test_unload_lora_adapter_without_a_name_is_400(client):
    """vLLM's: an empty lora_name is the request's fault (400 naming it), not an adapter not found (404)."""
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text


class ScoringEngine(FakeEngine):
    """add_request as AsyncLLM's (an id in flight is a ValueError); each request's one output waits for
    `release`; abort() records the ids it stops that were still in flight."""

    def __init__(self):
        super().__init__()
        self.input_processor = SimpleNamespace(vocab_size=len(self.tokenizer), max_kv_tokens=10**6,
                                               enable_prefix_caching=True, max_logprobs=20)
        self.running, self.aborted = set(), []
        self.release = asyncio.Event()

    def add_request(self, request_id, prompt, params, **_):
        if request_id in self.running:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.running.add(request_id)
        return self._outputs(request_id, prompt, params)

    async def _outputs(self, request_id, prompt, params):
        await self.release.wait()
        self.running.discard(request_id)
        position = {t: SimpleNamespace(logprob=-1.0) for t in params.logprob_token_ids}
        yield SimpleNamespace(prompt_token_ids=prompt, outputs=[SimpleNamespace(token_ids=[3], logprobs=[position])])

    def abort(self, request_id):
        if request_id in self.running:
            self.aborted.append(request_id)


def test_generative_scoring_requests_of_one_request_id_run_side_by_side():
    """A request_id names the answer (as chat's and completions'), not the engine's requests: a second request
    sending the same one while the first runs is answered too, and does not abort the first (whose client would
    then wait for ever)."""
    async def go():
        engine = ScoringEngine()
        app = build_app(ServingContext(engine, "m", None), None, ServerConfig(), [])
        body = {"query": [5, 6], "items": [[7]], "label_token_ids": [3, 4], "request_id": "same"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            first = asyncio.ensure_future(c.post("/generative_scoring", json=body))
            while not engine.running:
                assert not first.done(), first.result().text   # it failed before reaching the engine
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(c.post("/generative_scoring", json=body))
            while len(engine.running) < 2 and not second.done():
                await asyncio.sleep(0.01)
            aborted = list(engine.aborted)
            engine.release.set()
            return await asyncio.wait_for(first, 10), await second, aborted
    first, second, aborted = asyncio.run(go())
    assert aborted == []
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["id"] == second.json()["id"] == "generative-scoring-same"


def test_tokenizer_info_only_with_its_flag():
    """vLLM's --enable-tokenizer-info-endpoint: GET /tokenizer_info answers the tokenizer's config (no file paths,
    special tokens as text, tokenizer_class, the --chat-template); without the flag the route is a 404, and with
    an API key it needs the key, as /tokenize does."""
    engine = FakeEngine()
    ctx = ServingContext(engine, "m", "{{ messages }}")
    with TestClient(build_app(ctx, None, ServerConfig(), [])) as c:
        assert c.get("/tokenizer_info").status_code == 404
    with TestClient(build_app(ctx, None, ServerConfig(enable_tokenizer_info_endpoint=True), ["k"])) as c:
        assert c.get("/tokenizer_info").status_code == 401
        r = c.get("/tokenizer_info", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["tokenizer_class"] == type(engine.tokenizer).__name__
    assert info["chat_template"] == "{{ messages }}"
    assert "vocab_file" not in info and "merges_file" not in info
    for name in ("bos_token", "eos_token"):
        if name in engine.tokenizer.init_kwargs:
            assert info[name] == str(engine.tokenizer.init_kwargs[name])


def test_tokenize_and_chat_take_vllms_multimodal_fields_empty():
    """vLLM's chat requests (/tokenize's messages form, chat completions) have media_io_kwargs and
    mm_processor_kwargs: null or empty is taken (a text-only model has nothing for them), anything else is a 400
    naming what is not built, not 'Unrecognized request argument'."""
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    client = TestClient(build_app(ServingContext(FakeEngine(), "m", template), None, ServerConfig(), []))
    messages = [{"role": "user", "content": "hi"}]
    plain = client.post("/tokenize", json={"messages": messages})
    assert plain.status_code == 200, plain.text
    for name in ("media_io_kwargs", "mm_processor_kwargs"):
        for empty in (None, {}):
            r = client.post("/tokenize", json={"messages": messages, name: empty})
            assert r.status_code == plain.status_code and r.json() == plain.json(), r.text
        r = client.post("/tokenize", json={"messages": messages, name: {"image": {"x": 1}}})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == name and error["code"] == "unsupported_parameter", error
        assert "multimodal" in error["message"], error
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, name: {"image": {"x": 1}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text


def test_load_answers_vllms_untracked_zero(client):
    """vLLM's GET /load without --enable-server-load-tracking (its default; the flag is refused here): always
    {"server_load": 0}. It was a 404."""
    r = client.get("/load")
    assert r.status_code == 200 and r.json() == {"server_load": 0}, r.text
    assert client.post("/load").status_code == 405


def test_vllms_routes_not_built_are_404s_naming_why(client):
    """vLLM 0.26's development routes (VLLM_SERVER_DEV_MODE=1: /server_info, /reset_prefix_cache, /is_sleeping,
    ...) and its other routes not built: a 404 saying so and why, not the plain 'no such route'."""
    for method, path, words in [("GET", "/server_info", "VLLM_SERVER_DEV_MODE"),
                                ("POST", "/reset_prefix_cache", "prefix cache")]:
        r = client.request(method, path)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["message"].startswith(f"{path} is vLLM's, not built here") and words in error["message"], error
    for path in ("/is_sleeping", "/sleep", "/pause"):   # built, served as vLLM does in its development mode
        r = client.request("GET" if path.startswith("/is") else "POST", path)
        assert r.status_code == 404 and "VLLM_SERVER_DEV_MODE=1" in r.json()["error"]["message"], r.text
    for path in ("/start_profile", "/stop_profile"):   # built, served as vLLM does with a --profiler-config
        r = client.post(path)
        assert r.status_code == 404 and r.json()["error"]["message"] == (
            f"{path} is a development route: served (as by vLLM) only with --profiler-config, e.g. "
            f"'--profiler-config.profiler=torch --profiler-config.torch_profiler_dir=DIR'"), r.text
    r = client.get("/no_such_thing")
    assert r.status_code == 404 and "no such route" in r.json()["error"]["message"], r.text
