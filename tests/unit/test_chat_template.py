"""Conversations through a chat template (pagedllm/chat_template.py, shared by LLM.chat and the server):
agent histories (tool calls, tool answers, content parts) reach the template in OpenAI's shapes, and the
options continue_final_message / chat_template_kwargs render as vLLM's."""
import pytest
from conftest import DEMO_DIR

from pagedllm.chat_template import ChatTemplateError, render_chat, template_message
from pagedllm.engine.tokenizer import load_tokenizer

# A tool-use template in the style of real ones (arguments written with tojson, tool answers by call id).
TOOL_TEMPLATE = (
    "{% if system_note is defined %}[{{ system_note }}]\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}<call id={{ c.id }}>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</call>{% endfor %}{% endif %}"
    "{% if m.tool_call_id is defined %}<for {{ m.tool_call_id }}>{% endif %}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")

AGENT_HISTORY = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(DEMO_DIR))


def test_tool_calls_and_tool_answers_reach_the_template(tokenizer):
    text = render_chat(tokenizer, AGENT_HISTORY, TOOL_TEMPLATE)
    assert text == ("<user>Weather in\nParis?</user>\n"
                    '<assistant><call id=call_1>get_weather{"city": "Paris"}</call></assistant>\n'
                    "<tool>18C, sunny<for call_1></tool>\n"
                    "<assistant>")


def test_template_message_parses_arguments_as_vllm():
    """vLLM json.loads a call's arguments for the template: none or "" is {}, null is {}, other JSON its value;
    text that is not JSON (or nested past the decoder's depth) is an error naming the field."""
    def arguments(value):
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": value}}
        return template_message({"role": "assistant", "tool_calls": [call]})["tool_calls"][0]["function"]
    assert arguments("") == arguments("null") == arguments(None) == {"name": "f", "arguments": {}}
    assert arguments("[1]") == {"name": "f", "arguments": [1]} and arguments('"x"') == {"name": "f", "arguments": "x"}
    assert "tool_calls" not in template_message({"role": "assistant", "content": "x", "tool_calls": []})
    for text in ("not json", "[" * 100_000):
        with pytest.raises(ChatTemplateError, match="JSON") as e:
            arguments(text)
        assert e.value.param == "messages.tool_calls.0.function.arguments"


def test_assistant_reasoning_reaches_the_template_under_both_names(tokenizer):
    """As vLLM: an assistant message's `reasoning` is passed as both, so templates that read reasoning_content
    (Qwen3's) see what a client sends back from a `reasoning` answer. A message's own reasoning_content is not
    read, as vLLM's chat_utils (LLM.chat's messages; the server renames it to reasoning first): it reached the
    template here, a prompt LLM.chat in vLLM never renders."""
    m = template_message({"role": "assistant", "content": "Hi", "reasoning": "thought"})
    assert m["reasoning"] == m["reasoning_content"] == "thought"
    both = template_message({"role": "assistant", "content": "Hi", "reasoning": "new", "reasoning_content": "old"})
    assert both["reasoning_content"] == "new"
    old = template_message({"role": "assistant", "content": "Hi", "reasoning_content": "old"})
    assert "reasoning" not in old and "reasoning_content" not in old
    assert "reasoning_content" not in template_message({"role": "user", "content": "x", "reasoning": "r"})
    template = "{% for m in messages %}{{ m.reasoning_content }}|{{ m.content }};{% endfor %}"
    assert render_chat(tokenizer, [{"role": "assistant", "content": "Hi", "reasoning": "r"}], template,
                       add_generation_prompt=False) == "r|Hi;"


def test_continue_final_message_and_template_kwargs(tokenizer):
    conversation = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon"}]
    text = render_chat(tokenizer, conversation, TOOL_TEMPLATE, add_generation_prompt=False,
                       continue_final_message=True, chat_template_kwargs={"system_note": "be brief"})
    assert text == "[be brief]\n<user>Tell a story</user>\n<assistant>Once upon"
    closed = render_chat(tokenizer, conversation, TOOL_TEMPLATE, add_generation_prompt=False)
    assert closed == "<user>Tell a story</user>\n<assistant>Once upon</assistant>\n"


@pytest.mark.parametrize("kwargs,param", [
    (dict(add_generation_prompt=True, continue_final_message=True), "continue_final_message"),
    (dict(chat_template_kwargs={"tokenize": True}), "chat_template_kwargs"),
    (dict(chat_template_kwargs={"messages": []}), "chat_template_kwargs"),
])
def test_refused_options_name_the_field(tokenizer, kwargs, param):
    with pytest.raises(ChatTemplateError) as e:
        render_chat(tokenizer, [{"role": "user", "content": "Hi"}], TOOL_TEMPLATE, **kwargs)
    assert e.value.param == param


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "x"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                  {"image_url": "x"}, {"type": "video_url", "video_url": {"url": "x"}}])
def test_media_content_parts_are_refused_as_needing_a_multimodal_model(tokenizer, part):
    message = {"role": "user", "content": [{"type": "text", "text": "a"}, part]}
    with pytest.raises(ChatTemplateError, match="multimodal") as e:
        render_chat(tokenizer, [message], TOOL_TEMPLATE)
    assert e.value.param == "messages.0.content.1.type"


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages.content.0.text"),
    ({"role": "user", "content": [5]}, "messages.content.0"),
    ({"role": "user", "content": [{"type": "thinking", "thinking": 5}]}, "messages.content.0.thinking"),
    ({"role": "user", "content": [{"text": "x"}]}, "messages.content.0.type"),
    ({"role": "user", "content": [{"type": "bogus", "text": "x"}]}, "messages.content.0.type"),
    ({"role": "user", "content": [{"type": "text", "text": "x", "uuid": "u"}]}, "messages.content.0.uuid"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}, "messages"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}, "messages"),
    ({"role": "assistant", "tool_calls": {"id": "c"}}, "messages")])
def test_malformed_parts_and_tool_calls_name_the_field(message, param):
    """Offline LLM.chat has no request schema before this: a part vLLM refuses (a text that is not a string, no
    type or one it does not read, a uuid: vLLM's media marker) or a tool call without a named function is a
    ValueError naming the field (it was a bare KeyError)."""
    with pytest.raises(ValueError) as e:
        template_message(message)
    assert e.value.param == param


def test_a_text_or_refusal_part_without_its_text_is_left_out_as_vllm_skips_it():
    parts = [{"type": "text"}, {"type": "refusal", "refusal": None}, {"type": "text", "text": "a"}]
    assert template_message({"role": "user", "content": parts})["content"] == "a"
    assert template_message({"role": "user", "content": parts}, "openai")["content"] == [{"type": "text", "text": "a"}]


def test_a_null_text_part_is_left_out_of_the_texts_vllm_joins():
    """A null thinking / input_text / output_text part (vLLM keeps it, its text null) has no text where vLLM joins
    an openai-format content's texts: a tool's answer and a developer message merged into the system one, where
    vLLM's join fails on the null (a TypeError); here it is left out, as the string format leaves it out."""
    parts = [{"type": "input_text", "text": "a"}, {"type": "thinking", "thinking": None},
             {"type": "output_text", "text": None}, {"type": "input_text", "text": "b"}]
    tool = template_message({"role": "tool", "tool_call_id": "c", "content": parts}, "openai")
    assert tool["content"] == "a\nb"
    assert template_message({"role": "tool", "tool_call_id": "c", "content": parts})["content"] == "a\nb"
    from pagedllm.chat_template import _developer_as_system
    messages = [template_message(m, "openai") for m in ({"role": "user", "content": "Hi"},
                                                        {"role": "developer", "content": parts})]
    assert _developer_as_system(messages)[0] == {"role": "system", "content": "a\nb"}


# Templates that loop over a message's content parts (multimodal-style ones): vLLM passes them the parts
PARTS_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{% for p in m['content'] %}[{{ p.text }}]{% endfor %}"
                  "</{{ m.role }}>{% endfor %}")
PARTS_ATTR_TEMPLATE = "{% for m in messages %}{% for p in m.content %}({{ p['text'] }}){% endfor %}{% endfor %}"


def test_content_format_auto_gives_parts_to_a_template_that_loops_over_them(tokenizer):
    """vLLM's chat_template_content_format: auto detects a loop over message content (a string there would be
    iterated character by character), openai forces parts, string forces text."""
    conversation = [{"role": "system", "content": "Be brief"}, AGENT_HISTORY[0]]
    assert render_chat(tokenizer, conversation, PARTS_TEMPLATE) == \
        "<system>[Be brief]</system><user>[Weather in][Paris?]</user>"
    assert render_chat(tokenizer, conversation, PARTS_ATTR_TEMPLATE) == "(Be brief)(Weather in)(Paris?)"
    assert render_chat(tokenizer, conversation, TOOL_TEMPLATE, content_format="openai").startswith(
        "<system>[{'type': 'text', 'text': 'Be brief'}]</system>")
    # auto keeps text for a template that prints content whole; string forces it even for a looping one
    assert render_chat(tokenizer, conversation, TOOL_TEMPLATE).startswith("<system>Be brief</system>")
    assert render_chat(tokenizer, conversation, PARTS_TEMPLATE, content_format="string") == \
        "<system>[][][][][][][][]</system><user>" + "[]" * len("Weather in\nParis?") + "</user>"


def test_detect_content_format():
    from pagedllm.chat_template import detect_content_format
    assert detect_content_format(PARTS_TEMPLATE) == "openai" and detect_content_format(TOOL_TEMPLATE) == "string"
    assert detect_content_format(None) == "string" and detect_content_format("{% for") == "string"
    assert detect_content_format({"default": PARTS_TEMPLATE, "tool_use": TOOL_TEMPLATE}) == "openai"


def test_documents_and_tools_may_come_in_chat_template_kwargs(tokenizer):
    """vLLM passes chat_template_kwargs on to apply_chat_template, so users give documents (LLM.chat has no such
    argument) and tools there: they reach the template as the dedicated arguments do; given both ways, a 400."""
    template = ("{% for d in documents or [] %}<doc {{ d.title }}>{% endfor %}{% for t in tools or [] %}"
                "<tool {{ t.function.name }}>{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}")
    docs, tools = [{"title": "a", "text": "x"}], [{"type": "function", "function": {"name": "f"}}]
    msgs = [{"role": "user", "content": "hi"}]
    want = "<doc a><tool f>hi"
    assert render_chat(tokenizer, msgs, template, chat_template_kwargs={"documents": docs, "tools": tools}) == want
    assert render_chat(tokenizer, msgs, template, tools=tools, documents=docs) == want
    with pytest.raises(ChatTemplateError, match="documents is given twice") as e:
        render_chat(tokenizer, msgs, template, chat_template_kwargs={"documents": docs}, documents=docs)
    assert e.value.param == "chat_template_kwargs"
