"""Tool-call parsers on text streams: every split of real outputs gives the non-streamed calls exactly, and
each complaint vLLM users filed about streamed tool calls is a case here."""
import json

import jsonschema
import pytest

from pagedllm.config import TOOL_CALL_PARSERS
from pagedllm.server.tool_parsers import TOOL_PARSERS, DeltaMessage, get_tool_parser
from pagedllm.server.tool_parsers.forced import NamedCallParser, RequiredCallsParser, required_schema
from pagedllm.server.tool_parsers.hermes import HermesToolParser

# What Qwen2.5 writes (its chat template's format), with the hard parts: braces and quotes inside strings,
# escapes, unicode, nested objects ending in "}}" (vLLM #15274), a call without arguments (#28806).
HERMES_OUTPUTS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    ('Let me look that up.\n<tool_call>\n{"name": "search", "arguments": {"q": "a {b} \\"c\\" \\\\ é 🚀", '
     '"filters": {"year": {"gte": 2020}}}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'),
    '<tool_call>\n{"name": "now"}\n</tool_call>',
    '<tool_call>{"arguments": {"list": [1, [2, {"x": "]"}]]}, "name": "late_name"}</tool_call>',
    "No tools needed: 2 < 3 and <tool is not a tag.",
    # the end tag inside a string of the arguments is text (streamed, a delta ending after the string cut there)
    '<tool_call>{"name": "f", "arguments": {"a": "</tool_call>", "b": "x</tool_call>y"}}</tool_call>',
]


def stream(parser, chunks) -> DeltaMessage:
    """All deltas of a stream, merged; each call's first delta is checked on the way."""
    total = DeltaMessage()
    for i, chunk in enumerate([*chunks, None]):
        delta = parser.feed(chunk) if chunk is not None else parser.finish()
        for call in delta.tool_calls:
            if call.id is not None:   # the first delta of a call: id, type, name, arguments "" (vLLM #9693: None)
                shaped = call.to_json()
                assert shaped["type"] == "function" and shaped["function"]["name"]
                assert isinstance(shaped["function"]["arguments"], str)
        total.add(delta)
    return total


def splits(text: str):
    """Every split point (two pieces), and fixed-size chunks of 1 to 8 characters (a stream interval of several
    tokens, vLLM #31501), and the whole text in one delta."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for size in range(1, 9):
        yield [text[i:i + size] for i in range(0, len(text), size)]
    yield [text]


def summary(delta: DeltaMessage):
    return delta.content or None, [(c.name, c.arguments) for c in delta.tool_calls]


@pytest.mark.parametrize("text", HERMES_OUTPUTS)
def test_hermes_streamed_at_every_split_equals_non_streamed(text):
    content, calls = HermesToolParser().parse_all(text)
    expected = (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    for chunks in splits(text):
        assert summary(stream(HermesToolParser(), chunks)) == expected, chunks
    for _, arguments in expected[1]:
        assert isinstance(json.loads(arguments), dict)   # the concatenation parses (vLLM #10781, #15274)


def test_hermes_non_streamed_calls_and_content():
    content, calls = HermesToolParser().parse_all(HERMES_OUTPUTS[1])
    assert content == "Let me look that up."
    assert [c["function"]["name"] for c in calls] == ["search", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"q": 'a {b} "c" \\ é 🚀',
                                                           "filters": {"year": {"gte": 2020}}}
    assert calls[0]["function"]["arguments"].endswith("2020}}}")   # the nested closes, no half brace
    assert calls[1]["function"]["arguments"] == "{}"
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("body,arguments", [
    ('{"name": "f"}', "{}"),                              # no arguments: {} (vLLM #28806)
    ('{"name": "f", "arguments": null}', "{}"),
    ('{"name": "f", "arguments": {}}', "{}"),
    ('{"name": "f", "arguments": "{\\"a\\": 1}"}', '{"a": 1}'),   # arguments quoted as a JSON string
    ('{"name": "f", "arguments": "Paris"}', '"Paris"'),          # a string that holds no JSON: its literal
    ('{"name": "f", "arguments": {"a": 1}  }', '{"a": 1}'),       # no trailing whitespace in them
    ('{"name": "f", "arguments": {"a": 1}', '{"a": 1}'),            # the call's own } left out: not the tag
    ('{"name": "f", "parameters": {"a": 1}}', '{"a": 1}'),          # Llama's key: not dropped
    ('{"name": "f", "arguments": {"a": 1}, "arguments": {"b": 2}}', '{"a": 1}'),   # the first of them only
    ('{"name": "f", "parameters": {"a": 1}, "arguments": null}', '{"a": 1}'),
    ('{"name": "f", "arguments": {"a": 1} x}', '{"a": 1}'),
])
def test_hermes_arguments_shapes(body, arguments):
    text = f"<tool_call>\n{body}\n</tool_call>"
    for chunks in splits(text):
        assert summary(stream(HermesToolParser(), chunks)) == (None, [("f", arguments)])


@pytest.mark.parametrize("text,arguments", [('<tool_call>{"name": "f"}', "{}"),
                                            ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_', '{"a": 1}')])
def test_call_without_its_end_tag_ends_at_the_finish(text, arguments):
    """The model stops after the call's object (stop=["</tool_call>"], its EOS): the call still ends, so it
    counts (streamed finish_reason "tool_calls", as non-streamed) and has its "{}"."""
    for chunks in splits(text):
        parser = HermesToolParser()
        assert summary(stream(parser, chunks)) == (None, [("f", arguments)]), chunks
        assert parser.num_calls == 1


@pytest.mark.parametrize("parser,text,arguments", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments":', ""),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": ', ""),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a"', '{"a"'),
    ("llama3_json", '{"name": "f", "parameters":', ""),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments":', ""),
    ("required", '[{"name": "f", "parameters":', ""),
])
def test_call_cut_short_before_its_arguments_gets_none_invented(parser, text, arguments):
    """max_tokens ends the output right after a call's name or its arguments key: the call keeps what came, its
    arguments "" (a partial call, as finish_reason length says), never a "{}" the model did not write (which
    a client would run as a call without arguments). vLLM streams no argument fragment there either."""
    make = (lambda: RequiredCallsParser()) if parser == "required" else (lambda: get_tool_parser(parser)(None, ("f",)))
    for chunks in splits(text):
        assert summary(stream(make(), chunks)) == (None, [("f", arguments)]), chunks


def test_value_nested_past_the_decoders_depth_is_no_error():
    """A model looping on brackets: a value nested deeper than json.loads recurses was a RecursionError (a 500,
    or the stream's error event)."""
    deep = "[" * 5000 + "]" * 5000
    for body in (f'{{"name": "f", "x": {deep}, "arguments": {{"a": 1}}}}', f'{{"name": "f", "arguments": "{deep}"}}'):
        content, calls = HermesToolParser().parse_all(f"<tool_call>{body}</tool_call>")
        assert content is None and [c["function"]["name"] for c in calls] == ["f"]


def test_whole_call_in_one_delta_keeps_its_arguments():
    """vLLM #31501: with a stream interval > 1 a whole call arrived in one delta and its arguments were empty."""
    delta = HermesToolParser().feed(HERMES_OUTPUTS[0])
    assert delta.tool_calls[0].name == "get_weather"
    assert delta.tool_calls[0].arguments == '{"city": "Paris", "unit": "celsius"}'


def test_last_argument_fragment_is_not_lost():
    """vLLM #10781: the delta that closes the arguments also closes the call; its fragment must still come."""
    parser = HermesToolParser()
    first = parser.feed('<tool_call>\n{"name": "f", "arguments": {"a": "xy')
    last = parser.feed('z", "b": 2}}\n</tool_call>')
    end = parser.finish()
    assert first.tool_calls[-1].arguments + last.tool_calls[0].arguments == '{"a": "xyz", "b": 2}'
    assert not end


def test_arguments_stream_before_the_call_ends():
    parser = HermesToolParser()
    parser.feed('<tool_call>{"name": "f", "arguments": {"text": "once upon')
    delta = parser.feed(" a time")
    assert delta.tool_calls[0].arguments == " a time"


@pytest.mark.parametrize("text,content", [
    (f"Checking.\n{HERMES_OUTPUTS[0]}\nDone.", "Checking.\nDone."),
    (f"Checking. {HERMES_OUTPUTS[0]}\n{HERMES_OUTPUTS[0]}\n\nDone.", "Checking. Done."),
    (f"Checking.{HERMES_OUTPUTS[0]}\nDone.", "Checking.\nDone."),
    (f"\n{HERMES_OUTPUTS[0]}\nDone.\n", "Done."),
    (f"Checking.{HERMES_OUTPUTS[0]}\n \n\nDone.", "Checking.\n \n\nDone."),   # all of it, however it is split
])
def test_content_around_calls_keeps_a_separator(text, content):
    """Content before and after calls was joined without the whitespace between them ("Checking.Done.")."""
    for chunks in splits(text):
        assert stream(HermesToolParser(), chunks).content == content, chunks


def test_text_that_is_not_a_call_stays_content():
    assert HermesToolParser().parse_all("a <tool_call>no json here</tool_call> b") == (
        "a <tool_call>no json here</tool_call> b", [])
    assert HermesToolParser().parse_all("ends with <tool_ca") == ("ends with <tool_ca", [])
    assert HermesToolParser().parse_all("  plain answer \n") == ("  plain answer \n", [])


def test_cut_short_call_keeps_what_came():
    """max_tokens in the middle of the arguments (finish_reason stays "length"): the call and its fragment."""
    _, calls = HermesToolParser().parse_all('<tool_call>\n{"name": "f", "arguments": {"a": [1, 2')
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("f", '{"a": [1, 2')]


def test_parallel_tool_calls_false_keeps_the_first_call():
    content, calls = HermesToolParser(max_calls=1).parse_all(HERMES_OUTPUTS[1])
    assert content == "Let me look that up." and [c["function"]["name"] for c in calls] == ["search"]
    streamed = stream(HermesToolParser(max_calls=1), [HERMES_OUTPUTS[1][i:i + 3]
                                                      for i in range(0, len(HERMES_OUTPUTS[1]), 3)])
    assert {c.index for c in streamed.tool_calls} == {0}


REQUIRED_OUTPUT = ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                   '{"name": "now", "parameters": {}}]')


def test_required_streamed_at_every_split_equals_non_streamed():
    content, calls = RequiredCallsParser().parse_all(REQUIRED_OUTPUT)
    assert content is None
    expected = [("get_weather", '{"city": "Paris"}'), ("now", "{}")]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == expected
    for chunks in splits(REQUIRED_OUTPUT):
        assert summary(stream(RequiredCallsParser(), chunks)) == (None, expected)


def test_required_output_cut_short_before_a_name_is_neither_call_nor_content():
    """The constraint's JSON is not text the model said: vLLM 0.26 answers content null under "required"."""
    assert RequiredCallsParser().parse_all('[{"na') == (None, [])
    for chunks in splits('[{"name"'):
        assert summary(stream(RequiredCallsParser(), chunks)) == (None, [])


@pytest.mark.parametrize("text,arguments", [(' {"city": "Oslo", "days": [1, 2]}\n', '{"city": "Oslo", "days": [1, 2]}'),
                                            ("{}", "{}")])
def test_named_streamed_at_every_split_equals_non_streamed(text, arguments):
    assert NamedCallParser("f").parse_all(text)[1][0]["function"]["arguments"] == arguments
    for chunks in splits(text):
        assert summary(stream(NamedCallParser("f"), chunks)) == (None, [("f", arguments)])


@pytest.mark.parametrize("text", ["", " \n"])
def test_named_output_without_arguments_is_no_call(text):
    """The reasoning took all of max_tokens, or the model ended its answer in it (the constraint starts after
    </think>): the model called nothing, so no call to `name` with "{}" (which its schema may refuse), streamed
    (not even a first delta with the name while it reasons) or not."""
    assert NamedCallParser("f").parse_all(text) == (None, [])
    for chunks in splits(text):
        parser = NamedCallParser("f")
        assert summary(stream(parser, chunks)) == (None, []) and parser.num_calls == 0


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]


def test_required_schema_accepts_calls_and_refuses_the_rest():
    schema = required_schema(TOOLS, parallel_tool_calls=True)
    jsonschema.validate(json.loads(REQUIRED_OUTPUT), schema)
    for bad in ([], [{"name": "nope", "parameters": {}}], [{"name": "get_weather", "parameters": {}}],
                [{"name": "now"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = required_schema(TOOLS, parallel_tool_calls=False)
    assert one["maxItems"] == 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(REQUIRED_OUTPUT), one)


def test_registry_matches_the_flag_choices():
    assert tuple(TOOL_PARSERS) == TOOL_CALL_PARSERS
    assert get_tool_parser("hermes") is HermesToolParser
    with pytest.raises(ValueError, match="tool_call_parser"):
        get_tool_parser("nope")


BARE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize("text,expected", [
    (BARE, (None, [("get_weather", '{"city": "Paris"}')])),
    ("\n" + BARE + "\n" + BARE.replace("Paris", "Oslo"),
     (None, [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Oslo"}')])),
    (BARE + "\nIt is sunny.", ("It is sunny.", [("get_weather", '{"city": "Paris"}')])),
    (BARE.replace("get_weather", "unknown"), (BARE.replace("get_weather", "unknown"), [])),
    ('{"name": "get_weather", "arguments": {}, "x": 1}', ('{"name": "get_weather", "arguments": {}, "x": 1}', [])),
    ("Sure: " + BARE, ("Sure: " + BARE, [])),
    ('{"name": "get_weather", "argu', ('{"name": "get_weather", "argu', [])),
    (BARE.replace("arguments", "parameters"), (None, [("get_weather", '{"city": "Paris"}')])),
])
def test_hermes_bare_call_without_tags(text, expected):
    """Qwen2.5-Coder-0.5B answers a bare call object: a call only at the start (or after a call), naming a tool."""
    for chunks in splits(text):
        assert summary(stream(HermesToolParser(tool_names=("get_weather",)), chunks)) == expected, chunks
    assert HermesToolParser().parse_all(BARE) == (BARE, [])   # without the request's tool names: content
