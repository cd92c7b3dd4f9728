"""Every request field takes effect, is a documented no-op, or is a 400 naming it (issue 14, part 3): unknown
fields, neutral values, features not implemented yet, chat template options, tool messages, prompt_logprobs."""
import json

import httpx
import pytest
from server.server_utils import CHAT_TEMPLATE, MODEL_NAME, wait_all_blocks_free

from pagedllm import SamplingParams
from pagedllm.server import protocol

COMPLETIONS, CHAT, TOKENIZE = "/v1/completions", "/v1/chat/completions", "/tokenize"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]
PROMPT = "Once upon a time"


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=server.headers, timeout=60)


def _error(r: httpx.Response, param: str, code: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}, error
    assert code is None or error["code"] == code, error
    return error


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"prompt": PROMPT, "nonexistent_param_xyz": 1}, "nonexistent_param_xyz"),
    (CHAT, {"messages": MESSAGES, "nonexistent_param_xyz": None}, "nonexistent_param_xyz"),
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "colour": "red"}]}, "messages.0.colour"),
    (COMPLETIONS, {"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    (TOKENIZE, {"prompt": PROMPT, "return_everything": True}, "return_everything"),
])
def test_unknown_fields_are_400_naming_them(server, path, body, param):
    error = _error(_post(server, path, {"model": MODEL_NAME, **body}), param)
    assert param in error["message"]
    if "." not in param:
        assert error["message"] == f"Unrecognized request argument supplied: {param}"


NEUTRAL = {"response_format": {"type": "text"}, "logit_bias": {}, "best_of": 1, "use_beam_search": False,
           "length_penalty": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
           "priority": 0, "spaces_between_special_tokens": True, "guided_json": None, "structured_outputs": None,
           "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": None,
           "stream_options": {}, "user": "u1", "metadata": {"k": "v"}, "store": False,
           "service_tier": "auto", "safety_identifier": "s", "prompt_cache_key": "p",
           "prompt_cache_retention": "24h", "return_token_offsets": True, "vllm_xargs": {}, "kv_transfer_params": None,
           "ec_transfer_params": {}}


@pytest.mark.parametrize("path,body", [(COMPLETIONS, {"prompt": PROMPT}), (CHAT, {"messages": MESSAGES})])
@pytest.mark.parametrize("options", [{"include_usage": False}, {"include_usage": True, "continuous_usage_stats": True},
                                     {"include_usage": None}])
def test_stream_options_without_stream_are_400_as_vllms(server, path, body, options):
    """vLLM 0.26 refuses them ("Stream options can only be defined when `stream=True`."); they were taken and
    ignored. An empty object asks for nothing and is taken, as there."""
    for stream in ({}, {"stream": False}):
        error = _error(_post(server, path, {"model": MODEL_NAME, "max_tokens": 2, **body, **stream,
                                            "stream_options": options}), "stream_options", "invalid_value")
        assert "stream=True" in error["message"]


def test_neutral_values_and_no_ops_are_accepted_and_change_nothing(server):
    assert set(protocol._NO_OPS) - {"request_id"} <= set(NEUTRAL)
    base = {"model": MODEL_NAME, "max_tokens": 12, "temperature": 0}
    plain = _post(server, COMPLETIONS, {**base, "prompt": PROMPT}).json()
    got = _post(server, COMPLETIONS, {**base, "prompt": PROMPT, "echo": False, "suffix": None, "prompt_embeds": None,
                                      "request_id": "abc", **NEUTRAL}).json()
    assert got["choices"][0]["text"] == plain["choices"][0]["text"] and got["id"] == "cmpl-abc"
    chat_plain = _post(server, CHAT, {**base, "messages": MESSAGES}).json()
    chat = _post(server, CHAT, {**base, "messages": MESSAGES, **NEUTRAL, "tools": None, "tool_choice": "none",
                                "parallel_tool_calls": True, "functions": None, "documents": None,
                                "echo": False}).json()
    assert chat["choices"][0]["message"]["content"] == chat_plain["choices"][0]["message"]["content"]
    # tools [] is not neutral: OpenAI and vLLM refuse it, whatever tool_choice says (it was taken as no tools)
    for choice in ({}, {"tool_choice": "none"}):
        error = _error(_post(server, CHAT, {**base, "messages": MESSAGES, "tools": [], **choice}), "tools",
                       "empty_array")
        assert error["message"].startswith("`tools` must not be an empty array")
    # "auto" with no tools is vLLM's 400 (it chose none here); an assistant message sent back with OpenAI's null
    # fields is taken
    history = [*MESSAGES, {"role": "assistant", "content": "Yes", "refusal": None, "annotations": [],
                           "audio": None, "function_call": None, "tool_calls": None}, MESSAGES[0]]
    _error(_post(server, CHAT, {**base, "messages": history, "tool_choice": "auto"}), "tool_choice", "invalid_value")
    assert _post(server, CHAT, {**base, "messages": history}).status_code == 200


@pytest.mark.parametrize("path,body", [
    (COMPLETIONS, {"n": None, "stream": None, "echo": None, "return_token_ids": None, "use_beam_search": None,
                   "length_penalty": None, "priority": None, "add_special_tokens": None}),
    (CHAT, {"n": None, "stream": None, "logprobs": None, "return_token_ids": None, "return_prompt_text": None,
            "include_reasoning": None, "add_generation_prompt": None, "spaces_between_special_tokens": None}),
])
def test_null_keeps_the_default(server, path, body):
    """As README says and vLLM takes them (n, stream, logprobs, echo, return_token_ids are nullable there)."""
    base = {"model": MODEL_NAME, "max_tokens": 6, "temperature": 0,
            **({"prompt": PROMPT} if path == COMPLETIONS else {"messages": MESSAGES})}
    plain, got = _post(server, path, base), _post(server, path, {**base, **body})
    assert got.status_code == 200, got.text
    assert got.json()["choices"] == plain.json()["choices"]
    # stream_options.include_usage null: no usage chunk, as false
    with httpx.stream("POST", server.url + path, headers=server.headers, timeout=60,
                      json={**base, "stream": True, "stream_options": {"include_usage": None}}) as r:
        assert r.status_code == 200 and "usage" not in r.read().decode()


def test_chat_top_logprobs_0_without_logprobs_is_accepted(server):
    """vLLM's default top_logprobs is 0: a client that sends it without logprobs asks for nothing."""
    base = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0, "messages": MESSAGES}
    r = _post(server, CHAT, {**base, "top_logprobs": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None
    assert r.json()["choices"] == _post(server, CHAT, base).json()["choices"]


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"suffix": "the end"}, "suffix"),
    (COMPLETIONS, {"suffix": ""}, "suffix"),   # vLLM refuses any suffix but null; "" was taken and ignored
    (COMPLETIONS, {"prompt_embeds": "AAAA"}, "prompt_embeds"),
    (CHAT, {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (CHAT, {"function_call": {"name": "f"}}, "function_call"),
    (COMPLETIONS, {"vllm_xargs": {"ngram_size": 3}}, "vllm_xargs"),       # vLLM's: nothing here would read them
    (CHAT, {"kv_transfer_params": {"do_remote_prefill": True}}, "kv_transfer_params"),
    (COMPLETIONS, {"ec_transfer_params": {"x": 1}}, "ec_transfer_params"),
])
def test_features_not_implemented_yet_are_400_naming_the_field(server, path, body, param):
    prompt = {"prompt": PROMPT} if path == COMPLETIONS else {"messages": MESSAGES}
    error = _error(_post(server, path, {"model": MODEL_NAME, **prompt, **body}), param, "unsupported_parameter")
    assert "not supported yet" in error["message"]
    if param == "prompt_embeds":   # vLLM's embeddings-only request (no prompt): the same 400
        error = _error(_post(server, path, {"model": MODEL_NAME, **body}), param, "unsupported_parameter")


def _tokenize(server, messages, **options) -> list[int]:
    r = _post(server, TOKENIZE, {"messages": messages, **options})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_tool_calls_and_tool_answers_reach_the_template(server, offline_llm):
    history = [{"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "now?"}]},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]}]
    expected = ('user: Weather\nnow?\nassistant:  <call call_1>get_weather{"city": "Paris"}</call>\n'
                "tool: 18C <for call_1>\nassistant:")
    tokenizer = offline_llm.get_tokenizer()
    assert _tokenize(server, history) == tokenizer.encode(expected, add_special_tokens=False)
    body = {"model": MODEL_NAME, "messages": history, "max_tokens": 8, "temperature": 0}
    out = _post(server, CHAT, body).json()
    [ref] = offline_llm.chat(history, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False,
                             chat_template=CHAT_TEMPLATE)
    assert out["choices"][0]["message"]["content"] == ref.outputs[0].text
    assert out["usage"]["prompt_tokens"] == len(ref.prompt_token_ids) == len(_tokenize(server, history))


def test_chat_template_kwargs_continue_final_message_add_generation_prompt(server, offline_llm):
    tokenizer = offline_llm.get_tokenizer()
    conversation = [*MESSAGES, {"role": "assistant", "content": "Once upon"}]
    ids = _tokenize(server, conversation, add_generation_prompt=False, continue_final_message=True,
                    chat_template_kwargs={"note": "short"})
    assert ids == tokenizer.encode("[short]\nuser: Tell me a story\nassistant: Once upon", add_special_tokens=False)
    assert _tokenize(server, MESSAGES, add_generation_prompt=False) == \
        tokenizer.encode("user: Tell me a story\n", add_special_tokens=False)
    assert _tokenize(server, MESSAGES, add_special_tokens=True)[0] == tokenizer.bos_token_id
    options = dict(add_generation_prompt=False, continue_final_message=True, chat_template_kwargs={"note": "short"})
    out = _post(server, CHAT, {"model": MODEL_NAME, "messages": conversation, "max_tokens": 10, "temperature": 0,
                               **options}).json()
    [ref] = offline_llm.chat(conversation, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False,
                             chat_template=CHAT_TEMPLATE, **options)
    assert out["choices"][0]["message"]["content"] == ref.outputs[0].text
    assert out["usage"]["prompt_tokens"] == len(ids) == len(ref.prompt_token_ids)
    both = _post(server, CHAT, {"model": MODEL_NAME, "messages": conversation, "continue_final_message": True})
    _error(both, "continue_final_message")
    _error(_post(server, CHAT, {"model": MODEL_NAME, "messages": MESSAGES,
                                "chat_template_kwargs": {"tokenize": True}}), "chat_template_kwargs")
    _error(_post(server, TOKENIZE, {"prompt": PROMPT, "continue_final_message": True}), "continue_final_message")


def test_priority_is_honoured_with_the_policy_and_refused_without(server, edge):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    for extra in ({}, {"use_beam_search": True, "n": 2}):   # beam search adds its steps later: checked first
        error = _error(_post(server, COMPLETIONS, {**body, **extra, "priority": 1}), "priority", "invalid_value")
        assert "--scheduling-policy priority" in error["message"] or "scheduling_policy" in error["message"]

    def edge_post(path, payload):
        return httpx.post(edge.url + path, json=payload, headers=edge.headers, verify=edge.verify, timeout=60)
    texts = [edge_post(COMPLETIONS, {**body, "priority": p}).json()["choices"][0]["text"] for p in (0, -3, 7)]
    assert len(set(texts)) == 1
    chat = edge_post(CHAT, {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "priority": 2})
    assert chat.status_code == 200, chat.text


# A request's own template that shows the documents (a RAG template's `documents`) before the turns
DOC_TEMPLATE = ("{% for d in documents or [] %}<doc {{ d.title }}>{{ d.text }}</doc>\n{% endfor %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")


def test_request_chat_template_and_documents_reach_the_template(server, edge, offline_llm):
    docs = [{"title": "a", "text": "Cats sleep."}, {"title": "b", "text": "Dogs bark."}]
    expected = "<doc a>Cats sleep.</doc>\n<doc b>Dogs bark.</doc>\nuser: Tell me a story\nassistant:"
    ids = _tokenize(server, MESSAGES, chat_template=DOC_TEMPLATE, documents=docs)
    assert ids == offline_llm.get_tokenizer().encode(expected, add_special_tokens=False)
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 10, "temperature": 0,
            "chat_template": DOC_TEMPLATE, "documents": docs}
    out = _post(server, CHAT, body).json()
    [ref] = offline_llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=10, temperature=0),
                                 use_tqdm=False)
    assert out["choices"][0]["message"]["content"] == ref.outputs[0].text
    assert out["usage"]["prompt_tokens"] == len(ids)
    # the server's own template has no documents: they change nothing there
    assert _tokenize(server, MESSAGES, documents=docs) == _tokenize(server, MESSAGES)
    # a template from a request needs the server's consent; one that does not parse names the field
    _error(httpx.post(edge.url + CHAT, json=body, headers=edge.headers, verify=edge.verify, timeout=60),
           "chat_template")
    _error(_post(server, CHAT, {**body, "chat_template": "{% for %}"}), "chat_template")
    _error(_post(server, TOKENIZE, {"prompt": PROMPT, "documents": docs}), "documents")
    # a template that renders nothing: a 400 naming messages (the engine's named `prompt`, not a chat field)
    for stream in (False, True):
        _error(_post(server, CHAT, {**body, "chat_template": "{# nothing #}", "stream": stream}), "messages")


def test_chat_echo_puts_the_last_assistant_message_first(server):
    conversation = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "Once"},
                                                                 {"type": "text", "text": "upon"}]}]
    base = {"model": MODEL_NAME, "messages": conversation, "max_tokens": 8, "temperature": 0, "n": 2,
            "add_generation_prompt": False, "continue_final_message": True}
    plain = _post(server, CHAT, base).json()
    echoed = _post(server, CHAT, {**base, "echo": True}).json()
    for p, e in zip(plain["choices"], echoed["choices"], strict=True):
        assert e["message"]["content"] == "Once\nupon" + p["message"]["content"]
    assert echoed["usage"] == plain["usage"]
    with httpx.stream("POST", server.url + CHAT, json={**base, "echo": True, "stream": True},
                      headers=server.headers, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    assert texts == {c["index"]: c["message"]["content"] for c in echoed["choices"]}
    # the last message is the user's: nothing to echo (vLLM's rule)
    user_last = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    assert _post(server, CHAT, {**user_last, "echo": True}).json()["choices"] == \
        _post(server, CHAT, user_last).json()["choices"]


# A template that loops over a message's parts: "auto" takes the messages to it in the openai content format
PARTS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{% if m['content'] is string %}{{ m['content'] }}"
                  "{% else %}{% for p in m['content'] %} {{ p['text'] }}{% endfor %}{% endif %}\n{% endfor %}")


@pytest.mark.parametrize("template, echo", [(CHAT_TEMPLATE, "a\nb"), (PARTS_TEMPLATE, "a\n\nb")])
def test_chat_echo_joins_the_parts_as_the_content_format_holds_them(server, template, echo):
    """vLLM's echo joins the last message's parts as its conversation holds them: the string format left the
    empty part out (as the template saw the text), the openai format keeps it (it was left out there too)."""
    conversation = [*MESSAGES, {"role": "assistant", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": ""}, {"type": "text", "text": "b"}]}]
    base = {"model": MODEL_NAME, "messages": conversation, "max_tokens": 2, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True, "chat_template": template}

    def answer(**extra) -> str:
        r = _post(server, CHAT, {**base, **extra})
        assert r.status_code == 200, r.text
        if not extra.get("stream"):
            return r.json()["choices"][0]["message"]["content"]
        return "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in r.text.splitlines() if line.startswith("data: {") and '"choices":[{' in line)
    plain = answer()
    assert answer(echo=True) == answer(echo=True, stream=True) == echo + plain



def test_a_continued_message_is_answered_in_its_role_and_echoed(server):
    """Without a generation prompt the model goes on in the last message's turn: the answer's role is that
    message's and echo puts its text first, whoever's it is (vLLM's get_chat_request_role), here the user's."""
    base = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me a"}], "max_tokens": 6,
            "temperature": 0, "add_generation_prompt": False, "continue_final_message": True}
    plain = _post(server, CHAT, base).json()["choices"][0]["message"]
    echoed = _post(server, CHAT, {**base, "echo": True}).json()["choices"][0]["message"]
    assert plain["role"] == echoed["role"] == "user"
    assert echoed["content"] == "Tell me a" + plain["content"]
    with httpx.stream("POST", server.url + CHAT, json={**base, "echo": True, "stream": True},
                      headers=server.headers, timeout=60) as r:
        deltas = [c["delta"] for line in r.iter_lines() if line.startswith("data: {")
                  for c in json.loads(line[6:])["choices"]]
    assert deltas[0]["role"] == "user" and "".join(d.get("content") or "" for d in deltas) == echoed["content"]


def test_return_prompt_text_is_the_templates_text(server, offline_llm):
    """return_prompt_text (vLLM's): the response's prompt_text is what the chat template wrote (streamed: with
    each choice's role chunk), and its tokens are the prompt's."""
    base = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "n": 2,
            "return_prompt_text": True, "return_token_ids": True}
    full = _post(server, CHAT, base).json()
    text = "".join(f"{m['role']}: {m['content']}\n" for m in MESSAGES) + "assistant:"   # server_utils' template
    assert full["prompt_text"] == text
    assert offline_llm.get_tokenizer().encode(text, add_special_tokens=False) == full["prompt_token_ids"]
    with httpx.stream("POST", server.url + CHAT, json={**base, "stream": True}, headers=server.headers,
                      timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [c["prompt_text"] for c in chunks if "prompt_text" in c] == [text, text]
    assert _post(server, CHAT, {**base, "return_prompt_text": False}).json()["prompt_text"] is None   # vLLM's null


# Writes each part (a text part's text, a tool reference's name) as JSON: a null one reads null
PARTS_TEMPLATE = ("{% for m in messages %}{{ m.role }}:{% for p in m.content %}[{{ p.type }}:"
                  "{{ (p.name if p.type == 'tool_reference' else p.text) | tojson }}]{% endfor %};{% endfor %}")


@pytest.mark.parametrize("part", [{"type": "thinking", "thinking": None}, {"type": "input_text", "text": None},
                                  {"type": "output_text", "text": None}, {"type": "tool_reference", "name": None}],
                         ids=lambda part: part["type"])
def test_a_null_part_beside_others_is_kept_as_vllms_parsers_keep_it(server, offline_llm, part):
    """vLLM 0.26's chat_utils skips only a text or refusal part whose text is null: a thinking, input_text,
    output_text or tool_reference part whose value is null reaches the openai content format's template with a
    null text (name), and the string format leaves it out of the join; online and offline alike. It was a 400."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me"}, part,
                                             {"type": "text", "text": "a story"}]}]
    kind = "tool_reference" if part["type"] == "tool_reference" else "text"
    for template, want in ((CHAT_TEMPLATE, "user: Tell me\na story\nassistant:"),
                           (PARTS_TEMPLATE, f'user:[text:"Tell me"][{kind}:null][text:"a story"];')):
        r = _post(server, CHAT, {"model": MODEL_NAME, "messages": messages, "max_tokens": 1,
                                 "return_prompt_text": True, "chat_template": template})
        assert r.status_code == 200, r.text
        [ref] = offline_llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False, chat_template=template)
        assert r.json()["prompt_text"] == ref.prompt == want


def _positions(prompt_logprobs: list) -> list:
    """vLLM's JSON prompt_logprobs as (token id, logprob, rank, decoded token) per position."""
    return [None if p is None else sorted((int(t), v["logprob"], v["rank"], v["decoded_token"]) for t, v in p.items())
            for p in prompt_logprobs]


def _offline_positions(ref) -> list:
    return [None if p is None else sorted((t, lp.logprob, lp.rank, lp.decoded_token) for t, lp in p.items())
            for p in ref.prompt_logprobs]


def _assert_close(got: list, want: list):
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert [(t, r, d) for t, _, r, d in g] == [(t, r, d) for t, _, r, d in w]
        assert [lp for _, lp, _, _ in g] == pytest.approx([lp for _, lp, _, _ in w], abs=1e-4)


def test_prompt_logprobs_on_both_endpoints_match_offline(server, offline_llm):
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2)
    out = _post(server, COMPLETIONS, {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                      "prompt_logprobs": 2}).json()
    [ref] = offline_llm.generate(PROMPT, params, use_tqdm=False)
    assert len(ref.prompt_logprobs) == len(ref.prompt_token_ids) > 2
    _assert_close(_positions(out["choices"][0]["prompt_logprobs"]), _offline_positions(ref))
    assert out["choices"][0]["text"] == ref.outputs[0].text

    chat = _post(server, CHAT, {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "temperature": 0,
                                "prompt_logprobs": 2}).json()
    [ref] = offline_llm.chat(MESSAGES, params, use_tqdm=False, chat_template=CHAT_TEMPLATE)
    _assert_close(_positions(chat["prompt_logprobs"]), _offline_positions(ref))
    assert _post(server, CHAT, {"model": MODEL_NAME, "messages": MESSAGES,
                                "max_tokens": 1}).json()["prompt_logprobs"] is None
    _error(_post(server, COMPLETIONS, {"model": MODEL_NAME, "prompt": PROMPT, "prompt_logprobs": 1, "stream": True}),
           "prompt_logprobs")


def test_chat_echo_asks_for_the_prompts_logprobs_as_vllms(server, offline_llm):
    """vLLM 0.26's ChatCompletionRequest.to_sampling_params: echo without prompt_logprobs asks for them, with
    top_logprobs alternatives (its default 0: each prompt token's own; an explicit null: none), whatever is echoed;
    the answer carries them (serving_chat's full generator), a stream never (its chunks have no such field).
    They were null here."""
    base = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "echo": True}
    ref = {k: offline_llm.chat(MESSAGES, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=k),
                               use_tqdm=False, chat_template=CHAT_TEMPLATE)[0] for k in (0, 2)}
    own = _post(server, CHAT, base).json()
    assert all(p is None or len(p) == 1 for p in own["prompt_logprobs"])
    _assert_close(_positions(own["prompt_logprobs"]), _offline_positions(ref[0]))
    top = _post(server, CHAT, {**base, "logprobs": True, "top_logprobs": 2}).json()
    _assert_close(_positions(top["prompt_logprobs"]), _offline_positions(ref[2]))
    asked = _post(server, CHAT, {**base, "prompt_logprobs": 2}).json()   # prompt_logprobs, when given, wins
    _assert_close(_positions(asked["prompt_logprobs"]), _offline_positions(ref[2]))
    assert _post(server, CHAT, {**base, "top_logprobs": None}).json()["prompt_logprobs"] is None
    assert _post(server, CHAT, {**base, "echo": False}).json()["prompt_logprobs"] is None
    with httpx.stream("POST", server.url + CHAT, json={**base, "logprobs": True, "top_logprobs": 2, "stream": True},
                      headers=server.headers, timeout=60) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and not any("prompt_logprobs" in c for c in chunks)
    text = "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"])
    assert text == top["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path,body,param,says", [
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "<= max_logprobs (20) (-1 is the vocabulary"),
    (CHAT, {"prompt_logprobs": -1}, "prompt_logprobs", "<= max_logprobs (20) (-1 is the vocabulary"),
    (CHAT, {"logprobs": True, "top_logprobs": -2}, "top_logprobs", "-1 (the vocabulary) or an integer >= 0"),
    (COMPLETIONS, {"prompt_logprobs": -1}, "prompt_logprobs", "<= max_logprobs (20) (-1 is the vocabulary"),
    (COMPLETIONS, {"logprobs": -1}, "logprobs", "greater than or equal to 0"),   # vLLM's: -1 is not completions'
])
def test_minus_one_logprobs_are_the_vocabulary_within_max_logprobs(server, path, body, param, says):
    """vLLM's top_logprobs / prompt_logprobs -1 (the vocabulary) is refused by a server whose --max-logprobs is
    below it, naming the field and the bound; completions' logprobs stays >= 0, as vLLM's."""
    prompt = {"prompt": PROMPT} if path == COMPLETIONS else {"messages": MESSAGES}
    assert says in _error(_post(server, path, {"model": MODEL_NAME, "max_tokens": 2, **prompt, **body}),
                          param)["message"]


def test_chat_top_logprobs_minus_one_lists_every_token():
    """top_logprobs -1 (vLLM's: the vocabulary): each position's alternatives are all it carries, as the engine
    lists them (the chosen token first, then by rank: vLLM's order). The limit was top_logprobs itself: -1 listed
    none."""
    from pagedllm.outputs import CompletionOutput, Logprob
    from pagedllm.server.chat import _logprobs
    req = protocol.ChatCompletionRequest(messages=MESSAGES, logprobs=True, top_logprobs=-1)
    position = {7: Logprob(-0.5, 2, "b"), 5: Logprob(-0.1, 1, "a"), 9: Logprob(-3.0, 3, "c")}
    [entry] = _logprobs(req, CompletionOutput(0, "b", [7], -0.5, [position], None))["content"]
    assert [t["token"] for t in entry["top_logprobs"]] == ["b", "a", "c"]


def test_add_special_tokens_on_completions(server, offline_llm):
    tokenizer = offline_llm.get_tokenizer()
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    without = _post(server, COMPLETIONS, {**body, "add_special_tokens": False}).json()
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert ids != tokenizer.encode(PROMPT)   # the demo tokenizer adds BOS: the field must matter
    [ref] = offline_llm.generate([ids], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
    assert without["usage"]["prompt_tokens"] == len(ids)
    assert without["choices"][0]["text"] == ref.outputs[0].text


def test_logprob_token_ids_on_both_endpoints_match_offline(server, offline_llm):
    """vLLM's logprob_token_ids: at each generated position the chosen token's logprob, then the named ids' in
    their order (each once), instead of the top ones; streamed as in one piece. Chat left the chosen one out."""
    named = [5, 9, 5, 300]
    [ref] = offline_llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0, logprob_token_ids=named),
                                 use_tqdm=False)
    comp = ref.outputs[0]
    base = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0, "logprob_token_ids": named,
            "return_tokens_as_token_ids": True}
    out = _post(server, COMPLETIONS, {**base, "prompt": PROMPT, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert out["tokens"] == [f"token_id:{t}" for t in comp.token_ids]
    for top, tid, pos in zip(out["top_logprobs"], comp.token_ids, comp.logprobs):
        assert list(top) == [f"token_id:{t}" for t in dict.fromkeys([tid, 5, 9, 300])]   # chosen first
        assert all(abs(top[f"token_id:{t}"] - pos[t].logprob) < 1e-4 for t in (tid, 5, 9, 300))

    [ref] = offline_llm.chat(MESSAGES, SamplingParams(max_tokens=4, temperature=0, logprob_token_ids=named),
                             use_tqdm=False, chat_template=CHAT_TEMPLATE)
    comp = ref.outputs[0]
    body = {**base, "messages": MESSAGES, "logprobs": True}
    content = _post(server, CHAT, body).json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in comp.token_ids]
    for c, tid, pos in zip(content, comp.token_ids, comp.logprobs):   # as completions' and vLLM 0.26's (return_all)
        ids = list(dict.fromkeys([tid, 5, 9, 300]))
        assert [t["token"] for t in c["top_logprobs"]] == [f"token_id:{t}" for t in ids]   # chosen first
        assert all(abs(t["logprob"] - pos[i].logprob) < 1e-4 for t, i in zip(c["top_logprobs"], ids))
    # a top_logprobs beside them is taken and the named ids take precedence, as vLLM 0.26 documents
    assert _post(server, CHAT, {**body, "top_logprobs": 1}).json()["choices"][0]["logprobs"]["content"] == content
    with httpx.stream("POST", server.url + CHAT, json={**body, "stream": True, "top_logprobs": 3},
                      headers=server.headers, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [c for ch in chunks for choice in ch["choices"]
                for c in (choice.get("logprobs") or {}).get("content", [])]
    assert streamed == content


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"logprob_token_ids": [5]}, "logprob_token_ids"),                                  # logprobs false
    (CHAT, {"logprob_token_ids": [5], "logprobs": True, "use_beam_search": True, "n": 2}, "logprob_token_ids"),
    (CHAT, {"logprob_token_ids": [5, 10**6], "logprobs": True}, "logprob_token_ids"),        # beyond the vocab
    (COMPLETIONS, {"logprob_token_ids": [5]}, "logprob_token_ids"),                           # logprobs unset
    (COMPLETIONS, {"logprob_token_ids": list(range(129)), "logprobs": 0}, "logprob_token_ids"),
    (COMPLETIONS, {"logprob_token_ids": [-1], "logprobs": 0}, "logprob_token_ids"),
])
def test_logprob_token_ids_errors_name_the_field(server, path, body, param):
    prompt = {"prompt": PROMPT} if path == COMPLETIONS else {"messages": MESSAGES}
    _error(_post(server, path, {"model": MODEL_NAME, "max_tokens": 2, **prompt, **body}), param)


def test_spaces_between_special_tokens_false_is_what_the_text_does(server, offline_llm):
    """Special tokens in a row, kept in the text: no space between them with either value (vLLM's default true
    gives the same text: transformers' decode puts none), so false is honoured."""
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "allowed_token_ids": [0, 1],
            "ignore_eos": True, "skip_special_tokens": False, "return_token_ids": True}
    texts = []
    for value in (False, True):
        choice = _post(server, COMPLETIONS, {**body, "spaces_between_special_tokens": value}).json()["choices"][0]
        specials = offline_llm.get_tokenizer().convert_ids_to_tokens(choice["token_ids"])
        assert set(choice["token_ids"]) <= {0, 1} and choice["text"] == "".join(specials)   # "<unk><s>..."
        texts.append(choice["text"])
    assert texts[0] == texts[1] and " " not in texts[0]


def test_sagemaker_ping_and_invocations(server):
    """vLLM's SageMaker routes: /ping is /health (open, GET or POST); /invocations (keyed) is a chat completion
    for a body with messages, a completion for one with a prompt, with the same answers and errors."""
    assert httpx.get(server.url + "/ping").status_code == httpx.post(server.url + "/ping").status_code == 200
    for path, body in ((CHAT, {"messages": MESSAGES}), (COMPLETIONS, {"prompt": PROMPT})):
        body = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0, **body}
        got, want = _post(server, "/invocations", body).json(), _post(server, path, body).json()
        assert got["choices"] == want["choices"] and got["object"] == want["object"], (got, want)
        _error(_post(server, "/invocations", {**body, "colour": 1}), "colour")
        _error(_post(server, "/invocations", {**body, "max_tokens": "many"}), "max_tokens")
    _error(_post(server, "/invocations", {"model": MODEL_NAME}), None)
    assert httpx.post(server.url + "/invocations", json={"prompt": PROMPT}, timeout=60).status_code == 401


def test_chat_batch_answers_each_conversation_as_the_chat_route(server):
    """vLLM 0.26's /v1/chat/completions/batch: choice i is conversation i's chat answer, usage the sum; what chat
    puts beside the choices goes into each choice; stream, tools, n > 1 and an empty conversation are 400s, and a
    conversation's own error names it, its siblings aborted."""
    conversations = [MESSAGES, [{"role": "user", "content": "Once upon a time"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    base = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    r = _post(server, CHAT + "/batch", {**base, "messages": conversations})
    assert r.status_code == 200, r.text
    batch = r.json()
    singles = [_post(server, CHAT, {**base, "messages": c}).json() for c in conversations]
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    for choice, single in zip(batch["choices"], singles):
        assert choice["message"] == single["choices"][0]["message"]
        assert choice["token_ids"] == single["choices"][0]["token_ids"]
        assert choice["prompt_token_ids"] == single["prompt_token_ids"]
    assert batch["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    assert batch["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    for extra, param in (({"stream": True}, "stream"), ({"n": 2}, "n"), ({"messages": [MESSAGES, []]}, "messages.1"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"messages": [MESSAGES, [{"role": "user", "content": "word " * 600}]]}, "messages.1")):
        _error(_post(server, CHAT + "/batch", {**base, "messages": conversations, **extra}), param)
    wait_all_blocks_free(server)


def test_generative_scoring_is_each_items_label_probability(server, offline_llm):
    """vLLM 0.26's /generative_scoring: per item, the first label's probability after query + item, over the
    labels alone (apply_softmax) or the whole vocabulary, as offline logprob_token_ids give it; item_first and token
    id inputs; errors name the field."""
    import math
    tok = offline_llm.get_tokenizer()
    labels = [300, 45, 301]
    query, items = "Once upon a time", [" the dog", " a cat said"]
    body = {"model": MODEL_NAME, "query": query, "items": items, "label_token_ids": labels}
    got = _post(server, "/generative_scoring", body).json()
    prompts = [tok.encode(query) + tok.encode(item, add_special_tokens=False) for item in items]
    refs = offline_llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0, max_tokens=1, logprob_token_ids=labels), use_tqdm=False)
    for d, ref in zip(got["data"], refs):
        lps = [ref.outputs[0].logprobs[0][t].logprob for t in labels]
        assert d["score"] == pytest.approx(math.exp(lps[0]) / sum(math.exp(lp) for lp in lps), rel=1e-4)
    assert [d["index"] for d in got["data"]] == [0, 1] and got["usage"]["completion_tokens"] == 2
    raw = _post(server, "/generative_scoring", {**body, "apply_softmax": False}).json()
    assert raw["data"][0]["score"] == pytest.approx(math.exp(refs[0].outputs[0].logprobs[0][300].logprob), rel=1e-4)
    flipped = _post(server, "/generative_scoring", {**body, "query": tok.encode(query), "item_first": True,
                                                    "items": [tok.encode(i, add_special_tokens=False) for i in items]})
    assert flipped.status_code == 200 and flipped.json()["usage"]["prompt_tokens"] == got["usage"]["prompt_tokens"]
    for extra, param in (({"label_token_ids": []}, "label_token_ids"), ({"items": []}, "items"),
                         ({"label_token_ids": [10**6]}, "label_token_ids"), ({"items": [" x" * 600]}, "items.0"),
                         ({"query": [10**6]}, "query")):
        _error(_post(server, "/generative_scoring", {**body, **extra}), param)


def test_x_request_id_header_names_the_response(server):
    """vLLM's: an X-Request-Id header (a gateway's trace id) is the base of the response's id, before the body's
    request_id; streamed chunks carry it too."""
    base = {"model": MODEL_NAME, "max_tokens": 2, "request_id": "abc"}
    for path, body, prefix in ((COMPLETIONS, {**base, "prompt": PROMPT}, "cmpl-"),
                               (CHAT, {**base, "messages": MESSAGES}, "chatcmpl-")):
        headers = {**server.headers, "X-Request-Id": "trace-1"}
        got = httpx.post(server.url + path, json=body, headers=headers, timeout=60)
        assert got.status_code == 200 and got.json()["id"] == prefix + "trace-1", got.text
        streamed = httpx.post(server.url + path, json={**body, "stream": True}, headers=headers, timeout=60)
        ids = {json.loads(line[6:])["id"] for line in streamed.text.splitlines()
               if line.startswith("data: {")}
        assert ids == {prefix + "trace-1"}, streamed.text
        assert _post(server, path, body).json()["id"] == prefix + "abc"
