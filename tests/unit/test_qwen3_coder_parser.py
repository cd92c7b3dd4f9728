"""The qwen3_coder tool parser (Qwen3-Coder, Qwen3.5): what vLLM's Qwen3CoderToolParser gives for its tests'
outputs and the hard cases (values holding tags, a forgotten </parameter>, a call cut off by max_tokens), and
every split of each output streaming exactly the non-streamed calls."""
import json

import pytest
from test_tool_parsers import splits, stream, summary

from pagedllm.outputs import CompletionOutput
from pagedllm.server.chat_tools import ToolPlan, message
from pagedllm.server.tool_parsers import get_tool_parser
from pagedllm.server.tool_parsers.param_values import convert
from pagedllm.server.tool_parsers.qwen3_coder import Qwen3CoderToolParser

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "state": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]}}}
AREA = {"type": "object", "properties": {"shape": {"type": "string"}, "dimensions": {"type": "object"},
                                         "precision": {"type": "integer"}}}
WRITE = {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": p}}
         for n, p in (("get_current_weather", WEATHER), ("calculate_area", AREA), ("write_file", WRITE))]


def call(name: str, *params: tuple[str, str], close: bool = True) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}" + ("</function>\n</tool_call>" if close else "")


DALLAS = call("get_current_weather", ("city", "Dallas"), ("state", "TX"), ("unit", "fahrenheit"))
AREA_CALL = call("calculate_area", ("shape", "rectangle"), ("dimensions", '{"width": 10, \n "height": 20}'),
                 ("precision", "2"))
CODE = 'if a < b:\n    print("</parameter>")\n'
NESTED = "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>"

# (output, content, [(name, arguments as parsed)])
CASES = [
    (DALLAS, None, [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})]),
    ("Sure! Let me check the weather for you." + DALLAS, "Sure! Let me check the weather for you.",
     [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})]),
    (AREA_CALL, None, [("calculate_area", {"shape": "rectangle", "dimensions": {"width": 10, "height": 20},
                                           "precision": 2})]),
    (DALLAS + "\n" + DALLAS.replace("Dallas", "Orlando"), None,
     [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}),
      ("get_current_weather", {"city": "Orlando", "state": "TX", "unit": "fahrenheit"})]),
    # a value holding '<', tags and blank lines is kept whole (code a coding agent writes)
    (call("write_file", ("path", "a.py"), ("content", CODE + "\n" + NESTED + "\n</function>")), None,
     [("write_file", {"path": "a.py", "content": CODE + "\n" + NESTED + "\n</function>"})]),
    # tags in a value that end nothing: a </parameter> that text follows (after spaces), a nested parameter
    (call("write_file", ("path", "a.py"), ("content", "a</parameter>  \n  b\n<parameter=x>\n1\n</parameter>\nc")),
     None, [("write_file", {"path": "a.py", "content": "a</parameter>  \n  b\n<parameter=x>\n1\n</parameter>\nc"})]),
    # no newlines around the values
    ("<tool_call>\n<function=get_current_weather>\n<parameter=city>Dallas</parameter>\n"
     "<parameter=state>TX</parameter>\n</function>\n</tool_call>", None,
     [("get_current_weather", {"city": "Dallas", "state": "TX"})]),
    # a forgotten </parameter> ends the value before the next declared parameter (vLLM's test)
    ("Let me check the weather for you:\n" + DALLAS.replace("Dallas\n</parameter>\n", "Dallas\n"),
     "Let me check the weather for you:",
     [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})]),
    ("<tool_call>\n<function=get_current_weather>\n<parameter=city>\n<parameter=state>\nTX\n</parameter>\n"
     "</function>\n</tool_call>", None, [("get_current_weather", {"city": "", "state": "TX"})]),
    # ... or at the function's end
    ("<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</function>\n</tool_call>", None,
     [("get_current_weather", {"city": "Dallas"})]),
    # no <tool_call> before the function (vLLM reads it too), a stray </tool_call> after it
    ("I'll check.\n\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>\n"
     "</tool_call>", "I'll check.", [("get_current_weather", {"city": "Dallas"})]),
    # parameters the tool does not declare, and tools the request does not have: strings
    (call("get_current_weather", ("city", "Paris"), ("days", "3")), None,
     [("get_current_weather", {"city": "Paris", "days": "3"})]),
    (call("other", ("n", "3"), ("flag", "true")), None, [("other", {"n": "3", "flag": "true"})]),
    # no parameters
    ("<tool_call>\n<function=now>\n</function>\n</tool_call>", None, [("now", {})]),
    # text between and after calls is content
    ("Checking.\n" + DALLAS + "\nDone.", "Checking.\nDone.",
     [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})]),
    # cut off by max_tokens: the call keeps what was written, the value cut short included (as vLLM's)
    (call("calculate_area", ("shape", "circle"), close=False) + "<parameter=precision>\n3", None,
     [("calculate_area", {"shape": "circle", "precision": 3})]),
    (call("write_file", ("path", "a.py"), close=False) + "<parameter=content>\nimport o", None,
     [("write_file", {"path": "a.py", "content": "import o"})]),
    (call("calculate_area", ("shape", "circle"), close=False) + "<parameter=prec", None,
     [("calculate_area", {"shape": "circle"})]),
    # tags that open no call stay content: no function, a name that is prose or a template, cut before '>'
    ("<tool_call>\nnot a call\n</tool_call>", "<tool_call>\nnot a call\n</tool_call>", []),
    ("<tool_call>\n<function={{ tool.name }}>\n</function>\n</tool_call>",
     "<tool_call>\n<function={{ tool.name }}>\n</function>\n</tool_call>", []),
    ("Calling <tool_call>\n<function=get_curr", "Calling <tool_call>\n<function=get_curr", []),
    ("2 < 3 and <function is not a tag", "2 < 3 and <function is not a tag", []),
]


def parse(text: str, max_calls: int | None = None):
    content, calls = Qwen3CoderToolParser.for_request(max_calls, TOOLS).parse_all(text)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_non_streamed_calls_and_content(text, content, calls):
    assert parse(text) == (content, calls)


@pytest.mark.parametrize("text", [c[0] for c in CASES])
def test_streamed_at_every_split_equals_non_streamed(text):
    content, calls = Qwen3CoderToolParser.for_request(None, TOOLS).parse_all(text)
    expected = (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    for chunks in splits(text):
        assert summary(stream(Qwen3CoderToolParser.for_request(None, TOOLS), chunks)) == expected, chunks


def test_arguments_are_written_as_vllm_writes_them():
    """json.dumps of the parameters, non-ASCII kept: clients comparing texts see vLLM's."""
    _, calls = Qwen3CoderToolParser.for_request(None, TOOLS).parse_all(
        call("calculate_area", ("shape", "cercle é"), ("precision", "2")))
    assert calls[0]["function"]["arguments"] == '{"shape": "cercle é", "precision": 2}'
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_the_name_goes_out_first_then_one_fragment_a_parameter():
    parser = Qwen3CoderToolParser.for_request(None, TOOLS)
    first = parser.feed("<tool_call>\n<function=calculate_area>\n<parameter=shape>\nci")
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("calculate_area", "")]
    assert parser.feed("rcle\n</parameter>\n").tool_calls == []   # what follows </parameter> decides
    assert parser.feed("<parameter=precision>\n2\n</parameter>\n</function>").tool_calls[0].arguments \
        == '{"shape": "circle", "precision": 2'
    assert parser.feed("\n</tool_call>").tool_calls[0].arguments == "}"


def test_parallel_tool_calls_false_keeps_the_first_call():
    assert parse(DALLAS + "\n" + AREA_CALL, max_calls=1) == (
        None, [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})])


def test_a_parameter_given_twice_keeps_the_first():
    assert parse(call("get_current_weather", ("city", "Dallas"), ("city", "Paris"))) == (
        None, [("get_current_weather", {"city": "Dallas"})])


def test_registered_and_finish_reason_is_tool_calls():
    assert get_tool_parser("qwen3_coder") is Qwen3CoderToolParser
    out = CompletionOutput(index=0, text=AREA_CALL, token_ids=[], cumulative_logprob=None, logprobs=None,
                           finish_reason="stop")
    msg, finish = message(ToolPlan("auto", TOOLS, parser="qwen3_coder"), out, out.text)
    assert finish == "tool_calls" and msg["content"] is None
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"])["precision"] == 2   # the request's schema


@pytest.mark.parametrize("text,schema,value", [
    ("42", {"type": "string"}, "42"),                  # a string stays the model's text
    ("null", {"type": "string"}, "null"),
    ("42", None, "42"),                                # not declared: a string
    ("42", {"type": "integer"}, 42),
    ("4.0", {"type": "integer"}, "4.0"),               # not an integer: the text
    ("3.14", {"type": "number"}, 3.14),
    ("3.0", {"type": "number"}, 3),                    # vLLM writes a whole number as an int
    ("many", {"type": "number"}, "many"),
    ("inf", {"type": "number"}, "inf"),                # JSON has no infinity
    ("True", {"type": "boolean"}, True),
    ("yes", {"type": "boolean"}, False),               # vLLM: anything but true is false
    ('{"a": [1, 2]}', {"type": "object"}, {"a": [1, 2]}),
    ("{'a': None}", {"type": "object"}, {"a": None}),  # a Python repr
    ('"{\'a\': 1}"', {"type": "object"}, {"a": 1}),    # a JSON string holding a repr
    ("[1, 2", {"type": "array"}, "[1, 2"),             # broken: the text
    ("{1, 2}", {"type": "array"}, "{1, 2}"),           # a set is not JSON
    ("None", {"type": "integer"}, None),
    ("None", {"anyOf": [{"type": "string"}, {"type": "null"}]}, None),   # nullable string (Pydantic's Optional)
    ("5", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 5),
    ("42", {"type": ["integer", "null"]}, 42),
    ("some text", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "some text"),
    ("(1, 2)", {"type": "tuple"}, (1, 2)),             # another type name: a Python literal (JSON: [1, 2])
    ("x", {"description": "no type"}, "x"),
])
def test_values_convert_to_the_schema_type(text, schema, value):
    assert convert(text, schema) == value and type(convert(text, schema)) is type(value)
