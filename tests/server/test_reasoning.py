"""--reasoning-parser through a real server: a tiny model whose tokenizer has <think> and </think> (ids 512
and 513), its `</think>` made likely or certain with logit_bias. Answers carry `reasoning` apart from
`content` as vLLM's do (the demo tokenizer's byte tokens left out, so that text splits where ids do),
streamed deltas join to the same, include_reasoning false hides it, and a constraint (structured output)
starts after `</think>`."""
import json
import re

import httpx
import pytest
from server.server_utils import API_KEY, CHAT_TEMPLATE, MODEL_NAME, start_server, stop_server, wait_healthy

START, END = 512, 513


@pytest.fixture(scope="module")
def think(tmp_path_factory):
    from conftest import make_tiny_model
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("think")
    path = make_tiny_model(root / "model", vocab_size=520, seed=5)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<think>", "</think>"])
    tok.save_pretrained(path)
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [START, END]
    (root / "template.jinja").write_text(CHAT_TEMPLATE)
    server = start_server(path, str(root / "serve.log"), API_KEY, "--chat-template", str(root / "template.jinja"),
                          "--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    try:
        wait_healthy(server)
        yield server, tok
    finally:
        stop_server(server)


def _chat(server, stream: bool = False, **kw) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 40,
            "temperature": 1.0, "seed": 11, "logit_bias": {str(END): 3.0}, "stream": stream,
            "allowed_token_ids": list(range(259, 514)), **kw}   # no byte tokens: whole characters only
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60)


def _streamed(server, **kw) -> tuple[str | None, str | None, list[dict]]:
    """(reasoning, content) joined from the deltas (None where no delta had any), and the chunks."""
    r = _chat(server, stream=True, **kw)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    reasoning = [c["choices"][0]["delta"].get("reasoning") for c in chunks if c["choices"]]
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:] if c["choices"]]   # [0]: the role's
    join = lambda parts: "".join(p for p in parts if p) or None   # noqa: E731
    return join(reasoning), join(content), chunks


def test_reasoning_and_content_split_at_think_end(think):
    server, tok = think
    r = _chat(server, return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = choice["token_ids"]
    assert END in ids[1:-1], ids   # the bias makes </think> come within the answer (seeded)
    text = tok.decode(ids, skip_special_tokens=True)
    before, _, after = text.partition("</think>")
    assert choice["message"]["reasoning"] == (before.replace("<think>", "") or None)
    assert choice["message"]["content"] == (after.replace("</think>", "") or None)
    # streamed: the same seed, the same split
    reasoning, content, _ = _streamed(server)
    assert (reasoning, content) == (choice["message"]["reasoning"], choice["message"]["content"])


def test_include_reasoning_false_and_thinking_off(think):
    server, _ = think
    full = _chat(server).json()["choices"][0]["message"]
    hidden = _chat(server, include_reasoning=False).json()["choices"][0]["message"]
    assert hidden["reasoning"] is None and hidden["content"] == full["content"]
    reasoning, content, _ = _streamed(server, include_reasoning=False)
    assert reasoning is None and content == full["content"]
    # enable_thinking false (Qwen3's switch), or reasoning_effort "none": all of it is content, </think> dropped
    for kw in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        off = _chat(server, **kw).json()["choices"][0]["message"]
        assert off["reasoning"] is None
        assert off["content"] == (full["reasoning"] or "") + (full["content"] or "")
    for name in ("logprobs", "return_token_ids"):
        r = _chat(server, include_reasoning=False, **{name: True})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text


def test_structured_output_starts_after_reasoning(think):
    server, tok = think
    regex = r"(cat|dog)-[0-9]{2,4}"
    so = {"structured_outputs": {"regex": regex}, "logit_bias": {str(END): 100.0}, "return_token_ids": True,
          "allowed_token_ids": None}   # the grammar's characters are byte tokens too
    choice = _chat(server, **so).json()["choices"][0]
    # </think> first (the bias; no grammar yet), then the grammar's text as content
    assert choice["token_ids"][0] == END and choice["finish_reason"] == "stop", choice
    assert choice["message"]["reasoning"] is None
    assert re.fullmatch(regex, choice["message"]["content"]), choice
    reasoning, content, _ = _streamed(server, **so)
    assert (reasoning, content) == (None, choice["message"]["content"])
    # without reasoning to come (include_reasoning false) the grammar holds from the first token
    r = _chat(server, include_reasoning=False, structured_outputs={"regex": regex}, logit_bias={str(END): 100.0},
              allowed_token_ids=None)
    message = r.json()["choices"][0]["message"]
    assert re.fullmatch(regex, message["content"]), message


def test_enforced_tool_call_after_reasoning(think):
    """tool_choice required (enforced by structured output) starts after </think>; the call is read from the
    content, streamed or not."""
    server, _ = think
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]
    kw = {"tools": tools, "tool_choice": "required", "parallel_tool_calls": False, "logit_bias": {str(END): 100.0},
          "allowed_token_ids": None, "max_tokens": 120}
    choice = _chat(server, **kw).json()["choices"][0]
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])
    assert choice["message"]["reasoning"] is None and choice["finish_reason"] == "tool_calls", choice
    _, _, chunks = _streamed(server, **kw)
    args = "".join(d["function"].get("arguments", "") for c in chunks if c["choices"]
                   for d in c["choices"][0]["delta"].get("tool_calls", []))
    assert args == call["function"]["arguments"]


def test_thinking_token_budget_ends_the_reasoning(think, server):
    """thinking_token_budget (vLLM's): once the block `<think>` opened holds that many tokens, `</think>` comes
    (here the bias bans it, so only the budget can bring it); no `<think>`, nothing counted; -1 is no limit;
    without a reasoning parser it is a 400."""
    think_server, tok = think
    kw = {"logit_bias": {str(END): -100.0}, "return_token_ids": True,
          "messages": [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": "<think>"}],
          "add_generation_prompt": False, "continue_final_message": True}   # the prompt opens the block
    unopened = {**kw, "logit_bias": {str(END): -100.0, str(START): -100.0}, "messages": kw["messages"][:1],
                "add_generation_prompt": True, "continue_final_message": False}
    plain = _chat(think_server, **unopened).json()["choices"][0]
    assert _chat(think_server, thinking_token_budget=0, **unopened).json()["choices"][0] == plain
    choice = _chat(think_server, thinking_token_budget=3, **kw).json()["choices"][0]
    ids = choice["token_ids"]
    assert END not in ids[:3] and ids[3] == END, ids
    # (decoded alone, a first token's leading space is dropped; after the prompt's "<think>" it is kept)
    assert choice["message"]["reasoning"].lstrip() == tok.decode(ids[:3], skip_special_tokens=True).lstrip()
    # qwen3's parser drops a later "</think>" from content (here spelled in pieces: END itself is banned)
    content = tok.decode(ids[4:], skip_special_tokens=True).replace("</think>", "")
    assert (choice["message"]["content"] or "").lstrip() == content.lstrip()
    unlimited = _chat(think_server, thinking_token_budget=-1, **kw).json()["choices"][0]
    assert END not in unlimited["token_ids"] and unlimited["message"]["content"] is None
    for target, budget in ((think_server, -2), (server, 3)):
        r = _chat(target, thinking_token_budget=budget, allowed_token_ids=None)
        assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget", r.text


def _complete(server, prompt: str, **kw) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 11,
            "return_token_ids": True, "allowed_token_ids": list(range(259, 514)), **kw}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_completions_budget_and_constraint_follow_the_prompts_thinking_block(think, server):
    """Completions under a reasoning parser, as vLLM's: thinking_token_budget counts the tokens of the block
    `<think>` opened (the prompt's, or the output's); a constraint holds from `</think>` unless the prompt
    closed its block; each prompt of a list on its own; without a parser the budget is a 400."""
    think_server, tok = think
    ban_end = {"logit_bias": {str(END): -100.0}}
    for budget in (0, 2):
        choice = _complete(think_server, "Once upon a time<think>", thinking_token_budget=budget, **ban_end)
        assert choice["token_ids"].index(END) == budget, choice
    no_tags = {"logit_bias": {str(END): -100.0, str(START): -100.0}}
    assert (_complete(think_server, "Once upon a time", thinking_token_budget=0, **no_tags)
            == _complete(think_server, "Once upon a time", **no_tags))   # no block: nothing counted
    regex = r"(cat|dog)-[0-9]{2,4}"
    constrained = {"structured_outputs": {"regex": regex}, "allowed_token_ids": None, "max_tokens": 30}
    r = httpx.post(think_server.url + "/v1/completions", headers=think_server.headers, timeout=60, json={
        "model": MODEL_NAME, "prompt": ["Once upon a time<think>", "Once<think>a</think>"], "temperature": 1.0,
        "seed": 3, "return_token_ids": True, "thinking_token_budget": 1, **ban_end, **constrained})
    assert r.status_code == 200, r.text
    open_block, closed = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert open_block["token_ids"][1] == END
    assert re.fullmatch(regex, tok.decode(open_block["token_ids"][2:], skip_special_tokens=True)), open_block
    assert re.fullmatch(regex, closed["text"]) and END not in closed["token_ids"]
    r = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60,
                   json={"model": MODEL_NAME, "prompt": "Once", "thinking_token_budget": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget", r.text


def test_anthropic_messages_thinking(think, server):
    """/v1/messages with thinking: the reasoning comes as a thinking block, the rest as text, as the same chat
    request's reasoning and content; budget_tokens is thinking_token_budget (here the prefill opens the block);
    display omitted keeps the block without its text; without a reasoning parser thinking is a 400."""
    think_server, tok = think
    messages = [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": "<think>"}]
    chat = _chat(think_server, messages=messages, add_generation_prompt=False, continue_final_message=True,
                 temperature=0, thinking_token_budget=3, return_token_ids=True, logit_bias=None,
                 allowed_token_ids=None)
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    assert END in choice["token_ids"][:4], choice
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 40, "temperature": 0,
            "thinking": {"type": "enabled", "budget_tokens": 3}}
    r = httpx.post(think_server.url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=60)
    assert r.status_code == 200, r.text
    content = r.json()["content"]
    assert content[0] == {"type": "thinking", "thinking": choice["message"]["reasoning"], "signature": ""}
    assert [b.get("text") for b in content[1:]] == ([choice["message"]["content"]] if choice["message"]["content"]
                                                    else [])
    omitted = {**body, "thinking": {"type": "enabled", "budget_tokens": 3, "display": "omitted"}}
    r = httpx.post(think_server.url + "/v1/messages", json=omitted, headers={"x-api-key": API_KEY}, timeout=60)
    assert r.json()["content"][0] == {"type": "thinking", "thinking": "", "signature": ""}
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=60)
    assert r.status_code == 400 and "thinking" in r.json()["error"]["message"], r.text


def test_responses_api_reasoning_items(think):
    """/v1/responses: the reasoning is a reasoning item (reasoning_text content) before the message, as the same
    chat request's reasoning and content, streamed to the same through the openai client's accumulation."""
    import openai
    server, tok = think
    chat = _chat(server, temperature=0, allowed_token_ids=None, logit_bias=None, max_tokens=12, return_token_ids=True)
    ids = chat.json()["choices"][0]["token_ids"]
    chat = chat.json()["choices"][0]["message"]
    assert chat["reasoning"], chat
    thought = ids.index(END) + 1 if END in ids else len(ids)   # the answer opens in reasoning, up to </think>
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    body = dict(model=MODEL_NAME, input="Once upon a time", max_output_tokens=12, temperature=0)
    r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers, timeout=60).json()
    items = {o["type"]: o for o in r["output"]}
    assert items["reasoning"]["content"] == [{"type": "reasoning_text", "text": chat["reasoning"]}], r
    assert r["usage"]["output_tokens_details"] == {"reasoning_tokens": thought} and 0 < thought <= 12, r
    assert (items["message"]["content"][0]["text"] if "message" in items else None) == chat["content"], r
    with client.responses.stream(**body) as stream:
        events = list(stream)
    final = events[-1].response
    assert [o.model_dump(exclude={"id"}, exclude_none=True) for o in final.output] == \
        [{k: v for k, v in o.items() if k != "id"} for o in r["output"]]
    assert final.usage.output_tokens_details.reasoning_tokens == thought


def test_responses_api_encrypted_reasoning_round_trips(think):
    """include ["reasoning.encrypted_content"] (stateless clients, e.g. Codex): each reasoning item carries its
    reasoning in an opaque field, streamed too; sent back without content it is the assistant turn's reasoning,
    the same prompt as the chat request with that reasoning; anything else there is a 400 naming it."""
    server, tok = think
    body = {"model": MODEL_NAME, "input": "Once upon a time", "max_output_tokens": 12, "temperature": 0,
            "include": ["reasoning.encrypted_content"]}
    r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers, timeout=60).json()
    [item] = [o for o in r["output"] if o["type"] == "reasoning"]
    assert item["encrypted_content"] and item["content"][0]["text"] not in item["encrypted_content"]
    streamed = httpx.post(server.url + "/v1/responses", json={**body, "stream": True}, headers=server.headers,
                          timeout=60).text
    last = json.loads(streamed.strip().splitlines()[-1][6:])["response"]
    assert [o["encrypted_content"] for o in last["output"] if o["type"] == "reasoning"] == [item["encrypted_content"]]
    turn = [{"role": "user", "content": "Once upon a time"},
            {"type": "reasoning", "id": item["id"], "summary": [], "encrypted_content": item["encrypted_content"]},
            {"role": "assistant", "content": "The end."}, {"role": "user", "content": "Again"}]
    again = {"model": MODEL_NAME, "input": turn, "max_output_tokens": 1, "temperature": 0}
    r = httpx.post(server.url + "/v1/responses", json=again, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    chat = _chat(server, messages=[turn[0], {"role": "assistant", "content": "The end.",
                                             "reasoning": item["content"][0]["text"]}, turn[3]],
                 max_tokens=1, temperature=0, allowed_token_ids=None, logit_bias=None)
    assert r.json()["usage"]["input_tokens"] == chat.json()["usage"]["prompt_tokens"]
    with_content = {**turn[1], "content": [{"type": "reasoning_text", "text": "x"}]}
    for bad, param in (({**turn[1], "encrypted_content": "%%%"}, "input.1.encrypted_content"),
                       (with_content, "input.1.encrypted_content")):
        r = httpx.post(server.url + "/v1/responses", json={**again, "input": [turn[0], bad, *turn[2:]]},
                       headers=server.headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(server.url + "/v1/responses", json={**body, "include": ["message.output_text.logprobs"]},
                   headers=server.headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "include", r.text
