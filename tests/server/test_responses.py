"""OpenAI's Responses API (/v1/responses, as vLLM 0.26 serves it) through the official openai client: the output
is the chat completion of the same conversation, the SDK's stream accumulation (which checks every event's item
ids and indexes) gives the same response, a forced function call and its output round-trip, text.format holds;
stored responses (the main server keeps the last 3) continue by previous_response_id as the whole conversation
would, are read back and deleted; built-in features, and state on a server that keeps none, are errors naming the
field."""
import json
import time

import httpx
import jsonschema
import openai
import pytest
from server.server_utils import MAX_MODEL_LEN, MODEL_NAME, wait_all_blocks_free

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}
STORY = "Tell me a story"   # the tiny model's greedy answer: text to max_output_tokens
INSTRUCTIONS = "You tell stories."


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


def _chat(server, messages, **kw) -> dict:
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 24, "temperature": 0, **kw}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_output_is_the_chat_completion_and_streams_to_the_same(client, server):
    chat = _chat(server, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": STORY}])
    text = chat["choices"][0]["message"]["content"]
    assert text and chat["choices"][0]["finish_reason"] == "length"
    kw = dict(model=MODEL_NAME, instructions=INSTRUCTIONS, input=STORY, max_output_tokens=24, temperature=0)
    response = client.responses.create(**kw)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == MODEL_NAME
    assert response.output_text == text and [o.type for o in response.output] == ["message"]
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert (response.usage.input_tokens, response.usage.output_tokens) == \
        (chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"])
    with client.responses.stream(**kw) as stream:   # vLLM's: a cut-short stream ends in response.completed too
        events = list(stream)
        final = stream.get_final_response()   # the SDK helper takes it from response.completed only
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert events[-1].type == "response.completed" and [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events].count("response.completed") == 1 and "response.incomplete" not in \
        [e.type for e in events]
    assert "".join(deltas) == final.output_text == text and final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens" and final.id == events[-1].response.id
    assert final.usage.output_tokens == response.usage.output_tokens
    # a list of message items, with a developer message: the same conversation
    items = [{"role": "developer", "content": INSTRUCTIONS},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": STORY}]}]
    same = client.responses.create(model=MODEL_NAME, input=items, max_output_tokens=24, temperature=0)
    assert same.output_text == text


def test_forced_function_call_and_its_output(client, server):
    kw = dict(model=MODEL_NAME, input="What is the weather in Paris?", max_output_tokens=80, temperature=0,
              tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    response = client.responses.create(**kw)
    [call] = [o for o in response.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.id.startswith("fc_") and response.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    with client.responses.stream(**kw) as stream:
        argument_deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    [streamed] = [o for o in final.output if o.type == "function_call"]
    assert streamed.arguments == "".join(argument_deltas) == call.arguments and streamed.name == call.name

    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    answer = client.responses.create(model=MODEL_NAME, input=history, max_output_tokens=4, temperature=0,
                                     tools=[WEATHER], tool_choice="none")
    chat_history = [history[0], {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    chat = _chat(server, chat_history, max_tokens=4, tool_choice="none", tools=[
        {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}])
    assert answer.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert answer.output_text == (chat["choices"][0]["message"]["content"] or "")


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"],
              "additionalProperties": False}
    response = client.responses.create(model=MODEL_NAME, input=STORY, max_output_tokens=60, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "hero", "schema": schema,
                                                        "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize("extra,param", [
    ({"conversation": "conv_1"}, "conversation"),
    ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input.0.content.0"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"colour": "red"}, "colour"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c1"}]}, "input.0"),
    # a schema's fields with a format that takes none (an audit found them accepted and ignored)
    ({"text": {"format": {"type": "json_object", "schema": {"type": "object"}}}}, "text.format.schema"),
    ({"text": {"format": {"type": "text", "name": "x"}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_object", "strict": True}}}, "text.format.strict"),
    # a schema the grammar backend refuses: named as the chat field it became (response_format) before
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objec"}}}}, "text.format.schema"),
    # past the context: named as the client sent it, not as the chat field it became (max_tokens)
    ({"max_output_tokens": 10**6}, "max_output_tokens"),
    # the same for the input (chat's messages) and a tool's schema (chat's tools.<i>.function.parameters)
    ({"input": "Once upon a time " * 200}, "input"),
    ({"tools": [{**WEATHER, "parameters": {"type": "objec"}}], "tool_choice": "required"}, "tools.0.parameters"),
    # OpenAI's refusals (accepted before): arguments that are not an object, two tools of one name
    ({"tools": [{**WEATHER, "parameters": {"type": "string"}}]}, "tools.0.parameters"),
    ({"tools": [WEATHER, {**WEATHER, "description": "again"}]}, "tools.1.name"),
    # another type's field on an item or a part (accepted and dropped before)
    ({"input": [{"role": "user", "content": "hi", "call_id": "c1"}]}, "input.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi", "image_url": "u"}]}]},
     "input.0.content.0"),
])
def test_unsupported_fields_are_400s_naming_them(server, extra, param):
    body = {"model": MODEL_NAME, "input": STORY, "max_output_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert not any(chat_name in r.text for chat_name in ("response_format", "`messages`", ".function.")), r.text


def test_output_text_logprobs(client, server):
    """include message.output_text.logprobs with top_logprobs: the chat answer's logprobs on the output text;
    streamed, the deltas' join to the same (without bytes, as OpenAI's delta events); the refusals."""
    want = _chat(server, [{"role": "user", "content": STORY}], logprobs=True, top_logprobs=2)
    want = want["choices"][0]["logprobs"]["content"]
    assert len(want) == 24 and all(len(e["top_logprobs"]) == 2 for e in want)
    body = {"model": MODEL_NAME, "input": STORY, "max_output_tokens": 24, "temperature": 0,
            "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["logprobs"] == want, r.text
    with client.responses.stream(**{k: v for k, v in body.items()}) as stream:
        events = list(stream)
    streamed = [(lp.token, lp.logprob, [(t.token, t.logprob) for t in lp.top_logprobs])
                for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert streamed == [(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e["top_logprobs"]])
                        for e in want]
    final = events[-1].response.output[0].content[0]
    assert [lp.token for lp in final.logprobs] == [e["token"] for e in want]
    for extra, param in (({"tools": [WEATHER]}, "include"), ({"top_logprobs": 21}, "top_logprobs"),
                         ({"include": None}, "top_logprobs")):
        r = httpx.post(server.url + "/v1/responses", json={**body, **extra}, headers=server.headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_stored_responses_continue_are_read_and_deleted(client):
    """previous_response_id continues a stored response's conversation (its instructions do not carry over): the
    same answer and prompt as the whole conversation sent as input; a stored response reads back as it was sent,
    streamed ones too; deleted, or pushed out by 3 newer ones, it is a 404 naming the id."""
    kw = dict(model=MODEL_NAME, max_output_tokens=8, temperature=0)
    first = client.responses.create(instructions=INSTRUCTIONS, input=STORY, store=True, **kw)
    assert first.store is True and client.responses.retrieve(first.id).model_dump() == first.model_dump()
    follow = client.responses.create(input="And then?", previous_response_id=first.id, store=True, **kw)
    whole = client.responses.create(input=[{"role": "user", "content": STORY},
                                           {"role": "assistant", "content": first.output_text},
                                           {"role": "user", "content": "And then?"}], store=False, **kw)
    assert follow.previous_response_id == first.id and follow.output_text == whole.output_text
    assert follow.usage.input_tokens == whole.usage.input_tokens
    with client.responses.stream(input="More.", previous_response_id=follow.id, store=True, **kw) as stream:
        streamed = stream.get_final_response()    # incomplete: cut at max_output_tokens
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    unstored = client.responses.create(input="More.", previous_response_id=follow.id, store=False, **kw)
    assert unstored.output_text == streamed.output_text and unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    client.responses.delete(first.id)
    for call in (lambda: client.responses.retrieve(first.id),
                 lambda: client.responses.create(input="x", previous_response_id=first.id, **kw)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert first.id in e.value.message
    for _ in range(2):   # follow, streamed, then two more: follow is the oldest of four, and the store keeps 3
        client.responses.create(input="x", store=True, **kw)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(follow.id)
    assert client.responses.retrieve(streamed.id).id == streamed.id


def test_function_call_output_continues_a_stored_response(client):
    """A forced call stored, then only its output sent with previous_response_id: the answer the whole
    conversation gets (the call is the assistant's tool_calls in the stored conversation)."""
    question = "What is the weather in Paris?"
    kw = dict(model=MODEL_NAME, temperature=0, tools=[WEATHER])
    called = client.responses.create(input=question, max_output_tokens=80, tool_choice={
        "type": "function", "name": "get_weather"}, parallel_tool_calls=False, store=True, **kw)
    [call] = [o for o in called.output if o.type == "function_call"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    answer = client.responses.create(input=[result], previous_response_id=called.id, max_output_tokens=6,
                                     tool_choice="none", **kw)
    whole = client.responses.create(input=[
        {"role": "user", "content": question},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        result], max_output_tokens=6, tool_choice="none", **kw)
    assert answer.usage.input_tokens == whole.usage.input_tokens and answer.output_text == whole.output_text


def test_usage_details_count_cached_prompt_tokens(client):
    """OpenAI's usage shape (the SDK reads the details as objects): input_tokens_details.cached_tokens counts
    the prompt tokens a repeated prompt found in the prefix cache; no reasoning without a reasoning parser."""
    kw = dict(model=MODEL_NAME, input=" ".join(["A brave little fox ran to the old mill."] * 6),
              max_output_tokens=3, temperature=0)
    first, again = client.responses.create(**kw), client.responses.create(**kw)
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert 0 < again.usage.input_tokens_details.cached_tokens < again.usage.input_tokens
    assert again.usage.output_tokens_details.reasoning_tokens == 0
    with client.responses.stream(**kw) as stream:
        streamed = list(stream)[-1].response.usage
    assert streamed.input_tokens_details.cached_tokens == again.usage.input_tokens_details.cached_tokens


def test_developer_input_items_carry_over_but_instructions_do_not(client):
    """Only a response's instructions stay behind under previous_response_id: a developer (or system) message
    among its input items is the conversation's, and the next turn still sees it (it was dropped with them)."""
    kw = dict(model=MODEL_NAME, max_output_tokens=4, temperature=0)
    first = client.responses.create(instructions="Old instructions.", input=[
        {"role": "developer", "content": INSTRUCTIONS}, {"role": "user", "content": STORY}], store=True, **kw)
    follow = client.responses.create(input="And then?", previous_response_id=first.id, **kw)
    whole = client.responses.create(input=[
        {"role": "developer", "content": INSTRUCTIONS}, {"role": "user", "content": STORY},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And then?"}], **kw)
    assert follow.usage.input_tokens == whole.usage.input_tokens and follow.output_text == whole.output_text


def test_background_responses_run_detached_and_cancel(client, server):
    """background: the response comes back queued, runs on, and reads back ended as the same request in the
    foreground would; a long one cancelled ends cancelled, its engine request aborted; the refusals."""
    kw = dict(model=MODEL_NAME, input=STORY, max_output_tokens=8, temperature=0)
    queued = client.responses.create(background=True, store=True, **kw)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    deadline = time.monotonic() + 60
    while (done := client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    foreground = client.responses.create(**kw)
    assert done.status == foreground.status == "incomplete" and done.output_text == foreground.output_text
    long = client.responses.create(background=True, store=True, **{**kw, "max_output_tokens": 400},
                                   extra_body={"ignore_eos": True})
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(long.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as e:   # no answer to continue from
        client.responses.create(**kw, previous_response_id=long.id)
    assert e.value.body["param"] == "previous_response_id"
    assert wait_all_blocks_free(server)["pagedllm:kv_cache_usage_perc"] == 0.0
    for body, param in (({"background": True, "store": True}, "response_id"), ({"background": True, "store": False},
                                                                               "background"),
                        ({"background": True, "store": True, "stream": True}, "stream")):
        if param == "response_id":
            r = httpx.post(f"{server.url}/v1/responses/{queued.id}/cancel", headers=server.headers, timeout=30)
        else:
            r = httpx.post(server.url + "/v1/responses", json={"model": MODEL_NAME, "input": STORY, **body},
                           headers=server.headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_stored_request_id_is_not_reused(client, server):
    """request_id names the response: a second stored one of the same name is a 400 naming request_id (it
    replaced the first, a background one then ran on past cancel and DELETE, and a deleted one came back)."""
    kw = dict(model=MODEL_NAME, input=STORY, max_output_tokens=400, temperature=0, background=True, store=True)
    first = client.responses.create(**kw, extra_body={"ignore_eos": True, "request_id": "twice"})
    assert first.id == "twice"
    for extra in ({"background": True}, {"background": False}):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{**kw, **extra}, extra_body={"ignore_eos": True, "request_id": "twice"})
        assert e.value.body["param"] == "request_id"
    client.responses.delete(first.id)   # the first stops with it, and stays gone
    assert wait_all_blocks_free(server)["pagedllm:kv_cache_usage_perc"] == 0.0
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_store_defaults_to_true_where_the_server_keeps_responses(client, edge):
    """store unset: kept on a server with --responses-store, as OpenAI's and vLLM's default (a client chaining
    previous_response_id without store got a 404); a server that keeps none answers, store false."""
    kw = dict(model=MODEL_NAME, input=STORY, max_output_tokens=4, temperature=0)
    kept = client.responses.create(**kw)
    assert kept.store is True and client.responses.retrieve(kept.id).id == kept.id
    follow = client.responses.create(**{**kw, "input": "And then?"}, previous_response_id=kept.id)
    assert follow.previous_response_id == kept.id and follow.store is True
    r = httpx.post(edge.url + "/v1/responses", json=kw, headers=edge.headers, verify=edge.verify, timeout=60)
    assert r.status_code == 200 and r.json()["store"] is False, r.text


@pytest.mark.parametrize("method,path,body,status,param", [
    ("POST", "/v1/responses", {"store": True}, 400, "store"),
    ("POST", "/v1/responses", {"previous_response_id": "resp_123"}, 404, "previous_response_id"),
    ("GET", "/v1/responses/resp_123", None, 404, "response_id"),
    ("DELETE", "/v1/responses/resp_123", None, 404, "response_id"),
    ("POST", "/v1/responses/resp_123/cancel", None, 404, "response_id"),
    ("POST", "/v1/responses", {"background": True, "store": True}, 400, "store"),
])
def test_state_on_a_server_that_keeps_no_responses(edge, method, path, body, status, param):
    json_body = None if body is None else {"model": MODEL_NAME, "input": STORY, "max_output_tokens": 4, **body}
    r = httpx.request(method, edge.url + path, json=json_body, headers=edge.headers, verify=edge.verify, timeout=60)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert "--responses-store" in r.json()["error"]["message"]


def test_retrieve_refuses_stream(server):
    r = httpx.get(server.url + "/v1/responses/resp_x?stream=true", headers=server.headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text


def test_retrieve_query_parameters(client, server):
    """GET's OpenAI parameters (they were ignored): include reasoning.encrypted_content is taken (the SDK writes
    include[]), include_obfuscation is a no-op without a stream; starting_after (a stream's) and include's other
    values are 400s naming them."""
    stored = client.responses.create(model=MODEL_NAME, input=STORY, max_output_tokens=4, temperature=0, store=True)
    got = client.responses.retrieve(stored.id, include=["reasoning.encrypted_content"], include_obfuscation=False)
    assert got.model_dump() == stored.model_dump()
    for query, param in (("starting_after=3", "starting_after"), ("include=message.output_text.logprobs", "include"),
                         ("include[]=file_search_call.results", "include")):
        r = httpx.get(f"{server.url}/v1/responses/{stored.id}?{query}", headers=server.headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_vllms_sampling_additions_pass_to_the_chat_request(client, server):
    """vLLM's extra Responses fields (seed, top_k, stop, logit_bias, penalties, ...) mean what they mean in chat:
    a seeded sampled answer equals the chat answer with the same fields; request_id names the response."""
    extra = {"seed": 7, "top_k": 40, "stop": ["the"], "logit_bias": {"100": 2.0}, "presence_penalty": 0.5,
             "repetition_penalty": 1.1, "ignore_eos": True}
    chat = _chat(server, [{"role": "user", "content": STORY}], temperature=1.0, **extra)
    response = client.responses.create(model=MODEL_NAME, input=STORY, max_output_tokens=24, temperature=1.0,
                                       extra_body={**extra, "request_id": "abc"})
    assert response.id == "abc"   # vLLM 0.26's: the request_id as sent
    assert response.output_text == (chat["choices"][0]["message"]["content"] or "")
    assert response.usage.output_tokens == chat["usage"]["completion_tokens"]


def test_item_references_name_stored_output_items(client, server):
    """An item_reference input item is the stored response's output item of that id: the answer the whole
    conversation gets; an id not kept is a 404 naming the item (it was a 400 for the type)."""
    kw = dict(model=MODEL_NAME, max_output_tokens=6, temperature=0)
    first = client.responses.create(input=STORY, store=True, **kw)
    [message] = first.output
    referenced = client.responses.create(input=[{"role": "user", "content": STORY},
                                                {"type": "item_reference", "id": message.id},
                                                {"role": "user", "content": "And then?"}], **kw)
    whole = client.responses.create(input=[{"role": "user", "content": STORY},
                                           {"role": "assistant", "content": first.output_text},
                                           {"role": "user", "content": "And then?"}], **kw)
    assert referenced.usage.input_tokens == whole.usage.input_tokens and referenced.output_text == whole.output_text
    body = {"model": MODEL_NAME, "input": [{"type": "item_reference", "id": "msg_gone"}], "max_output_tokens": 4}
    r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "input.0" and "msg_gone" in r.text, r.text


def test_tool_choice_allowed_tools(client, server):
    """tool_choice allowed_tools: the model is shown only the tools it names, and its mode chooses among them:
    the prompt and call of the same request with only those tools (it was a 400); echoed as sent. A name not
    among the functions in tools is a 400 naming it, a named tool's error names it where the client sent it."""
    clock = {"type": "function", "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}}
    kw = dict(model=MODEL_NAME, input="What time is it in Paris?", max_output_tokens=40, temperature=0,
              parallel_tool_calls=False)
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]}
    response = client.responses.create(tools=[WEATHER, clock], tool_choice=allowed, **kw)
    alone = client.responses.create(tools=[clock], tool_choice="required", **kw)
    [call], [same] = response.output, alone.output
    assert call.name == same.name == "get_time" and call.arguments == same.arguments
    assert response.usage.input_tokens == alone.usage.input_tokens
    assert response.tool_choice.model_dump() == allowed
    for choice, tools, param in (({**allowed, "tools": [{"type": "function", "name": "nope"}]}, [WEATHER],
                                  "tool_choice.tools.0"),
                                 ({**allowed, "tools": [{"type": "mcp", "server_label": "x"}]}, [WEATHER],
                                  "tool_choice.tools.0"),
                                 (allowed, [WEATHER, {**clock, "parameters": {"type": "objec"}}],
                                  "tools.1.parameters")):
        body = {"model": MODEL_NAME, "input": STORY, "max_output_tokens": 4, "tools": tools, "tool_choice": choice}
        r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_response_says_the_temperature_and_top_p_used(client):
    """vLLM 0.26's Response carries the sampling values used (its protocol takes them from the SamplingParams):
    left unset they were null here; set, they are echoed."""
    plain = client.responses.create(model=MODEL_NAME, input=STORY, max_output_tokens=2)
    assert isinstance(plain.temperature, float) and isinstance(plain.top_p, float)
    asked = client.responses.create(model=MODEL_NAME, input=STORY, max_output_tokens=2, temperature=0.3, top_p=0.9)
    assert (asked.temperature, asked.top_p) == (0.3, 0.9)


def test_the_response_says_the_limit_and_penalties_used(client, server):
    """vLLM 0.26's Response echoes its SamplingParams': max_output_tokens the limit the answer ran to (unset: the
    room the prompt leaves in max_model_len; it was null here), the penalties used, top_logprobs those the text
    carries; every key of its Response is there (max_tool_calls and prompt null). Streamed, from
    response.created on."""
    body = {"model": MODEL_NAME, "input": STORY, "temperature": 0}
    r = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    plain = r.json()
    assert plain["max_output_tokens"] == MAX_MODEL_LEN - plain["usage"]["input_tokens"]
    assert (plain["presence_penalty"], plain["frequency_penalty"]) == (0.0, 0.0)
    assert plain["top_logprobs"] is None and plain["max_tool_calls"] is None and plain["prompt"] is None
    asked = client.responses.create(model=MODEL_NAME, input=STORY, max_output_tokens=3,
                                    include=["message.output_text.logprobs"], top_logprobs=2,
                                    extra_body={"presence_penalty": 0.5, "frequency_penalty": 0.25})
    assert asked.max_output_tokens == 3 and asked.top_logprobs == 2
    assert (asked.model_extra["presence_penalty"], asked.model_extra["frequency_penalty"]) == (0.5, 0.25)
    with client.responses.stream(model=MODEL_NAME, input=STORY, temperature=0) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert events[0].response.max_output_tokens == events[-1].response.max_output_tokens == \
        plain["max_output_tokens"]


def test_a_background_response_says_the_limit_it_runs_to_from_the_start(client):
    """vLLM 0.26 builds the queued copy from the request's SamplingParams, as the finished one: max_output_tokens
    the limit resolved (unset: the room the prompt leaves). The queued copy showed it as sent (null unset), the
    finished one the resolved value."""
    queued = client.responses.create(model=MODEL_NAME, input=STORY, temperature=0, background=True, store=True)
    deadline = time.monotonic() + 60
    while (done := client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done.max_output_tokens == MAX_MODEL_LEN - done.usage.input_tokens
    assert queued.max_output_tokens == done.max_output_tokens
    with pytest.raises(openai.BadRequestError) as e:   # checked before it is queued, as vLLM's (a 400, not failed)
        client.responses.create(model=MODEL_NAME, input=STORY, max_output_tokens=10**6, background=True, store=True)
    assert e.value.body["param"] == "max_output_tokens"
