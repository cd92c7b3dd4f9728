"""The reasoning parsers alone (server/reasoning.py): vLLM 0.26's splits of a text into reasoning and content,
streamed in any pieces equal to the whole, tags split across pieces held back."""
import os
import random

import pytest

from pagedllm.server.reasoning import (ReasoningParser, _partial_tag_len, reads_special_tokens,
                                      reasoning_ended_in, reasoning_fields, starts_in_reasoning, think_token_ids,
                                      turn_start_token_id)

QWEN3 = "/work/shared/model-configs/Qwen--Qwen3-0.6B"

CASES = [
    # (parser, thinking, text, reasoning, content)
    ("qwen3", True, "<think>\nplan it\n</think>\n\nThe answer.", "\nplan it\n", "\n\nThe answer."),
    ("qwen3", True, "plan it</think>answer", "plan it", "answer"),            # the template opened the block
    ("qwen3", True, "still thinking when cut off", "still thinking when cut off", None),
    ("qwen3", True, "a</think>b</think>c", "a", "bc"),                        # a later </think> is dropped
    ("qwen3", True, "a<think>b</think>c<think>d", "ab", "c<think>d"),        # <think> is dropped in reasoning only
    ("qwen3", True, "look up<tool_call>{\"name\": \"f\"}</tool_call>", "look up",
     "<tool_call>{\"name\": \"f\"}</tool_call>"),                               # a call ends the reasoning
    ("qwen3", True, "</think>", None, None),
    ("qwen3", True, "", None, None),
    ("qwen3", False, "no thinking</think> here", None, "no thinking here"),  # enable_thinking false
    ("qwen3", False, "<think>kept</think>x", None, "<think>keptx"),
    ("deepseek_r1", True, "<think>r</think>c</think>d<think>e", "r", "c</think>d<think>e"),
    ("deepseek_r1", True, "r1 <tool_call>x</think>y", "r1 <tool_call>x", "y"),
    ("deepseek_r1", True, "no end", "no end", None),
    ("deepseek_r1", True, "a <thin k> b </thin", "a <thin k> b </thin", None),   # near-tags are text
    # mistral (Magistral): content until [THINK], reasoning up to the first [/THINK], content after it kept whole
    ("mistral", False, "[THINK]plan it[/THINK]The answer.", "plan it", "The answer."),
    ("mistral", False, "no tags at all", None, "no tags at all"),                   # no [THINK]: all content
    ("mistral", False, "[THINK]cut off", "cut off", None),
    ("mistral", False, "\n[THINK]r[/THINK]\nrest", "r", "\n\nrest"),           # text before [THINK] is content
    ("mistral", False, "x[THINK]r", "r", "x"),
    ("mistral", False, "[THINK]a[THINK]b[/THINK]c[THINK]d[/THINK]e", "a[THINK]b", "c[THINK]d[/THINK]e"),
    ("mistral", False, "a[/THINK]b[/THINK]c", None, "ab[/THINK]c"),               # a stray end tag: the first dropped
    ("mistral", False, "[/THINK]rest", None, "rest"),
    # a [THINK] after a stray end tag still opens the reasoning (vLLM, splitting the whole text at once, keeps
    # the stray tag in this case only: "a[/THINK]bd")
    ("mistral", False, "a[/THINK]b[THINK]c[/THINK]d", "c", "abd"),
    ("mistral", False, "[THINK][/THINK]x", None, "x"),
    ("mistral", False, "", None, None),
    ("mistral", False, "[THINK]call?[TOOL_CALLS]f[ARGS]{}", "call?[TOOL_CALLS]f[ARGS]{}", None),   # still reasoning
    ("mistral", False, "[THINK]r[/THINK][TOOL_CALLS]f[ARGS]{}", "r", "[TOOL_CALLS]f[ARGS]{}"),
    ("mistral", False, "<think>x</think>y", None, "<think>x</think>y"),           # qwen's tags are text here
    ("mistral", False, "a [THIN K] [/THIN [[THINK]K", "K", "a [THIN K] [/THIN ["),   # near-tags are text
    ("mistral", True, "still thinking[/THINK]answer", "still thinking", "answer"),  # the prompt opened [THINK]
    ("mistral", True, "r[/THINK]a[THINK]b[/THINK]", "r", "a[THINK]b[/THINK]"),
]


@pytest.mark.parametrize("name, thinking, text, reasoning, content", CASES)
def test_whole_text(name, thinking, text, reasoning, content):
    assert ReasoningParser(name, thinking).parse_all(text) == (reasoning, content)


@pytest.mark.parametrize("name, thinking, text, reasoning, content", CASES)
def test_any_pieces_join_to_the_whole(name, thinking, text, reasoning, content):
    rng = random.Random(text)
    for trial in range(30):
        parser = ReasoningParser(name, thinking)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        got_r, got_c = "", ""
        for piece in pieces:
            d = parser.feed(piece)
            got_r, got_c = got_r + d.reasoning, got_c + d.content
            # nothing of a tag is ever sent: what was sent is a prefix of the answer
            assert (reasoning or "").startswith(got_r) and (content or "").startswith(got_c), pieces
        d = parser.finish()
        assert (got_r + d.reasoning or None, got_c + d.content or None) == (reasoning, content), pieces


@pytest.mark.parametrize("name, thinking, text, reasoning, content", CASES)
def test_every_split_point_and_character_stream_join_to_the_whole(name, thinking, text, reasoning, content):
    for pieces in [*([text[:i], text[i:]] for i in range(len(text) + 1)), list(text)]:
        parser = ReasoningParser(name, thinking)
        got = [parser.feed(piece) for piece in pieces] + [parser.finish()]
        joined = ("".join(d.reasoning for d in got) or None, "".join(d.content for d in got) or None)
        assert joined == (reasoning, content), pieces


def test_text_is_sent_as_soon_as_it_cannot_be_a_tag():
    parser = ReasoningParser("qwen3")
    assert parser.feed("abc</th").reasoning == "abc"      # "</th" may begin </think>
    d = parser.feed("x")                                     # it did not
    assert (d.reasoning, d.content) == ("</thx", "")
    assert parser.feed("</think>ok <").content == "ok "      # in content only </think> is a tag
    assert parser.feed("b").content == "<b"


def test_partial_tag_len():
    assert _partial_tag_len("ab<", ("<think>",)) == 1
    assert _partial_tag_len("ab</thi", ("<think>", "</think>")) == 5
    assert _partial_tag_len("ab<think", ("<think>",)) == 6
    assert _partial_tag_len("ab", ("<think>",)) == 0


def test_prompt_closes_reasoning():
    start, end = 7, 8
    assert reasoning_ended_in([1, 2, start, 3, end, 4], start, end)        # thinking off: <think></think>
    assert not reasoning_ended_in([1, end, 2, start, 3], start, end)       # the prompt opened a block
    assert not reasoning_ended_in([1, 2, 3], start, end)
    # the answer opens with reasoning unless the prompt closed it or qwen3's switch is off
    assert starts_in_reasoning("qwen3", None, [1, start], (start, end))
    assert not starts_in_reasoning("qwen3", {"enable_thinking": False}, [1], (start, end))
    assert starts_in_reasoning("deepseek_r1", {"enable_thinking": False}, [1], (start, end))
    assert not starts_in_reasoning("deepseek_r1", None, [start, end], (start, end))
    # only the answer's own turn counts: a block an earlier turn closed (reasoning sent back) does not
    turn = 9
    assert not reasoning_ended_in([turn, start, 3, end, 4, turn, 5], start, end, turn)
    assert reasoning_ended_in([turn, 5, turn, start, end, 4], start, end, turn)
    assert starts_in_reasoning("qwen3", None, [turn, start, end, turn, 5], (start, end), turn)


@pytest.mark.skipif(not os.path.isdir(QWEN3), reason="Qwen3 tokenizer files absent")
def test_a_tool_loop_with_reasoning_sent_back_still_opens_with_reasoning():
    """Qwen3's template keeps an assistant's reasoning after the last user query (a tool loop) as a closed
    <think></think> block: the next answer still opens with reasoning (its generation prompt is the same as
    without that history), while thinking off closes the answer's own block."""
    from pagedllm.chat_template import render_chat
    from pagedllm.engine.tokenizer import load_tokenizer
    tok = load_tokenizer(QWEN3)
    ids, turn = think_token_ids(tok, "qwen3"), turn_start_token_id(tok)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    loop = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [call], "reasoning": "call f"},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    for kwargs, thinks in ((None, True), ({"enable_thinking": False}, False)):
        prompt = tok.encode(render_chat(tok, loop, chat_template_kwargs=kwargs), add_special_tokens=False)
        assert ids[1] in prompt   # the earlier turn's closed block
        assert starts_in_reasoning("qwen3", kwargs, prompt, ids, turn) is thinks


def test_unknown_parser_and_tokenizer_without_tags():
    with pytest.raises(ValueError, match="not one of"):
        ReasoningParser("granite")

    class NoTags:
        def get_vocab(self):
            return {"a": 0, "<think>": 1}
    with pytest.raises(ValueError, match="reasoning_parser qwen3: the tokenizer has no </think> token"):
        think_token_ids(NoTags(), "qwen3")


@pytest.mark.parametrize("name, thinking, text, reasoning, content", [c for c in CASES if c[0] == "qwen3"])
def test_mimo_is_vllms_other_name_for_qwen3(name, thinking, text, reasoning, content):
    """vLLM's registry maps `mimo` to its qwen3 parser (the same class): the same splits, the same switch and tags."""
    assert ReasoningParser("mimo", thinking).parse_all(text) == (reasoning, content)
    start, end = 7, 8
    for kwargs, prompt in ((None, [1]), ({"enable_thinking": False}, [1]), (None, [start, end])):
        assert starts_in_reasoning("mimo", kwargs, prompt, (start, end)) == \
            starts_in_reasoning("qwen3", kwargs, prompt, (start, end))
    assert reasoning_fields("mimo", True, True, (start, end), 2) == reasoning_fields("qwen3", True, True,
                                                                                     (start, end), 2)
    assert not reads_special_tokens("mimo")

    class Qwen:
        def get_vocab(self):
            return {"<think>": 3, "</think>": 4}
    assert think_token_ids(Qwen(), "mimo") == (3, 4)


def test_an_unknown_parser_is_a_start_up_error_naming_the_parsers(capsys):
    from pagedllm.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "/no/such/model", "--reasoning-parser", "granite"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--reasoning-parser" in err and "'granite'" in err, err
    assert all(f"'{name}'" in err for name in ("qwen3", "deepseek_r1", "mistral", "mimo")), err
    from pagedllm.config import ServerConfig
    with pytest.raises(ValueError, match="reasoning_parser"):
        ServerConfig(reasoning_parser="granite")


def test_config_names_the_same_parsers():
    from pagedllm.config import REASONING_PARSERS
    from pagedllm.server.reasoning import PARSERS
    assert REASONING_PARSERS == PARSERS


def test_a_constrained_answer_ends_its_reasoning_only_at_think_end():
    """The engine starts a constraint (structured output, an enforced tool call) after </think> only: a
    <tool_call> Qwen3 writes in its reasoning stays reasoning there, so the content is exactly the constrained
    text (else a named call's arguments would begin with the unconstrained `<tool_call>...`)."""
    text = 'plan <tool_call>{"name": "f"}</tool_call> then</think>{"a": 1}'
    assert ReasoningParser("qwen3", constrained=True).parse_all(text) == (
        'plan <tool_call>{"name": "f"}</tool_call> then', '{"a": 1}')
    assert ReasoningParser("qwen3").parse_all(text)[1].startswith("<tool_call>")   # free text: a call for hermes


def test_chat_reasoning_parsers_know_a_constrained_answer():
    from types import SimpleNamespace

    from pagedllm.server.chat import _reasoning_parsers
    from pagedllm.server.chat_tools import plan_tools
    from pagedllm.server.protocol import ChatCompletionRequest
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ctx = SimpleNamespace(reasoning_parser="qwen3")
    text = 'a <tool_call>x</tool_call></think>{"b": 1}'
    for kw, content in (({"tools": [tool], "tool_choice": "required"}, '{"b": 1}'),
                        ({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}},
                         '{"b": 1}'),
                        ({"response_format": {"type": "json_object"}}, '{"b": 1}'),
                        ({"tools": [tool]}, '<tool_call>x</tool_call>{"b": 1}')):   # auto: free text
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)
        [parser] = _reasoning_parsers(ctx, req, plan_tools(req, "hermes", True), True)
        assert parser.parse_all(text)[1] == content, kw


def test_mistral_answer_opens_in_content_unless_the_prompt_opened_think():
    """A Magistral answer opens in content: the model writes [THINK] itself. It opens in reasoning only where the
    prompt's last tag is an open [THINK] (a continued assistant message); a closed block (Magistral's system
    prompt shows one) does not."""
    start, end = 34, 35
    ids = (start, end)
    assert not starts_in_reasoning("mistral", None, [1, 5, 4], ids)
    assert not starts_in_reasoning("mistral", None, [1, start, 6, end, 7, 4], ids)   # system prompt
    assert starts_in_reasoning("mistral", None, [1, 5, 4, start], ids)                # prefilled [THINK]
    assert starts_in_reasoning("mistral", None, [1, 5, 4, start, 8, 9], ids)
    assert not starts_in_reasoning("mistral", None, [1, 5, 4, start, 8, end], ids)
    assert not starts_in_reasoning("mistral", {"enable_thinking": True}, [1, end], ids)
    assert reads_special_tokens("mistral") and not reads_special_tokens("qwen3") and not reads_special_tokens(None)


def test_mistral_answer_turn_follows_inst_end():
    """Mistral's templates write the user's message as [INST]...[/INST], the answer after it: a [THINK] the user
    wrote (a tokenizer reading the rendered text makes it the special token) does not open the answer's
    reasoning, nor hold back its constraint; one the answer's own turn opened does."""
    class Magistral:
        def get_vocab(self):
            return {"<s>": 1, "[INST]": 3, "[/INST]": 4, "[THINK]": 34, "[/THINK]": 35}
    turn = turn_start_token_id(Magistral())
    assert turn == 4
    ids = (34, 35)
    assert not starts_in_reasoning("mistral", None, [1, 3, 34, 5, turn], ids, turn)
    assert not starts_in_reasoning("mistral", None, [1, 3, 34, 5, turn, 6], ids, turn)
    assert starts_in_reasoning("mistral", None, [1, 3, 5, turn, 34, 6], ids, turn)
    assert starts_in_reasoning("mistral", None, [1, 3, 34, 5, turn, 34], ids, turn)


def test_mistral_tags_are_its_tokenizers_tokens():
    class Magistral:
        def get_vocab(self):
            return {"<s>": 1, "[INST]": 3, "[/INST]": 4, "[THINK]": 34, "[/THINK]": 35}
    assert think_token_ids(Magistral(), "mistral") == (34, 35)

    class NoEnd:
        def get_vocab(self):
            return {"[THINK]": 34, "</think>": 7}
    with pytest.raises(ValueError, match=r"reasoning_parser mistral: the tokenizer has no \[/THINK\] token"):
        think_token_ids(NoEnd(), "mistral")
    with pytest.raises(ValueError, match="reasoning_parser qwen3: the tokenizer has no <think> or </think> token"):
        think_token_ids(Magistral(), "qwen3")


def test_mistral_engine_fields_where_the_constraint_starts():
    """Where a mistral answer opens in reasoning (the prompt opened [THINK]) a constraint waits for [/THINK];
    else, as vLLM 0.26, it holds from the first token where the prompt holds a [THINK] (a closed block) or the
    reasoning is not asked for, and where the prompt holds none the first token decides (free: [THINK] opens
    the reasoning). Without a constraint the reasoning ids are set all the same, so that thinking_token_budget
    counts the block the model's own [THINK] opens. qwen3 and deepseek_r1 set them only where the answer opens
    in reasoning."""
    ids, both = (34, 35), {"reasoning_start_token_id": 34, "reasoning_end_token_id": 35, "thinking_token_budget": 5}
    closed, plain = [1, 34, 7, 35, 9], [1, 7, 9]
    assert reasoning_fields("mistral", True, True, ids, 5, closed + [34]) == both
    assert reasoning_fields("mistral", True, False, ids, 5) == both
    assert reasoning_fields("mistral", False, False, ids, 5, plain) == both
    assert reasoning_fields("mistral", False, True, ids, 5, closed) == {}
    assert reasoning_fields("mistral", False, True, ids, 5, plain) == {**both, "reasoning_first_token_decides": True}
    assert reasoning_fields("mistral", False, True, ids, 5, plain, include_reasoning=False) == {}
    for name in ("qwen3", "deepseek_r1"):
        assert reasoning_fields(name, True, True, ids, 5) == both
        assert reasoning_fields(name, False, False, ids, 5) == {}


MISTRAL_ANSWERS = [
    '[THINK]weather, so call[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
    'Sure.[THINK]plan[/THINK]Here:[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]now[ARGS]{}',
    '[THINK]maybe[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',   # cut off in the reasoning: no call
    'No thinking.[TOOL_CALLS]now[ARGS]{}',
]


@pytest.mark.parametrize("text", MISTRAL_ANSWERS)
def test_mistral_tool_calls_after_thinking(text):
    """With --tool-call-parser mistral the calls are read from the content after [/THINK] only, streamed at
    every split point as not."""
    from pagedllm.server.tool_parsers.mistral import MistralToolParser
    thought, content = ReasoningParser("mistral").parse_all(text)
    expected_content, calls = MistralToolParser().parse_all(content or "")
    expected = (thought, expected_content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    if "[/THINK]" in text:
        assert calls and thought and "[TOOL_CALLS]" not in thought
    else:
        assert "[THINK]" not in text or (not calls and "[TOOL_CALLS]" in thought)
    for pieces in [*([text[:i], text[i:]] for i in range(len(text) + 1)), list(text)]:
        reasoner, tools = ReasoningParser("mistral"), MistralToolParser()
        thought_parts, content_parts, streamed_calls = [], [], {}
        for piece in [*pieces, None]:
            split = reasoner.feed(piece) if piece is not None else reasoner.finish()
            delta = tools.feed(split.content)
            if piece is None:
                delta.add(tools.finish())
            thought_parts.append(split.reasoning)
            content_parts.append(delta.content or "")
            for call in delta.tool_calls:
                name, args = streamed_calls.get(call.index, ("", ""))
                streamed_calls[call.index] = (name + (call.name or ""), args + (call.arguments or ""))
        got = ("".join(thought_parts) or None, "".join(content_parts) or None,
               [streamed_calls[i] for i in sorted(streamed_calls)])
        assert got == expected, pieces
