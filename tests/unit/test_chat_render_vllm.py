"""A chat request's prompt as vLLM 0.26 renders it, through the server's renderer (server/chat.py) and real chat
templates (Qwen3's, Llama 3.1's): each expected text is the one vLLM's chat_utils/renderer gives for the request."""
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from pagedllm.chat_template import render_chat
from pagedllm.server import chat
from pagedllm.server.errors import APIError
from pagedllm.server.protocol import ChatCompletionRequest

CONFIGS = "/work/shared/model-configs"
USER = {"role": "user", "content": "Hi"}


@pytest.fixture(scope="module")
def qwen3():
    return AutoTokenizer.from_pretrained(f"{CONFIGS}/Qwen--Qwen3-0.6B")


@pytest.fixture(scope="module")
def llama31():
    return AutoTokenizer.from_pretrained(f"{CONFIGS}/meta-llama--Llama-3.1-8B-Instruct")


def render(tokenizer, body: dict, **server) -> str:
    """The prompt text of a chat request, as the server renders it (its flags in `server`)."""
    ctx = SimpleNamespace(**{"chat_template": None, "trust_request_chat_template": False, "tokenizer": tokenizer,
                             "exclude_tools_when_tool_choice_none": False, "default_chat_template_kwargs": None,
                             "chat_template_content_format": "auto", **server})
    return chat._chat_text(ctx, ChatCompletionRequest.model_validate(body))


def refused(tokenizer, body: dict, **server) -> APIError:
    with pytest.raises(APIError) as e:
        render(tokenizer, body, **server)
    assert e.value.status == 400
    return e.value


def test_tools_reach_the_template_as_vllm_dumps_them(qwen3, llama31):
    """vLLM gives the template each tool as its pydantic model dumps it: a function's description and parameters
    as null when the client left them out (strict only when set), which tojson writes into the prompt."""
    body = {"messages": [USER], "tools": [{"type": "function", "function": {"name": "now"}},
                                          {"type": "function", "function": {"name": "w", "strict": True,
                                                                            "parameters": {"type": "object"}}}]}
    text = render(qwen3, body)
    assert ('<tools>\n{"type": "function", "function": {"name": "now", "description": null, "parameters": null}}\n'
            '{"type": "function", "function": {"name": "w", "description": null, "parameters": {"type": "object"}, '
            '"strict": true}}\n</tools>') in text
    text = render(llama31, body)
    assert ('{\n    "type": "function",\n    "function": {\n        "name": "now",\n        "description": null,\n'
            '        "parameters": null\n    }\n}') in text


def _called(arguments) -> dict:
    call = {"id": "c1", "type": "function", "function": {"name": "w", "arguments": arguments}}
    return {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "18C"}]}


@pytest.mark.parametrize("arguments, written", [
    ('{"city": "Paris"}', '{"city": "Paris"}'), ("[1, 2]", "[1, 2]"), ('"abc"', '"abc"'), ("null", "{}"),
    ("", "{}"), (None, "{}")])
def test_tool_call_arguments_reach_the_template_parsed_as_vllm_does(llama31, arguments, written):
    """vLLM json.loads a call's arguments for the template, whatever JSON they hold (null and none as {}); Llama
    3.1 writes them with tojson, so an array or a string kept as text came out differently ("[1, 2]" quoted)."""
    assert f'<|start_header_id|>assistant<|end_header_id|>\n\n{{"name": "w", "parameters": {written}}}<|eot_id|>' \
        in render(llama31, _called(arguments))


@pytest.mark.parametrize("arguments", ["not json", '{"city": ', "[" * 100_000])
def test_tool_call_arguments_that_are_not_json_are_a_400_naming_them(qwen3, arguments):
    """vLLM's json.loads of them fails: a 400 (a RecursionError past the decoder's depth, its 500), here naming
    the field; they were given to the template as text, a prompt vLLM never renders."""
    e = refused(qwen3, _called(arguments))
    assert e.param == "messages.1.tool_calls.0.function.arguments" and "JSON" in e.message


def test_a_tool_call_reaches_the_template_with_its_keys_in_vllms_order(qwen3):
    """vLLM's request validation rebuilds each call in its TypedDicts' key order (id, function {arguments, name},
    type), whatever the client's: Mistral's templates write `tool_call.function | tojson`, whose keys came out in
    the client's order (name first) here."""
    template = "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c | tojson }}{% endfor %}{% endfor %}"
    call = {"type": "function", "function": {"name": "w", "arguments": '{"a": 1}'}, "id": "c1"}
    body = {"chat_template": template, "add_generation_prompt": False,
            "messages": [USER, {"role": "assistant", "content": None, "tool_calls": [call]}]}
    assert render(qwen3, body, trust_request_chat_template=True) == \
        '{"id": "c1", "function": {"arguments": {"a": 1}, "name": "w"}, "type": "function"}'


# Shows each message's fields as the template gets them (undefined ones print empty).
FIELDS_TEMPLATE = ("{% for m in messages %}{{ m.role }}|{{ m.tool_call_id }}|{{ m.tool_calls }}|"
                   "{{ m.reasoning_content }}|{{ m.content }};{% endfor %}")


def test_each_role_brings_only_its_own_fields_to_the_template(qwen3):
    """vLLM's conversation keeps tool_calls and reasoning on assistant messages and tool_call_id on tool ones:
    the same fields sent on another role never reach the template (they did here)."""
    call = {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
    body = {"chat_template": FIELDS_TEMPLATE, "add_generation_prompt": False, "messages": [
        {"role": "user", "content": "x", "tool_call_id": "c0", "reasoning": "r", "tool_calls": [call]},
        {"role": "assistant", "content": "y", "tool_call_id": "c0", "reasoning_content": "r"},
        {"role": "tool", "content": "z", "tool_call_id": "c1", "reasoning": "r"}]}
    assert render(qwen3, body, trust_request_chat_template=True) == "user||||x;assistant|||r|y;tool|c1|||z;"


def test_a_tool_answer_stays_text_in_the_openai_content_format(qwen3):
    """In the openai content format (a template that loops over content) vLLM still gives a tool message its
    text, its parts joined by newlines: templates write a tool's answer as text."""
    template = ("{% for m in messages %}{{ m.role }}:{% if m.content is string %}'{{ m.content }}'{% else %}"
                "{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endif %};{% endfor %}")
    call = {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
    body = {"chat_template": template, "add_generation_prompt": False, "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1",
         "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "tool", "tool_call_id": "c1", "content": None}]}
    assert render(qwen3, body, trust_request_chat_template=True) == "user:[x];assistant:;tool:'a\nb';tool:'';"


def test_developer_messages_are_system_ones_for_a_template_without_the_role(qwen3, llama31):
    """vLLM turns developer messages into system ones when the template does not name the role, and merges the
    system messages into one first one: Qwen3's template dropped a developer message, Llama 3.1's wrote a
    "developer" header."""
    body = {"messages": [{"role": "developer", "content": "Be terse"}, USER]}
    assert render(qwen3, body) == "<|im_start|>system\nBe terse<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                                  "<|im_start|>assistant\n"
    body = {"messages": [{"role": "system", "content": "S"}, {"role": "developer", "content": "D"}, USER]}
    assert render(qwen3, body).startswith("<|im_start|>system\nS\n\nD<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    body = {"messages": [USER, {"role": "assistant", "content": "A"}, {"role": "developer", "content": "D"}, USER]}
    assert render(llama31, body) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nD<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # a template that names the role gets it as sent
    template = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}{# 'developer' #}"
    body = {"messages": [USER, {"role": "developer", "content": "D"}], "chat_template": template}
    assert render(qwen3, body, trust_request_chat_template=True) == "user:Hi;developer:D;"
    assert render(qwen3, {**body, "chat_template": template[:-17]}, trust_request_chat_template=True) == \
        "system:D;user:Hi;"


@pytest.mark.parametrize("template", [
    # a loop control ({% break %}) or transformers' {% generation %}: a plain jinja2 environment cannot parse them
    "{% for m in messages %}{% for p in m['content'] %}[{{ p.text }}]{% if loop.last %}{% break %}{% endif %}"
    "{% endfor %}{% endfor %}",
    "{% for m in messages %}{% generation %}{% for p in m['content'] %}[{{ p.text }}]{% endfor %}{% endgeneration %}"
    "{% endfor %}",
    # the content through a variable, or through a filter; the messages through a variable
    "{% for m in messages %}{% set content = m['content'] %}{% for p in content %}[{{ p.text }}]{% endfor %}"
    "{% endfor %}",
    "{% for m in messages %}{% for p in m.content | selectattr('type', 'equalto', 'text') %}[{{ p.text }}]"
    "{% endfor %}{% endfor %}",
    "{% set turns = messages | list %}{% for m in turns %}{% for p in m.content %}[{{ p.text }}]{% endfor %}"
    "{% endfor %}"])
def test_auto_content_format_finds_the_loops_vllm_finds(qwen3, template):
    """vLLM's detection of a template that loops over a message's content follows variables, filters and the
    extensions transformers renders with: these templates get the parts (they iterated the text's characters)."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "chat_template": template, "add_generation_prompt": False}
    assert render(qwen3, body, trust_request_chat_template=True) == "[Hi]"


@pytest.mark.parametrize("template", [
    "{% set first = messages[0] %}{% for p in first.content %}{{ p }}{% endfor %}",
    "{% for t in tools or [] %}{% for p in t.content %}{% endfor %}{% endfor %}{{ messages[0].content }}"])
def test_auto_content_format_ignores_the_loops_vllm_ignores(qwen3, template):
    """A message taken by index, or a loop over something else's content: vLLM's detection says string."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "chat_template": template, "add_generation_prompt": False}
    assert render(qwen3, body, trust_request_chat_template=True) == "Hi"


def test_auto_content_format_reads_the_template_that_renders(qwen3):
    """Of a tokenizer's named templates, the one that renders decides (tool_use with tools, as transformers and
    vLLM choose it), not the default one."""
    tokenizer = AutoTokenizer.from_pretrained(f"{CONFIGS}/Qwen--Qwen3-0.6B")
    tokenizer.chat_template = {"default": "{% for m in messages %}{{ m.content }}{% endfor %}",
                               "tool_use": "{% for m in messages %}{% for p in m.content %}[{{ p.text }}]{% endfor %}"
                                           "{% endfor %}"}
    body = {"messages": [USER], "add_generation_prompt": False}
    assert render(tokenizer, body) == "Hi"
    assert render(tokenizer, {**body, "tools": [{"type": "function", "function": {"name": "f"}}]}) == "[Hi]"


def test_reasoning_effort_wins_over_the_template_variable_of_that_name(qwen3):
    """vLLM merges the request's reasoning_effort over chat_template_kwargs: the field is what the template gets
    (enable_thinking still comes from chat_template_kwargs where it is set there)."""
    body = {"messages": [USER], "chat_template": "{{ reasoning_effort }}/{{ enable_thinking }}",
            "reasoning_effort": "high", "chat_template_kwargs": {"reasoning_effort": "low"}}
    assert render(qwen3, body, trust_request_chat_template=True) == "high/True"
    body["chat_template_kwargs"]["enable_thinking"] = False
    assert render(qwen3, body, trust_request_chat_template=True) == "high/False"


def test_a_template_variable_sent_as_null_or_auto_is_unset(qwen3):
    """vLLM's merge of chat_template_kwargs over --default-chat-template-kwargs (and its tools) skips values null
    and "auto": the server's default stays, else the template has no such variable. Qwen3 with the default
    enable_thinking false kept thinking on for {"enable_thinking": null}."""
    body = {"messages": [USER], "chat_template_kwargs": {"enable_thinking": None}}
    assert render(qwen3, body, default_chat_template_kwargs={"enable_thinking": False}).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    body = {"messages": [USER], "chat_template": "{{ mode is defined }}/{{ effort }}",
            "chat_template_kwargs": {"mode": None, "effort": "auto"}}
    assert render(qwen3, body, trust_request_chat_template=True) == "False/"
    assert render(qwen3, body, trust_request_chat_template=True, default_chat_template_kwargs={"effort": "low"}) \
        == "False/low"


def test_an_empty_request_chat_template_is_the_servers(qwen3):
    """vLLM renders with `request.chat_template or` the server's template: "" is the model's template (it was
    rendered as the template: an empty prompt, a 400 naming messages); untrusted it is still refused."""
    body = {"messages": [USER], "chat_template": ""}
    assert render(qwen3, body, trust_request_chat_template=True) == render(qwen3, {"messages": [USER]})
    assert refused(qwen3, body).param == "chat_template"


def test_an_empty_documents_list_reaches_the_template_as_sent(qwen3):
    """vLLM gives the template documents [] when the request sends [] (not none: null is unset), and no tools
    (None) when it sends none; pagedllm gave None for [] (`documents is none` differs)."""
    template = "{{ documents is none }}|{{ tools is none }}"
    body = {"messages": [USER], "chat_template": template, "documents": []}
    assert render(qwen3, body, trust_request_chat_template=True) == "False|True"
    assert render(qwen3, {**body, "documents": None}, trust_request_chat_template=True) == "True|True"


def test_empty_text_parts_are_left_out_of_the_text(qwen3):
    """In the string content format vLLM joins a message's text parts leaving the empty ones out: ["", "p"] is
    "p", where pagedllm wrote "\\np"."""
    parts = [{"type": "text", "text": ""}, {"type": "text", "text": "p"}, {"type": "text", "text": ""}]
    assert render(qwen3, {"messages": [{"role": "user", "content": parts}]}) == \
        "<|im_start|>user\np<|im_end|>\n<|im_start|>assistant\n"


def test_a_model_without_a_chat_template_is_a_400_unless_one_is_given():
    """vLLM's ChatTemplateResolutionError (a 400): a tokenizer without a chat template needs --chat-template or,
    trusted, the request's own; chat and /tokenize alike."""
    from conftest import DEMO_DIR

    from pagedllm.server.protocol import TokenizeRequest
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_DIR))
    assert not tokenizer.chat_template
    e = refused(tokenizer, {"messages": [USER]})
    assert e.param == "messages" and "--chat-template" in e.message
    assert render(tokenizer, {"messages": [USER]}, chat_template="{{ messages[0].content }}") == "Hi"
    assert render(tokenizer, {"messages": [USER], "chat_template": "{{ messages[0].content }}"},
                  trust_request_chat_template=True) == "Hi"
    ctx = SimpleNamespace(chat_template=None, trust_request_chat_template=False, tokenizer=tokenizer,
                          exclude_tools_when_tool_choice_none=False, default_chat_template_kwargs=None,
                          chat_template_content_format="auto")
    with pytest.raises(APIError) as e:
        chat._chat_text(ctx, TokenizeRequest.model_validate({"messages": [USER]}))
    assert e.value.status == 400 and e.value.param == "messages"


def test_plain_strings_in_a_content_list_are_text_parts(qwen3):
    """vLLM's content parts may be plain strings (its chat_utils reads one as a text part): ["a", {text "b"}]
    renders "a\\nb" in the string format and two text parts in the openai one (it was a 400 naming the part)."""
    content = ["a", {"type": "text", "text": "b"}, ""]
    assert render(qwen3, {"messages": [{"role": "user", "content": content}]}) == \
        "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    template = "{% for m in messages %}{% for p in m.content %}[{{ p.type }}:{{ p.text }}]{% endfor %}{% endfor %}"
    body = {"messages": [{"role": "user", "content": content}], "chat_template": template,
            "add_generation_prompt": False}
    assert render(qwen3, body, trust_request_chat_template=True) == "[text:a][text:b][text:]"


def test_refusal_thinking_and_responses_text_parts_render_as_vllms_text(qwen3):
    """vLLM 0.26's chat_utils reads refusal, thinking (its "closed" unrendered), input_text and output_text parts
    as text, leaves out a text or refusal part whose text is null, and gives a tool_reference part to the template
    (its name as the string format's text); each was a 400 here."""
    content = [{"type": "refusal", "refusal": "r"}, {"type": "thinking", "thinking": "h", "closed": False},
               {"type": "input_text", "text": "i"}, {"type": "output_text", "text": "o"},
               {"type": "text", "text": None}, {"type": "refusal", "refusal": None},
               {"type": "tool_reference", "name": "f"}, {"type": "text", "text": "t"}]
    assert render(qwen3, {"messages": [{"role": "user", "content": content}]}) == \
        "<|im_start|>user\nr\nh\ni\no\nf\nt<|im_end|>\n<|im_start|>assistant\n"
    template = ("{% for m in messages %}{{ m.role }}:{% if m.content is string %}'{{ m.content }}'{% else %}"
                "{% for p in m.content %}[{{ p.type }}:{{ p.text or p.name }}]{% endfor %}{% endif %};{% endfor %}")
    tool = {"role": "tool", "tool_call_id": "c", "content": [{"type": "tool_reference", "name": "f"}, "t"]}
    body = {"messages": [{"role": "user", "content": content}, tool], "chat_template": template,
            "add_generation_prompt": False}
    assert render(qwen3, body, trust_request_chat_template=True) == (
        "user:[text:r][text:h][text:i][text:o][tool_reference:f][text:t];tool:[tool_reference:f][text:t];")


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                  {"type": "input_image", "image_url": "https://x/y.png", "detail": "auto"},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
def test_media_parts_are_a_400_naming_the_part(qwen3, part):
    """A text-only model: vLLM's media parts need a multimodal one, refused naming the part's type."""
    e = refused(qwen3, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, part]}]})
    assert e.param == "messages.0.content.1.type" and "multimodal" in e.message


def test_a_parts_own_keys_are_dropped_as_vllms_request_validation_drops_them(qwen3):
    """vLLM's request validates parts as TypedDicts, which drop a key they do not declare (pydantic's default):
    the part the openai content format gives the template has no cache_control (it had here, from chat_utils'
    extra fields, which only LLM.chat's unvalidated parts keep), and the string format writes only the text."""
    content = [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}, "name": "n", "image_url": "u"},
               {"type": "refusal", "refusal": "r", "colour": "red"},
               {"type": "thinking", "thinking": "h", "closed": True, "signature": "s"},
               {"type": "tool_reference", "name": "f", "extra": 1}]
    template = "{% for m in messages %}{% for p in m.content %}{{ p | dictsort }};{% endfor %}{% endfor %}"
    body = {"messages": [{"role": "user", "content": content}], "chat_template": template,
            "add_generation_prompt": False}
    assert render(qwen3, body, trust_request_chat_template=True) == (
        "[('text', 'a'), ('type', 'text')];[('text', 'r'), ('type', 'text')];[('text', 'h'), ('type', 'text')];"
        "[('name', 'f'), ('type', 'tool_reference')];")
    assert render_chat(qwen3, [{"role": "user", "content": content}], template, add_generation_prompt=False) == (
        "[('cache_control', {'type': 'ephemeral'}), ('text', 'a'), ('type', 'text')];"
        "[('colour', 'red'), ('text', 'r'), ('type', 'text')];"
        "[('signature', 's'), ('text', 'h'), ('type', 'text')];[('name', 'f'), ('type', 'tool_reference')];")
    assert render(qwen3, {"messages": [{"role": "user", "content": content}]}) == \
        "<|im_start|>user\na\nr\nh\nf<|im_end|>\n<|im_start|>assistant\n"


def test_a_responses_developer_item_merges_with_the_instructions_as_vllms(qwen3):
    """vLLM's Responses path gives the renderer a developer input item as a developer message: for a template
    without the role it becomes a system one, merged with the instructions' system message into one first one.
    Here it was made a system message up front, never merged: Qwen3 got two system turns."""
    from pagedllm.server import responses_input, responses_request
    req = responses_request.ResponsesRequest.model_validate({"instructions": "I", "input": [
        {"role": "developer", "content": "D"}, {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "input_text", "text": "E"}]}]})
    chat_req = responses_input.to_chat(req, responses_input._messages(req, []))
    ctx = SimpleNamespace(chat_template=None, trust_request_chat_template=False, tokenizer=qwen3,
                          exclude_tools_when_tool_choice_none=False, default_chat_template_kwargs=None,
                          chat_template_content_format="auto")
    assert chat._chat_text(ctx, chat_req) == ("<|im_start|>system\nI\n\nD\n\nE<|im_end|>\n<|im_start|>user\nHi"
                                              "<|im_end|>\n<|im_start|>assistant\n")


def test_a_responses_items_text_parts_reach_the_template_as_vllms_parts(qwen3):
    """vLLM's Responses path gives the renderer a message item's (and a function_call_output's) parts as they
    are: the string format leaves an empty part out of the join, the openai one gets each part. Here they were
    joined first ("a\\n\\nb"; one part "a\\n\\nb")."""
    from pagedllm.server import responses_input, responses_request
    parts = [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": ""},
             {"type": "input_text", "text": "b"}]
    body = {"input": [{"role": "user", "content": parts},
                      {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c", "output": parts}]}

    def rendered(template=None):
        req = responses_request.ResponsesRequest.model_validate(body)
        chat_req = responses_input.to_chat(req, responses_input._messages(req, []))
        ctx = SimpleNamespace(chat_template=template, trust_request_chat_template=False, tokenizer=qwen3,
                              exclude_tools_when_tool_choice_none=False, default_chat_template_kwargs=None,
                              chat_template_content_format="auto")
        return chat._chat_text(ctx, chat_req)
    assert rendered().startswith("<|im_start|>user\na\nb<|im_end|>\n")
    assert "<tool_response>\na\nb\n</tool_response>" in rendered()
    template = ("{% for m in messages %}{{ m.role }}:{% if m.content is string %}'{{ m.content }}'{% else %}"
                "{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endif %};{% endfor %}")
    assert rendered(template) == "user:[a][][b];assistant:;tool:'a\n\nb';"
