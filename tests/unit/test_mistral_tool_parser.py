"""The mistral tool parser on text streams: what Mistral models write ([TOOL_CALLS] then a JSON list before
tokenizer v11, `name[ARGS]{...}` per call from v11), vLLM's test cases among them; every split gives the
non-streamed answer exactly; ids a Mistral chat template takes back."""
import pytest
from test_tool_parsers import splits, stream, summary
from transformers import AutoTokenizer

from conftest import DEMO_DIR
from pagedllm.chat_template import ChatTemplateError, render_chat
from pagedllm.server.chat_tools import plan_tools
from pagedllm.server.protocol import ChatCompletionRequest
from pagedllm.server.tool_parsers import get_tool_parser
from pagedllm.server.tool_parsers.mistral import MistralToolParser

WEATHER = ("get_weather", '{"city": "San Francisco", "unit": "celsius"}')
CASES = [
    # (output, content, [(name, arguments)])
    ("This is a test", "This is a test", []),
    # Mistral-7B-Instruct-v0.3 (a space after the token), Mistral-Nemo (none)
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "San Francisco", "unit": "celsius"}}]', None,
     [WEATHER]),
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 3.5, "b": 4}}, {"name": "now", "arguments": {}}]', None,
     [("add", '{"a": 3.5, "b": 4}'), ("now", "{}")]),
    ('[TOOL_CALLS]  [ {"name":"add" , "arguments" : {"a": 3, "b": 4} } ]', None, [("add", '{"a": 3, "b": 4}')]),
    ('[TOOL_CALLS] [{"arguments": {"name": "John Doe"}, "name": "get_age"}]', None,
     [("get_age", '{"name": "John Doe"}')]),                         # arguments first, a "name" inside them
    ('Hello[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]', "Hello", [("add", '{"a": 1}')]),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]\nextra trailing data', "extra trailing data",
     [("add", '{"a": 1}')]),
    ('[TOOL_CALLS]  junk [{"name": "add", "arguments": {"a": 1}}]', None, [("add", '{"a": 1}')]),
    ('[TOOL_CALLS] [{"name": "f", "arguments": "{\\"x\\": [1, \\"]\\"]}"}]', None, [("f", '{"x": [1, "]"]}')]),
    ('[TOOL_CALLS] [{"name": "now"}]', None, [("now", "{}")]),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Pa', None, [("get_weather", '{"city": "Pa')]),
    ("[TOOL_CALLS] not json at all", "not json at all", []),
    ('[TOOL_CALLS] [{"nam', '[{"nam', []),                            # cut short before a name: no call
    ('[TOOL_CALLS]{"name": "add", "arguments": {"a": 1}}', None, [("add", '{"a": 1}')]),   # one object, no list
    # tokenizer v11 and later (Mistral-Small-3.2): [ARGS] is in the text with HF tokenizers
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "San Francisco", "unit": "celsius"}', None, [WEATHER]),
    ('[TOOL_CALLS]add{"a": 3.5, "b": 4}[TOOL_CALLS]multiply{"a": 3, "b": 6}\n', None,
     [("add", '{"a": 3.5, "b": 4}'), ("multiply", '{"a": 3, "b": 6}')]),
    ('bla[TOOL_CALLS]add[ARGS]{"a": "}{ [TOOL"}', "bla", [("add", '{"a": "}{ [TOOL"}')]),
    # cut short: what came is the arguments (vLLM's), as streamed
    ('hi{hi[TOOL_CALLS]bash{"command": "re.compile(r\'{}\')', "hi{hi", [("bash", '{"command": "re.compile(r\'{}\')')]),
    ("[TOOL_CALLS]toolname_no_args", "toolname_no_args", []),
    # later tokenizers write the call's id too: name[CALL_ID]id[ARGS]{...}; the name is the name alone
    ('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "San Francisco", "unit": "celsius"}', None, [WEATHER]),
    ('Sure.[TOOL_CALLS]add[CALL_ID]abcdefghi[ARGS]{"a": 1}[TOOL_CALLS]now[CALL_ID]call_1[ARGS]{}', "Sure.",
     [("add", '{"a": 1}'), ("now", "{}")]),
    ('[TOOL_CALLS]add[CALL_ID] 123456789 {"a": 1}', None, [("add", '{"a": 1}')]),
]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_calls_and_content(text, content, calls):
    got_content, got_calls = MistralToolParser().parse_all(text)
    assert (got_content, [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls]) == (content, calls)


@pytest.mark.parametrize("text", [c[0] for c in CASES])
def test_streamed_at_every_split_equals_non_streamed(text):
    content, calls = MistralToolParser().parse_all(text)
    expected = (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    for chunks in splits(text):
        assert summary(stream(MistralToolParser(), chunks)) == expected, chunks


def test_arguments_stream_as_they_come():
    parser = MistralToolParser()
    first = parser.feed('[TOOL_CALLS]get_weather[ARGS]{"city": ')
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("get_weather", '{"city":')]
    assert parser.feed('"Paris"} \n').tool_calls[0].arguments == ' "Paris"}'   # trailing whitespace held
    assert parser.feed("[TOOL_").tool_calls == []                                # may be the next call's token
    parser = MistralToolParser()
    delta = parser.feed('[TOOL_CALLS] [{"name": "f", "arguments": {"a": [1, ')
    assert [(c.name, c.arguments) for c in delta.tool_calls] == [("f", '{"a": [1,')]


def test_call_ids_are_nine_letters_and_digits():
    """Mistral's chat templates raise on any other id when the conversation comes back (vLLM's MistralToolCall)."""
    _, calls = MistralToolParser().parse_all('[TOOL_CALLS]a{}[TOOL_CALLS]b{}' * 50)
    ids = [c["id"] for c in calls]
    assert all(len(i) == 9 and i.isascii() and i.isalnum() for i in ids) and len(set(ids)) == len(ids) == 100


@pytest.mark.parametrize("written,kept", [
    ("a1B2c3D4e", True), ("123456789", True),
    ("call_1", False), ("abcdefgh", False), ("abcdefghij", False), ("abcdéfghi", False), ("", False),
    ("abc def g", False),
])
def test_the_call_id_the_model_wrote_is_the_calls_id_when_valid(written, kept):
    """name[CALL_ID]id[ARGS]: the id written becomes the call's when a Mistral template takes it back (9 ASCII
    letters and digits), else one is made, streamed at every split as not."""
    text = f'[TOOL_CALLS]get_weather[CALL_ID]{written}[ARGS]{{"city": "Paris"}}'
    ids = []
    for chunks in splits(text):
        parser, first = MistralToolParser(), []
        for chunk in [*chunks, None]:
            delta = parser.feed(chunk) if chunk is not None else parser.finish()
            first += [c for c in delta.tool_calls if c.id is not None]
        assert [(c.name, c.index) for c in first] == [("get_weather", 0)], chunks
        ids.append(first[0].id)
    assert all(len(i) == 9 and i.isascii() and i.isalnum() for i in ids)
    assert all(i == written for i in ids) if kept else written not in ids


def test_a_call_id_written_twice_is_made_anew_the_second_time():
    """Tool results find their call by its id: two calls of one answer never share one."""
    _, calls = MistralToolParser().parse_all("[TOOL_CALLS]a[CALL_ID]abcdefghi[ARGS]{}" * 2)
    assert calls[0]["id"] == "abcdefghi" and calls[1]["id"] != "abcdefghi" and len(calls[1]["id"]) == 9


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": 2}}]'
    for chunks in splits(text):
        assert summary(stream(MistralToolParser(max_calls=1), chunks)) == (None, [("a", '{"x": 1}')])
    assert summary(stream(MistralToolParser(max_calls=1), ["[TOOL_CALLS]a{}[TOOL_CALLS]b{}"])) == (None, [("a", "{}")])


def test_special_tokens_are_kept_for_the_parser_that_reads_them():
    """[TOOL_CALLS] is a special token: skipped (the default), the parser would never see it. vLLM's mistral
    parser sets skip_special_tokens false; the enforced choices have parsers of their own."""
    assert get_tool_parser("mistral") is MistralToolParser
    tool = {"type": "function", "function": {"name": "f"}}
    plan = lambda parser, **kw: plan_tools(ChatCompletionRequest(   # noqa: E731
        messages=[{"role": "user", "content": "hi"}], tools=[tool], **kw), parser, True)
    assert plan("mistral").keeps_special_tokens and not plan("hermes").keeps_special_tokens
    assert not plan("mistral", tool_choice="none").keeps_special_tokens
    assert not plan("mistral", tool_choice="required").keeps_special_tokens


# What Mistral's templates check of a conversation sent back (written here: the rule, not their text).
CHECKING_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.tool_calls is defined and m.tool_calls %}[TOOL_CALLS] ["
    "{%- for c in m.tool_calls %}{%- if c.id|length != 9 %}{{ raise_exception('Tool call IDs should be "
    "alphanumeric strings with length 9!') }}{%- endif %}"
    "{%- set out = c.function|tojson %}{{ out[:-1] }}, \"id\": \"{{ c.id }}\"}{%- endfor %}]"
    "{%- elif m.role == 'tool' %}{%- if m.tool_call_id|length != 9 %}{{ raise_exception('bad id') }}{%- endif %}"
    "[TOOL_RESULTS] {\"content\": {{ m.content }}, \"call_id\": \"{{ m.tool_call_id }}\"}[/TOOL_RESULTS]"
    "{%- else %}[INST] {{ m.content }}[/INST]{%- endif %}{%- endfor %}")


def test_a_conversation_with_its_ids_renders_in_a_mistral_template():
    _, calls = MistralToolParser().parse_all('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    conversation = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": calls},
                    {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"sky": "sunny"}'}]
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_DIR))
    text = render_chat(tokenizer, conversation, CHECKING_TEMPLATE)
    assert (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{calls[0]["id"]}"}}]'
            in text and f'"call_id": "{calls[0]["id"]}"' in text)
    conversation[1]["tool_calls"][0]["id"] = conversation[2]["tool_call_id"] = "call_" + "0" * 24   # hermes' ids
    with pytest.raises(ChatTemplateError, match="length 9"):
        render_chat(tokenizer, conversation, CHECKING_TEMPLATE)
