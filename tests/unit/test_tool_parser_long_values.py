"""Long argument values streamed a few characters a delta: each delta's work stays bounded by the delta, not by
the text read so far. Parsers that copied what they held on each delta (`held += delta`), joined it or parsed it
again were quadratic: ~0.4 s for a 50 KB value fed 4 characters at a time, pythonic's ast re-parse 16 s (a
string; a long list, dict or run of strings was re-parsed from the call's start at each delta until later; a
list with a comment or a triple-quoted string, all of it, later still).

The work is counted, not timed: a delta that copies, joins or re-parses the text so far allocates memory in
proportion to it, so each delta's allocation peak (tracemalloc) is measured, and what the deltas allocate past a
small bound each (a value's end converted once, a list of pieces reallocated as it grows) must stay linear in the
text: quadratic work passes it by a hundred times and more. Deterministic, unlike a time bound on a machine shared
with other jobs. Every stream also joins to exactly the non-streamed answer."""
import json
import tracemalloc

import pytest
from test_tool_parsers import stream, summary

from pagedllm.server.tool_parsers import get_tool_parser
from pagedllm.server.tool_parsers.forced import NamedCallParser, RequiredCallsParser

SIZE = 50_000
DELTA = 4
BIG = 16_384      # bytes a delta may allocate whatever the text so far (its own output, bookkeeping)
PER_CHAR = 200    # bytes past BIG the deltas may allocate in all, per character (linear: < 70; quadratic: 1000s)

# code a coding agent writes: quotes, escapes, braces, tags, newlines, indentation, non-ASCII
LINE = 'def f(x):\n    return {"a": [x, \'b\'], "t": "</parameter> [ARGS]"}  # é 🚀 \\d\n'
CODE = (LINE * (SIZE // len(LINE) + 1))[:SIZE]
PLAIN = "x" * SIZE
J_CODE, J_PLAIN = json.dumps(CODE, ensure_ascii=False), json.dumps(PLAIN)
J_LIST = json.dumps([[i, [str(i)]] for i in range(SIZE // 16)] + [CODE.replace("{", "(")], ensure_ascii=False)
P_CODE = repr(CODE)   # a Python literal: pythonic's
# long values that are no string: a list of numbers, a dict, a run of short strings, nested (pythonic re-parsed
# the open call from its start at each delta: ~10 MB past the bound for the list)
P_NUMBERS = "[" + ", ".join(str(i % 1000 - 7) for i in range(SIZE // 5)) + "]"
P_DICT = "{" + ", ".join(f"'k{i}': {i}.5" for i in range(SIZE // 11)) + "}"
P_STRINGS = "[" + ", ".join(repr(f"s{i}") for i in range(SIZE // 8)) + "]"
P_NESTED = "{" + ", ".join(f"{i}: [{i}, {{'v': [True, None]}}]" for i in range(SIZE // 32)) + "}"
P_CALLS = "[" + ", ".join(f"f(x={i}, s='a, b')" for i in range(SIZE // 20)) + "]"
QWEN_TOOLS = [{"type": "function", "function": {"name": "write", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"},
                                     "n": {"type": "integer"}}}}}]


def qwen3_coder():
    return get_tool_parser("qwen3_coder").for_request(None, QWEN_TOOLS)


def parser(name):
    return lambda: get_tool_parser(name)(None, ("f",))


def qwen_call(value):
    return (f"<tool_call>\n<function=write>\n<parameter=path>\na.py\n</parameter>\n<parameter=content>\n{value}\n"
            "</parameter>\n<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>")


OUTPUTS = {
    "hermes": (parser("hermes"), f'<tool_call>\n{{"name": "f", "arguments": {{"code": {J_CODE}, "n": 1}}}}\n'
                                 "</tool_call>"),
    "hermes_bare": (parser("hermes"), f'{{"name": "f", "arguments": {{"code": {J_CODE}}}}}'),
    "hermes_quoted_arguments": (parser("hermes"), '<tool_call>{"name": "f", "arguments": '
                                + json.dumps(json.dumps({"code": CODE})) + "}</tool_call>"),
    "hermes_content": (parser("hermes"), CODE),
    "llama3_json": (parser("llama3_json"), f'{{"name": "f", "parameters": {{"code": {J_CODE}}}}}'),
    "llama3_json_list": (parser("llama3_json"),
                         f'```json\n[{{"name": "f", "parameters": {{"a": {J_PLAIN}}}}}, '
                         f'{{"name": "g", "parameters": {{"code": {J_CODE}}}}}]\n```'),
    "llama3_json_content": (parser("llama3_json"), CODE.replace("{", "(")),
    # a long list that is no call (held until it shows an object, closes or breaks off), or wraps calls
    "llama3_json_list_content": (parser("llama3_json"), J_LIST),
    "llama3_json_list_items": (parser("llama3_json"), f'[{J_LIST}, {{"name": "f", "parameters": {{}}}}, {J_LIST}]'),
    "mistral_v11": (parser("mistral"), f'Sure.[TOOL_CALLS]f[ARGS]{{"code": {J_CODE}}}[TOOL_CALLS]g[ARGS]{{}}'),
    "mistral_list": (parser("mistral"), f'[TOOL_CALLS] [{{"name": "f", "arguments": {{"code": {J_CODE}}}}}]'),
    "mistral_no_call": (parser("mistral"), "[TOOL_CALLS] " + CODE.replace("{", "(")),
    "pythonic": (parser("pythonic"), f"[f(code={P_CODE}, n=1), g(a={P_CODE})]"),
    "pythonic_plain": (parser("pythonic"), f'[f(code="{PLAIN}")]'),
    "pythonic_concatenated": (parser("pythonic"), f"[f(code={P_CODE} 'more' {P_CODE})]"),
    "pythonic_content": (parser("pythonic"), CODE),
    "pythonic_numbers": (parser("pythonic"), f"[f(xs={P_NUMBERS}, n=1), g(a=1)]"),
    "pythonic_dict": (parser("pythonic"), f"[f(d={P_DICT})]"),
    "pythonic_strings": (parser("pythonic"), f"[f(s={P_STRINGS}, t={P_NUMBERS})]"),
    "pythonic_nested": (parser("pythonic"), f"[f(x={{'a': {P_NESTED}, 'code': {P_CODE}}})]"),
    # a comment or a triple-quoted string (code): the whole list was parsed again at each delta
    "pythonic_comment": (parser("pythonic"), "[  # the calls, then ']'\n" + P_CALLS[1:]),
    "pythonic_triple_quoted": (parser("pythonic"), f'[f(code="""{CODE}.""", n=1), g(a="""it\'s""")]'),
    "llama4_pythonic": (parser("llama4_pythonic"), f"<|python_start|>[f(code={P_CODE})]<|python_end|>"),
    "qwen3_coder": (qwen3_coder, qwen_call(CODE)),
    "qwen3_coder_plain": (qwen3_coder, qwen_call(PLAIN)),
    "qwen3_coder_content": (qwen3_coder, CODE.replace("<", "(")),
    "named": (lambda: NamedCallParser("f"), f'{{"code": {J_CODE}}}'),
    "required": (RequiredCallsParser, f'[{{"name": "f", "parameters": {{"code": {J_CODE}}}}}]'),
}


def allocated_past_big(make, chunks, limit: int) -> tuple[int, int]:
    """(bytes the deltas allocated past BIG each, summed; deltas read): stops once past limit."""
    parser, over = make(), 0
    tracemalloc.start()
    try:
        for i, chunk in enumerate([*chunks, None]):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            parser.feed(chunk) if chunk is not None else parser.finish()
            over += max(0, tracemalloc.get_traced_memory()[1] - before - BIG)
            if over > limit:
                break
    finally:
        tracemalloc.stop()
    return over, i + 1


@pytest.mark.parametrize("name", OUTPUTS)
def test_long_value_streams_in_linear_work(name):
    make, text = OUTPUTS[name]
    chunks = [text[i:i + DELTA] for i in range(0, len(text), DELTA)]
    limit = PER_CHAR * len(text)
    over, read = allocated_past_big(make, chunks, limit)
    assert over <= limit, f"{over} bytes past {BIG} a delta by delta {read} of {len(chunks) + 1}"
    content, calls = make().parse_all(text)
    expected = (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    assert summary(stream(make(), chunks)) == expected
    if name.endswith(("_content", "_no_call")):
        assert content and not calls
    else:
        assert calls and all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in calls)
