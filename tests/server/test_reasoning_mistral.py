"""--reasoning-parser mistral through a real server, on a tiny model that writes what Magistral writes: [THINK]
and [/THINK] are special tokens of its tokenizer (the server keeps them in the text for the parser, as vLLM's
Mistral tokenizer does), and its weights make each token's successor certain (test_mistral_tools' bigram
chains; where two chains share a token, a request's logit_bias picks the successor). The answer is content
until the model writes [THINK], reasoning up to [/THINK]; tool calls are read after it; a constraint holds from
the first token where the prompt closed a [THINK] block, waits for [/THINK] where it opened one, and lets the
first token decide where it holds none (vLLM 0.26's); streamed answers equal the non-streamed ones."""
import json
import re

import httpx
import pytest
from server.server_utils import API_KEY, MODEL_NAME, start_server, stop_server, wait_healthy
from server.test_mistral_tools import ARGS, BOT, _script

THINK, END = "[THINK]", "[/THINK]"
ANSWER = ["<ans>", THINK, "Two and two.", END, "The answer", " is 4."]
CALL = ["<call>", THINK, "Weather, so a call.", END, BOT, "get_weather", ARGS, '{"city":', ' "Paris"}']
PLAIN = ["<plain>", "Just", " content."]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
REGEX = r"(cat|dog)-[0-9]{2,4}"


@pytest.fixture(scope="module")
def magistral(tmp_path_factory):
    from conftest import make_tiny_model
    root = tmp_path_factory.mktemp("magistral")
    path = make_tiny_model(root / "model", arch="mistral", vocab_size=540, seed=9, sliding_window=None)
    tok = _script(path, [ANSWER, CALL, PLAIN], special=(BOT, ARGS, THINK, END))
    (root / "template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    server = start_server(path, str(root / "serve.log"), API_KEY, "--chat-template", str(root / "template.jinja"),
                          "--reasoning-parser", "mistral", "--enable-auto-tool-choice", "--tool-call-parser",
                          "mistral")
    try:
        wait_healthy(server)
        yield server, tok
    finally:
        stop_server(server)


def _body(tok, chain: list[str], **kw) -> dict:
    """A request whose prompt ends in the chain's first token, the shared tokens' successors picked."""
    bias = {str(tok.convert_tokens_to_ids(chain[chain.index(t) + 1])): 1.0 for t in (THINK, END) if t in chain}
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": chain[0]}], "temperature": 0,
            "max_tokens": 20, "logit_bias": bias, **kw}


def _post(server, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=server.headers, timeout=60)


def _chat(server, body: dict) -> dict:
    r = _post(server, body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _streamed(server, body: dict) -> dict:
    """The deltas joined as one message: reasoning, content (None where no delta had any), tool calls, finish."""
    r = _post(server, {**body, "stream": True})
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    join = lambda key: "".join(d["delta"].get(key) or "" for d in deltas) or None   # noqa: E731
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for call in d["delta"].get("tool_calls") or []:
            calls.setdefault(call["index"], ["", ""])
            calls[call["index"]][0] += call["function"].get("name") or ""
            calls[call["index"]][1] += call["function"].get("arguments") or ""
    finish = next(d["finish_reason"] for d in reversed(deltas) if d["finish_reason"])
    return {"reasoning": join("reasoning"), "content": join("content"), "calls": [tuple(c) for c in calls.values()],
            "finish_reason": finish}


def _summary(choice: dict) -> dict:
    m = choice["message"]
    return {"reasoning": m.get("reasoning"), "content": m["content"],
            "calls": [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or []],
            "finish_reason": choice["finish_reason"]}


def test_reasoning_then_content(magistral):
    """The model's [THINK]...[/THINK] is the reasoning, the rest the content, whatever skip_special_tokens says
    (the parser reads the tags); include_reasoning false leaves the content alone."""
    server, tok = magistral
    choice = _chat(server, _body(tok, ANSWER, return_token_ids=True))
    assert choice["token_ids"][0] == tok.convert_tokens_to_ids(THINK)   # the model opened the block itself
    want = {"reasoning": "Two and two.", "content": "The answer is 4.", "calls": [], "finish_reason": "stop"}
    assert _summary(choice) == want
    assert _streamed(server, _body(tok, ANSWER)) == want
    assert _summary(_chat(server, _body(tok, ANSWER, skip_special_tokens=True))) == want
    hidden = _chat(server, _body(tok, ANSWER, include_reasoning=False))
    assert _summary(hidden) == {**want, "reasoning": None}
    assert _streamed(server, _body(tok, ANSWER, include_reasoning=False)) == {**want, "reasoning": None}


def test_an_answer_without_think_is_content(magistral):
    server, tok = magistral
    want = {"reasoning": None, "content": "Just content.", "calls": [], "finish_reason": "stop"}
    assert _summary(_chat(server, _body(tok, PLAIN))) == want
    assert _streamed(server, _body(tok, PLAIN)) == want


def test_tool_call_after_thinking(magistral):
    """--tool-call-parser mistral reads the call from the content after [/THINK], streamed and not."""
    server, tok = magistral
    want = {"reasoning": "Weather, so a call.", "content": None, "calls": [("get_weather", '{"city": "Paris"}')],
            "finish_reason": "tool_calls"}
    assert _summary(_chat(server, _body(tok, CALL, tools=TOOLS))) == want
    assert _streamed(server, _body(tok, CALL, tools=TOOLS)) == want


def test_constraint_starts_where_vllm_ends_the_reasoning(magistral):
    """Structured output starts where vLLM 0.26 ends the reasoning. The prompt closed a block (Magistral's
    system prompt shows one): from the first token, so the model cannot open [THINK]. The prompt holds no
    [THINK]: the first token is free and decides; the model's [THINK] opens the reasoning and the constraint
    waits for its [/THINK] (another first token would start it after that token). The prompt opened [THINK] (a
    continued assistant message): it waits for the model's [/THINK]."""
    server, tok = magistral
    so = {"structured_outputs": {"regex": REGEX}, "return_token_ids": True}
    think, end = tok.convert_tokens_to_ids([THINK, END])
    system = {"role": "system", "content": "Think as this shows: [THINK]thoughts[/THINK] then answer."}
    body = _body(tok, ANSWER, messages=[system, {"role": "user", "content": "<ans>"}], **so)
    choice = closed = _chat(server, body)
    assert think not in choice["token_ids"] and end not in choice["token_ids"], choice
    assert choice["message"]["reasoning"] is None and re.fullmatch(REGEX, choice["message"]["content"]), choice
    assert _streamed(server, body) == _summary(choice)
    plain = _body(tok, ANSWER, messages=[{"role": "user", "content": "<ans>"}], **so)
    opened = [{"role": "user", "content": "<ans>"}, {"role": "assistant", "content": THINK}]
    for body, at in ((plain, 2), (_body(tok, ANSWER, messages=opened, add_generation_prompt=False,
                                         continue_final_message=True, **so), 1)):
        choice = _chat(server, body)
        assert choice["token_ids"][at] == end and choice["message"]["reasoning"] == "Two and two.", choice
        assert re.fullmatch(REGEX, choice["message"]["content"]), choice
        assert _streamed(server, body) == _summary(choice)
    # without the reasoning asked for (include_reasoning false), from the first token (vLLM's reasoning_ended)
    hidden = _post(server, {**plain, "include_reasoning": False, "return_token_ids": False}).json()
    assert hidden["usage"]["completion_tokens"] == len(closed["token_ids"]), hidden   # no [THINK] block
    assert hidden["choices"][0]["message"]["content"] == closed["message"]["content"], hidden
    # an enforced tool call too: the model thinks first, then calls
    forced = _chat(server, _body(tok, CALL, tools=TOOLS, tool_choice="required", max_tokens=60))
    assert forced["message"]["reasoning"] == "Weather, so a call." and [
        c["function"]["name"] for c in forced["message"]["tool_calls"]] == ["get_weather"], forced


def test_a_first_token_that_is_not_think_is_the_constraints(magistral):
    """The prompt holds no [THINK] and the model would open with plain content ("Just"): the first token is the
    constraint's, so the whole answer matches it (vLLM 0.26 lets "Just" through and starts its grammar after it,
    an answer its constraint refuses). Streamed as not."""
    server, tok = magistral
    body = _body(tok, PLAIN, structured_outputs={"regex": REGEX}, return_token_ids=True)
    choice = _chat(server, body)
    assert tok.convert_tokens_to_ids(THINK) not in choice["token_ids"], choice
    assert choice["message"]["reasoning"] is None and re.fullmatch(REGEX, choice["message"]["content"]), choice
    assert _streamed(server, body) == _summary(choice)


def test_thinking_token_budget_counts_the_block_the_model_opens(magistral):
    """thinking_token_budget (vLLM's) counts the block the model's own [THINK] opens (the prompt has none): 0
    forces [/THINK] next, in chat and completions; 1 lets the one token of reasoning come."""
    server, tok = magistral
    think_end = tok.convert_tokens_to_ids([THINK, END])
    choice = _chat(server, _body(tok, ANSWER, thinking_token_budget=0, return_token_ids=True))
    assert choice["token_ids"][:2] == think_end, choice
    assert (choice["message"]["reasoning"], choice["message"]["content"]) == (None, "The answer is 4.")
    assert _streamed(server, _body(tok, ANSWER, thinking_token_budget=0))["content"] == "The answer is 4."
    assert _chat(server, _body(tok, ANSWER, thinking_token_budget=1))["message"]["reasoning"] == "Two and two."
    body = _body(tok, ANSWER, thinking_token_budget=0, return_token_ids=True)
    del body["messages"]
    r = _post(server, {**body, "prompt": "<ans>"}, "/v1/completions")
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"][:2] == think_end, r.text


def test_completions_constraint_follows_the_prompt(magistral):
    """Completions under the parser, as chat: a prompt that opened [THINK] has its constraint wait for [/THINK];
    one that closed a block holds it from the first token; one with no [THINK] lets the first token decide (the
    model's [THINK] opens reasoning that the constraint waits out)."""
    server, tok = magistral
    think, end = tok.convert_tokens_to_ids([THINK, END])
    reasoning = tok.convert_tokens_to_ids("Two and two.")
    bias = {str(reasoning): 1.0, str(tok.convert_tokens_to_ids("The answer")): 1.0}
    r = _post(server, {"model": MODEL_NAME, "prompt": ["<ans>", "<ans>" + THINK, "<ans>" + THINK + END],
                       "temperature": 0, "max_tokens": 20, "logit_bias": bias, "return_token_ids": True,
                       "structured_outputs": {"regex": REGEX}}, "/v1/completions")
    assert r.status_code == 200, r.text
    plain, opened, closed = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert plain["token_ids"][:3] == [think, reasoning, end], plain
    assert re.fullmatch(REGEX, tok.decode(plain["token_ids"][3:], skip_special_tokens=True)), plain
    assert opened["token_ids"][:2] == [reasoning, end], opened
    assert re.fullmatch(REGEX, tok.decode(opened["token_ids"][2:], skip_special_tokens=True)), opened
    assert think not in closed["token_ids"] and re.fullmatch(REGEX, closed["text"]), closed
