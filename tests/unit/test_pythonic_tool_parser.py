"""The pythonic tool parser (Llama 3.2, Llama 4): vLLM's test outputs and the values a list of calls may hold,
at every split equal to the non-streamed calls; what is not such a list stays content."""
import json

import pytest
from unit.test_tool_parsers import splits, stream, summary

from pagedllm.server.tool_parsers import get_tool_parser
from pagedllm.server.tool_parsers.pythonic import Llama4PythonicToolParser, PythonicToolParser

WEATHER = "get_weather(city='San Francisco', metric='celsius')"
WEATHER_ARGS = '{"city": "San Francisco", "metric": "celsius"}'
USER = ("register_user(name='John Doe', age=37, address={'city': 'San Francisco', 'state': 'CA'}, role=None, "
        "passed_test=True, aliases=['John', 'Johnny'])")
USER_ARGS = ('{"name": "John Doe", "age": 37, "address": {"city": "San Francisco", "state": "CA"}, "role": null, '
             '"passed_test": true, "aliases": ["John", "Johnny"]}')

# (the model's answer, its calls as (name, JSON arguments)): vLLM's test cases, then the values a stream could
# release too early (a float's "37." before its "5", 'a' 'b' before its second string, an escape cut in two).
CALLS = [
    (f"[{WEATHER}]", [("get_weather", WEATHER_ARGS)]),
    (f"[{USER}]", [("register_user", USER_ARGS)]),
    ("[get_weather()]", [("get_weather", "{}")]),
    ("[do_something_cool(additional_data={})]", [("do_something_cool", '{"additional_data": {}}')]),
    ("[do_something_cool(steps=[])]", [("do_something_cool", '{"steps": []}')]),
    (r"""[get_weather(city='Martha\'s Vineyard', metric='\"cool units\"')]""",
     [("get_weather", '{"city": "Martha\'s Vineyard", "metric": "\\"cool units\\""}')]),
    (f"[{WEATHER}, {USER}, get_weather()]",
     [("get_weather", WEATHER_ARGS), ("register_user", USER_ARGS), ("get_weather", "{}")]),
    ("[f(x=37.5, y=-3, z=1e5, w=0x1F, s='a' 'b', t=true, u=null, v=\"é\\n\\u00e9\", o='\\101')]",
     [("f", '{"x": 37.5, "y": -3, "z": 100000.0, "w": 31, "s": "ab", "t": true, "u": null, "v": "é\\né", '
            '"o": "A"}')]),
    ("[f(q={'a': [1, {'b': ['}', ')]']}], 2: None}, r=[[], [[3]]])]",
     [("f", '{"q": {"a": [1, {"b": ["}", ")]"]}], "2": null}, "r": [[], [[3]]]}')]),
    ("\n[get_weather()]\n", [("get_weather", "{}")]),
    # a string read on its own as it grows (no parse): every escape, one cut anywhere, strings side by side
    (r"""[f(s="line1\nline2\t\"q\" \\ é🚀 {[(", n=-2.5)]""",
     [("f", r'{"s": "line1\nline2\t\"q\" \\ é🚀 {[(", "n": -2.5}')]),
    (r"""[f(s='a\x41\u00e9\N{EM DASH}\123\\\'z' "y\"", t=1), g(u='''it's''')]""",
     [("f", '{"s": "aAé—S\\\\\'zy\\"", "t": 1}'), ("g", '{"u": "it\'s"}')]),
    # read from the open call's last boundary ("," or an opener in it): values across boundaries, a trailing ","
    ("[f(xs=[1, [2, {'a': [3, 4], 'b': {}}], 5,], d={1: 'x', 'y': [None, ], 2.5: {'z': [[], [7]]}}, n=-1), "
     "g(s=['a', \"b\", 'c' 'd', ], t={})]",
     [("f", '{"xs": [1, [2, {"a": [3, 4], "b": {}}], 5], "d": {"1": "x", "y": [null], "2.5": {"z": [[], [7]]}}, '
            '"n": -1}'), ("g", '{"s": ["a", "b", "cd"], "t": {}}')]),
    # comments and triple-quoted strings, read as Python reads them (they were parsed whole at each delta): a
    # comment's brackets, commas and quotes; quotes in a triple-quoted string, "" before its end, a "\r\n" (one
    # "\n"), an empty one, one opening with a quote
    ("[f(x=1),  # first, or 'one'\n g(y='a, b')]", [("f", '{"x": 1}'), ("g", '{"y": "a, b"}')]),
    ('[f(code="""def f():\r\n    return "x" + ""\r"""),  # a \']\', or "(", f(y=1)\n'
     " g(u='\'\'it\'s\'\'' \"\"\"\"\"\", v=r\"\"\"\\d\"\"\")]",
     [("f", '{"code": "def f():\\n    return \\"x\\" + \\"\\"\\n"}'), ("g", '{"u": "it\'s", "v": "\\\\d"}')]),
    ("[f(s=\"\"\"a\"\"\" 'b' \"\"\"\"c\"\"\")]", [("f", '{"s": "ab\\"c"}')]),
]

# Not a list of calls with literal keyword arguments: all of it is content, streamed or not.
CONTENT = ["How can I help you today?", "[1] Introduction", "[click here](https://x.org) to see", "[f(1)]",
           "[f(x=foo)]", "[f(x=b'z')]", "[f(x=1e999)]", "[os.system(cmd='ls')]", "[f(**kw)]",
           "[f(x=__import__('os').system('touch /tmp/pwned'))]", "[f(x=-True)]", "[f(x=1j)]", "[]", "  "]


def expected(text, parser=PythonicToolParser):
    content, calls = parser().parse_all(text)
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("text,calls", CALLS)
def test_calls_streamed_at_every_split_equal_non_streamed(text, calls):
    assert expected(text) == (None, calls)
    for chunks in splits(text):
        assert summary(stream(PythonicToolParser(), chunks)) == (None, calls), chunks
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


def test_a_triple_quoted_string_streams_as_it_is_written():
    """Code in a triple-quoted string goes out as it comes (it waited for its closing quotes: the brackets read
    '""' and '"' as two strings); quotes that may begin its end wait for the next character."""
    parser = PythonicToolParser()
    deltas = [parser.feed(t) for t in ('[f(code="""def f():\n', '    return "x', '"\n""', '"), g()]')]
    deltas.append(parser.finish())
    assert [(c.name, c.arguments) for c in deltas[0].tool_calls] == [("f", '{"code": "def f():\\n')]
    assert [c.arguments for c in deltas[1].tool_calls] == ['    return \\"x']
    assert [c.arguments for c in deltas[2].tool_calls] == ['\\"\\n']
    assert [(c.name, c.arguments) for c in deltas[3].tool_calls] == [(None, '"}'), ("g", "{}")]


@pytest.mark.parametrize("text", CONTENT)
def test_what_is_no_list_of_literal_calls_is_content(text):
    for chunks in splits(text):
        assert summary(stream(PythonicToolParser(), chunks)) == (text, []), chunks


def test_a_call_goes_out_name_first_then_argument_fragments():
    text = f"[{WEATHER}]"
    parser, deltas = PythonicToolParser(), []
    for i in range(0, len(text), 3):
        deltas += parser.feed(text[i:i + 3]).tool_calls
    deltas += parser.finish().tool_calls
    first = deltas[0].to_json()
    assert first["id"].startswith("call_") and first["function"]["name"] == "get_weather"
    assert all(d.id is None for d in deltas[1:]) and len(deltas) > 3   # the arguments come as they are written
    assert "".join(d.arguments for d in deltas) == WEATHER_ARGS
    assert parser.num_calls == 1


def test_a_list_gone_wrong_after_a_call_went_out_keeps_it():
    """A streamed call cannot be taken back (as vLLM streams it); the same text not streamed is content."""
    assert summary(stream(PythonicToolParser(), ["[f(x=1)]", " Done."])) == (None, [("f", '{"x": 1}')])
    assert summary(stream(PythonicToolParser(), ["[f(x=1), g(", "x=foo)]"])) == (None, [("f", '{"x": 1}')])
    assert expected("[f(x=1), g(x=foo)]") == ("[f(x=1), g(x=foo)]", [])


@pytest.mark.parametrize("text", ["[f(x='ab', y=1, x='cd')]",   # Python refuses a keyword given twice
                                  "[f(x={'a': 1, 'b': 2, 'a': 3})]",   # the last value would take the first place
                                  "[f(x={1: 'a', True: 'b'})]",        # (1 == True: one key)
                                  # given again after a boundary the dict holds the first in (read from there on)
                                  "[f(x={'a': [1, 2], 'b': {'c': 3}, 1: [4], 'a': 5}, y=1)]",
                                  "[f(x=[1, 2], y={'k': [3, 4]}, x=5)]"])
def test_a_keyword_or_key_given_twice_is_no_literal(text):
    """Its value would replace the first one where that one went out already, so the stream could not be a
    prefix of it (it sent broken JSON). Not streamed, the list is content; streamed, what went out is closed."""
    assert expected(text) == (text, [])
    for chunks in splits(text):
        content, calls = summary(stream(PythonicToolParser(), chunks))
        assert (content, calls) == (text, []) or (content is None and [n for n, _ in calls] == ["f"]
                                                  and isinstance(json.loads(calls[0][1]), dict)), chunks


def test_cut_short_call_has_its_arguments_closed():
    """max_tokens in a string: the call keeps what came, as JSON that parses (finish_reason stays "length")."""
    text = "[get_weather(city='Par"
    for chunks in splits(text):
        assert summary(stream(PythonicToolParser(), chunks)) == (None, [("get_weather", '{"city": "Par"}')])


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = f"[{WEATHER}, {USER}]"
    for chunks in splits(text):
        assert summary(stream(PythonicToolParser(max_calls=1), chunks)) == (None, [("get_weather", WEATHER_ARGS)])


@pytest.mark.parametrize("text", [f"<|python_start|>[{WEATHER}]<|python_end|>", f"[{WEATHER}]",
                                  f"<|python_start|>[{WEATHER}]"])
def test_llama4_pythonic_drops_its_python_tags(text):
    for chunks in splits(text):
        assert summary(stream(Llama4PythonicToolParser(), chunks)) == (None, [("get_weather", WEATHER_ARGS)])


@pytest.mark.parametrize("text", ["<|python_s", "I will <|python_start|>"])
def test_llama4_pythonic_keeps_other_text(text):
    for chunks in splits(text):
        assert summary(stream(Llama4PythonicToolParser(), chunks)) == (text, [])


def test_registered_under_vllms_names():
    assert get_tool_parser("pythonic") is PythonicToolParser
    assert get_tool_parser("llama4_pythonic") is Llama4PythonicToolParser
