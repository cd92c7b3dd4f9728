"""--tool-call-parser llama3_json on what Llama 3.x writes: every split of a text streams the non-streamed calls
exactly (the whole text in one delta too: vLLM #48294 lost the call there), and the cases of vLLM's
Llama3JsonToolParser tests and its users' reports give the calls they expect."""
import json

import pytest
from test_tool_parsers import splits, stream, summary

from pagedllm.outputs import CompletionOutput
from pagedllm.server.chat_tools import message, plan_tools
from pagedllm.server.protocol import ChatCompletionRequest
from pagedllm.server.tool_parsers import get_tool_parser
from pagedllm.server.tool_parsers.llama3_json import Llama3JsonToolParser

PARIS = '{"city": "Paris", "unit": "celsius"}'
CALL = '{"name": "get_weather", "parameters": ' + PARIS + '}'
NOW = '{"name": "now", "parameters": {}}'

# (the model's text, (content, [(name, arguments)]))
CASES = [
    (CALL, (None, [("get_weather", PARIS)])),
    ("<|python_tag|>" + NOW, (None, [("now", "{}")])),            # skip_special_tokens false: the tag is dropped
    ('{"name": "f", "arguments": {"x": 1}}', (None, [("f", '{"x": 1}')])),             # "arguments" is read too
    ('{"type": "function", "name": "f", "parameters": {"x": 1}}', (None, [("f", '{"x": 1}')])),  # Llama 3.2/3.3: "type"
    ('{"parameters": {"x": [1, {"y": "}"}]}, "name": "late"}', (None, [("late", '{"x": [1, {"y": "}"}]}')])),
    ('{"name": "f", "parameters": null}', (None, [("f", "{}")])),
    # braces, brackets, escaped quotes and unicode in strings; nested objects closing in "}}}}"
    ('{"name": "s", "parameters": {"q": "He said \\"Hello {world}\\" [x] é 🚀", "a": {"b": {"c": {"d": 1}}}}}',
     (None, [("s", '{"q": "He said \\"Hello {world}\\" [x] é 🚀", "a": {"b": {"c": {"d": 1}}}}')])),
    # parallel calls: vLLM's "; ", and ";", ";\n", " ; ", a newline, a comma (a list without its brackets)
    *[(CALL + sep + NOW, (None, [("get_weather", PARIS), ("now", "{}")]))
      for sep in ("; ", ";", ";\n", " ; ", "\n", ", ", ",", " ,\n")],
    (NOW + ", " + NOW + ", " + CALL, (None, [("now", "{}"), ("now", "{}"), ("get_weather", PARIS)])),
    # a comma that no object follows is text; one before an object that is no call separates it, as ";" does
    (NOW + ", which tells the time.", (", which tells the time.", [("now", "{}")])),
    (NOW + ",", (",", [("now", "{}")])),
    (NOW + ', {"foo": 1}', ('{"foo": 1}', [("now", "{}")])),
    # calls after text (vLLM finds them there); the text around them is content
    ("Here is the result: " + NOW + " Would you like to know more?",
     ("Here is the result: Would you like to know more?", [("now", "{}")])),
    (CALL + " I used {get_weather} for this.", ("I used {get_weather} for this.", [("get_weather", PARIS)])),
    (NOW + ' The arguments I passed were {"query": "test"}',
     ('The arguments I passed were {"query": "test"}', [("now", "{}")])),
    # objects that are not calls are content: no name, no arguments key, a name that is not a string
    ("This is just some text without any tool calls", ("This is just some text without any tool calls", [])),
    ('{"name": "Ada", "age": 36}', ('{"name": "Ada", "age": 36}', [])),
    ('{"parameters": {}}', ('{"parameters": {}}', [])),
    ('{"name": "toolWithoutParams"}', ('{"name": "toolWithoutParams"}', [])),
    ('{"name": 3, "parameters": {}}', ('{"name": 3, "parameters": {}}', [])),
    ("use f() { return 1; } here", ("use f() { return 1; } here", [])),
    ('{"name": "f"', ('{"name": "f"', [])),                        # cut short before its arguments: text
    # calls in a JSON list or a ```json fence (Llama 3.x writes both): the wrapping is not content (vLLM: none)
    ("[" + CALL + ", " + NOW + "]", (None, [("get_weather", PARIS), ("now", "{}")])),
    ("[ " + CALL + " ,\n " + NOW + " ]", (None, [("get_weather", PARIS), ("now", "{}")])),
    ("<|python_tag|>[" + NOW + "]", (None, [("now", "{}")])),
    ("```json\n" + CALL + "\n```", (None, [("get_weather", PARIS)])),
    ("```\n" + NOW + "\n```", (None, [("now", "{}")])),
    ("```json\n[" + CALL + ",\n" + NOW + "]\n```", (None, [("get_weather", PARIS), ("now", "{}")])),
    ("```json\n" + CALL + "\n```\n```json\n" + NOW + "\n```", (None, [("get_weather", PARIS), ("now", "{}")])),
    ("Calling it:\n```json\n" + NOW + "\n```\nDone.", ("Calling it:\nDone.", [("now", "{}")])),
    # several calls in one fence, as between calls anywhere (";", ",", a newline): the fence stays their wrapping
    *[("```json\n" + CALL + sep + NOW + "\n```", (None, [("get_weather", PARIS), ("now", "{}")]))
      for sep in (";\n", "; ", ",\n", "\n")],
    ("```json\n" + NOW + '\n{"foo": 1}\n```\nDone.', ('{"foo": 1}\nDone.', [("now", "{}")])),
    ("```json\n" + NOW + ', {"foo": 1}, ' + CALL + "\n```", ('{"foo": 1}', [("now", "{}"), ("get_weather", PARIS)])),
    ("[" + NOW, (None, [("now", "{}")])),                           # a list cut short
    # a list of calls holding an object that is no call: that object is content, the list's "," and "]" are not
    ("[" + CALL + ', {"foo": 1}]', ('{"foo": 1}', [("get_weather", PARIS)])),
    ("[" + NOW + ', {"name": "Ada", "age": 36}, ' + CALL + "]",
     ('{"name": "Ada", "age": 36}', [("now", "{}"), ("get_weather", PARIS)])),
    ("```json\n[" + NOW + ',\n{"foo": 1}\n]\n```\nDone.', ('{"foo": 1}\nDone.', [("now", "{}")])),
    ("[" + NOW + ', {"foo": 1}] and more', ('{"foo": 1} and more', [("now", "{}")])),
    ("[" + NOW + ', {"foo": ', ('{"foo":', [("now", "{}")])),            # cut short in it
    # a later item that is a JSON scalar is wrapping too (vLLM reads objects only: the call, no content)
    ("[" + NOW + ", 42]", (None, [("now", "{}")])),
    ("[" + CALL + ', "x, ]", true ,null, -1.5e3, ' + NOW + ", 0]", (None, [("get_weather", PARIS), ("now", "{}")])),
    ("[" + NOW + ', {"foo": 1}, false]', ('{"foo": 1}', [("now", "{}")])),
    ("[" + NOW + ", 42] and more", ("and more", [("now", "{}")])),
    ("[" + NOW + ", 42 is it", (", 42 is it", [("now", "{}")])),       # no item: text
    # items that are no objects before the first call, nested lists, and lists as later items are wrapping too,
    # at any depth (vLLM reads the objects only); these left "[42, ]", "[]" or ", [1, 2]]" as content
    ("[42, " + NOW + "]", (None, [("now", "{}")])),
    ('["x", [1, ["]", "{"]], ' + CALL + "]", (None, [("get_weather", PARIS)])),
    ("[[" + NOW + "]]", (None, [("now", "{}")])),
    ("[" + NOW + ", [1, 2]]", (None, [("now", "{}")])),
    ("[" + NOW + ', [1, ["]", "{\\""]], [' + CALL + "]]", (None, [("now", "{}"), ("get_weather", PARIS)])),
    ("[" + NOW + ", [1]] and more", ("and more", [("now", "{}")])),
    ("```json\n[42, " + NOW + "]\n```", (None, [("now", "{}")])),
    ("[" + NOW + ", [1, 2", (", [1, 2", [("now", "{}")])),              # cut short in a later list: text
    # a scalar or a closed list before a call is text, a "{" in its strings too
    ("42 " + NOW, ("42", [("now", "{}")])),
    ('["{", [1]] ' + NOW, ('["{", [1]]', [("now", "{}")])),
    # nested arrays and objects in the arguments: their text as written
    ('{"name":"f","parameters":{"a":[[1,2],[3]],"b":{"c":[{"d":1}]}}}',
     (None, [("f", '{"a":[[1,2],[3]],"b":{"c":[{"d":1}]}}')])),
    # a list or fence around objects that are not calls, and brackets and backticks in text, stay content
    ('[{"name": "Ada", "age": 36}, {"b": 2}]', ('[{"name": "Ada", "age": 36}, {"b": 2}]', [])),
    ('```json\n{"a": 1}\n```', ('```json\n{"a": 1}\n```', [])),
    ("see [1, 2], `x` and ```js``` [ ]", ("see [1, 2], `x` and ```js``` [ ]", [])),
    ('```json\n{"name": "f"', ('```json\n{"name": "f"', [])),
    ("```json\n[", ("```json\n[", [])),
    ('{"name": "f", "parameters": {"x": 1', (None, [("f", '{"x": 1')])),   # cut short in them: partial
]


@pytest.mark.parametrize("text,expected", CASES)
def test_streamed_at_every_split_equals_non_streamed(text, expected):
    content, calls = Llama3JsonToolParser().parse_all(text)
    assert (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]) == expected
    for chunks in splits(text):
        assert summary(stream(Llama3JsonToolParser(), chunks)) == expected, chunks


def test_non_streamed_calls_have_ids_and_parse():
    content, calls = Llama3JsonToolParser().parse_all(CALL + "; " + NOW + "; " + CALL)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "now", "get_weather"]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 3
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris", "unit": "celsius"}, {}, {"city": "Paris", "unit": "celsius"}]


def test_name_goes_out_before_the_arguments_end():
    """Streamed as written: the call's first delta (id, name) comes once its arguments key is read, then the
    arguments in fragments, not held to the object's end."""
    parser = Llama3JsonToolParser()
    first = parser.feed('{"name": "get_weather", "parameters": {"city": "Pa')
    assert [(c.index, c.name, c.arguments) for c in first.tool_calls] == [(0, "get_weather", '{"city": "Pa')]
    assert first.tool_calls[0].id.startswith("call_")
    rest = parser.feed('ris"}}')
    assert [(c.id, c.arguments) for c in rest.tool_calls] == [(None, 'ris"}')]
    assert not parser.finish() and parser.num_calls == 1


def test_parallel_tool_calls_false_keeps_the_first_call():
    for text in (CALL + "; " + NOW, CALL + ", " + NOW, "[" + CALL + ", " + NOW + "]",
                 "```json\n[" + CALL + ", " + NOW + "]\n```"):
        content, calls = Llama3JsonToolParser(max_calls=1).parse_all(text)
        assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"]


def test_chat_answer_finishes_with_tool_calls():
    tool = {"type": "function", "function": {"name": "get_weather"}}
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[tool])
    plan = plan_tools(req, "llama3_json", True)
    out = CompletionOutput(index=0, text=CALL, token_ids=[], cumulative_logprob=None, logprobs=None,
                           finish_reason="stop")
    msg, finish = message(plan, out, out.text)
    assert finish == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": PARIS}
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser
