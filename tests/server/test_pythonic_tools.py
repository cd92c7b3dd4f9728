"""--tool-call-parser pythonic through a real server (Llama 3.2's tool calls): the tiny model's answer is made a
pythonic list of calls by a regex constraint, and comes back as tool calls, streamed as not."""
import json
import re

import openai
import pytest
from server.server_utils import API_KEY, CHAT_TEMPLATE, MODEL_NAME, start_server, stop_server, wait_healthy

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
NOW = {"type": "function", "function": {"name": "now"}}
ANSWER = "[get_weather(city='Paris', days=3), now()]"


@pytest.fixture(scope="module")
def client(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("pythonic")
    (root / "template.jinja").write_text(CHAT_TEMPLATE)
    server = start_server(tiny_model_dirs["llama"], str(root / "serve.log"), API_KEY, "--chat-template",
                          str(root / "template.jinja"), "--enable-auto-tool-choice", "--tool-call-parser", "pythonic")
    try:
        wait_healthy(server)
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    finally:
        stop_server(server)


def _create(client, **kw):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Weather in Paris, and the time?"}],
        tools=[WEATHER, NOW], max_tokens=80, temperature=0,
        extra_body={"structured_outputs": {"regex": re.escape(ANSWER)}}, **kw)


def test_pythonic_calls_streamed_as_not(client):
    out = _create(client).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in out.message.tool_calls]
    assert calls == [("get_weather", '{"city": "Paris", "days": 3}'), ("now", "{}")]
    assert all(c.id.startswith("call_") and c.type == "function" for c in out.message.tool_calls)

    content, streamed, finish = "", {}, None
    for chunk in _create(client, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in streamed:   # a call's first delta: id, type and name
                    assert d.id and d.type == "function" and d.function.name
                    streamed[d.index] = [d.function.name, ""]
                streamed[d.index][1] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (content, finish) == ("", "tool_calls")
    assert [tuple(c) for c in streamed.values()] == calls
    assert json.loads(streamed[0][1]) == {"city": "Paris", "days": 3}
