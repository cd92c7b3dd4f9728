"""A conversation through a chat template, as vLLM renders it: OpenAI's message shapes in, prompt text out.

LLM.chat and the server both render here, so the same conversation gives the same prompt offline and online.
"""
import functools
import inspect
import json

import jinja2

from transformers import PreTrainedTokenizerBase

from pagedllm import content_parts
from pagedllm.config import CONTENT_FORMATS

# apply_chat_template's own parameters (and the template's `messages`): not template variables, so
# chat_template_kwargs may not set them; they are refused, naming the request field to use instead (vLLM passes
# most of them on to apply_chat_template, where they would override the request's own fields, and drops
# chat_template and tokenize).
RESERVED_TEMPLATE_KWARGS = frozenset(
    set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}
) | {"messages"}


class ChatTemplateError(ValueError):
    """A conversation or option the template cannot render; `param` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def render_chat(tokenizer, conversation: list[dict], chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: dict | None = None, tools: list[dict] | None = None,
                documents: list[dict] | None = None, content_format: str = "auto") -> str:
    """The prompt text of `conversation`. continue_final_message leaves the last message open (no end of turn,
    no generation prompt) so the model continues it, as transformers and vLLM do. tools (OpenAI's
    [{"type": "function", "function": {...}}]) go to the template, which describes them to the model;
    documents (dicts, e.g. {"title", "text"}) too, for templates that cite them (RAG)."""
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true: the first "
                                "continues the last message, the second starts a new one", "continue_final_message")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise ChatTemplateError(f"chat_template_kwargs must be a dict of template variables, got "
                                f"{type(chat_template_kwargs).__name__}", "chat_template_kwargs")
    if content_format not in CONTENT_FORMATS:
        raise ChatTemplateError(f"chat_template_content_format must be one of {CONTENT_FORMATS}, got "
                                f"{content_format!r}", "chat_template_content_format")
    kwargs = dict(chat_template_kwargs or {})
    tools, documents = _own_argument(kwargs, "tools", tools), _own_argument(kwargs, "documents", documents)
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise ChatTemplateError(f"chat_template_kwargs may not set {reserved[0]!r}: it is not a template variable "
                                f"(use the request field of that name where there is one)", "chat_template_kwargs")
    template = template_text(tokenizer, chat_template, tools)
    if content_format == "auto":
        content_format = detect_content_format(template)
    messages = [template_message(m, content_format, f"messages.{i}") for i, m in enumerate(conversation)]
    if any(m["role"] == "developer" for m in messages) and not takes_developer(template):
        messages = _developer_as_system(messages)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tools=tools,
                                             documents=documents, **kwargs)
    except jinja2.TemplateSyntaxError as e:   # the template itself, not these messages
        raise ChatTemplateError(f"the chat template does not parse: {e}", "chat_template") from e
    except Exception as e:   # a template that rejects these messages (roles, order) raises here
        raise ChatTemplateError(f"the chat template failed on these messages: {e}", "messages") from e


def template_text(tokenizer, chat_template: str | None, tools) -> str | None:
    """The template that renders: the given one (or one of the tokenizer's named templates, by name), else the
    tokenizer's (its tool_use one when tools are given, as transformers and vLLM choose); None without one."""
    try:
        return tokenizer.get_chat_template(chat_template, tools=tools)
    except ValueError:   # no template: apply_chat_template says so, as the error of the request
        return chat_template


def content_format(tokenizer, chat_template: str | None, tools, given: str) -> str:
    """The content format the messages reach the template in: the given one, "auto" resolved for the template
    that renders (detect_content_format)."""
    return detect_content_format(template_text(tokenizer, chat_template, tools)) if given == "auto" else given


def takes_developer(template: str | None) -> bool:
    """Whether a template knows OpenAI's developer role: vLLM's test, the role's name quoted in it."""
    return template is not None and ('"developer"' in template or "'developer'" in template)


def _developer_as_system(messages: list[dict]) -> list[dict]:
    """vLLM's rendering of developer messages for a template that does not know the role (most: Qwen3's drops
    such a message, Llama 3's writes a "developer" header): they become system messages, and when a system message
    is then not first, or there are several, all are merged into one first system message, their texts (those not
    empty) joined by blank lines (templates such as Qwen's take a system message only first)."""
    messages = [m if m["role"] != "developer" else
                {k: v for k, v in m.items() if k != "tools"} | {"role": "system"} for m in messages]
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if not systems or systems == [0]:
        return messages
    texts = [_text(messages[i]["content"]) for i in systems]
    return [{"role": "system", "content": "\n\n".join(t for t in texts if t)},
            *(m for m in messages if m["role"] != "system")]


def _text(content) -> str:
    """A message's content as text: its text parts joined by newlines (content in the openai format; a tool
    reference has no text, and vLLM's merge leaves it out; a null text too, where vLLM's join fails)."""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content or () if p.get("text") is not None)


def _own_argument(kwargs: dict, name: str, given):
    """tools and documents are template inputs that apply_chat_template takes as parameters: vLLM users pass them
    in chat_template_kwargs too (LLM.chat has no documents argument), so they are taken from there as those,
    unless also given as such."""
    if name not in kwargs:
        return given
    if given:
        raise ChatTemplateError(f"{name} is given twice: in chat_template_kwargs and as the request's own field",
                                "chat_template_kwargs")
    return kwargs.pop(name)


def detect_content_format(template) -> str:
    """vLLM's --chat-template-content-format "auto": how a message's content reaches the template. "openai" (a
    list of {"type": "text", "text": ...} parts) when the template loops over a message's content, as vLLM's
    detection decides (_loops_over_content); else "string", its text (also for a template that does not parse:
    its error comes when it renders)."""
    if isinstance(template, dict):   # a tokenizer's named templates: their default's
        template = template.get("default")
    return _detect(template) if isinstance(template, str) else "string"


class _Undecided(Exception):
    """A loop or assignment vLLM's detection does not follow (a tuple target): it falls back to "string"."""


@functools.lru_cache(maxsize=64)
def _detect(template: str) -> str:
    try:
        tree = _parse(template)
    except Exception:   # as vLLM: a template that does not compile is rendered as "string"
        return "string"
    try:
        return "openai" if _loops_over_content(tree) else "string"
    except _Undecided:
        return "string"


def _parse(template: str) -> jinja2.nodes.Template:
    """The template's syntax tree in transformers' environment, as vLLM parses it: with its extensions
    ({% generation %}, {% break %} / {% continue %}), which a plain jinja2 environment cannot parse."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:   # an older or newer transformers: its sandbox with loop controls
        import jinja2.sandbox
        return jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    return _compile_jinja_template(template).environment.parse(template)


def _loops_over_content(tree: jinja2.nodes.Template) -> bool:
    """Whether the template loops over a message's content, by vLLM's rules: the variables holding the messages
    are `messages` and those set from one of them (through filters, tests and slices: `messages[1:]`,
    `messages | selectattr(...)`); a message is the target of a loop over one of those; a loop over a message's
    content is one over `message['content']` or `message.content` (again through filters, tests and slices), or
    over a variable named `content`. A message taken by index (`messages[0]`) does not count, as in vLLM."""
    nodes = jinja2.nodes
    loops = list(tree.find_all(nodes.For))

    def unwrapped(node):
        while isinstance(node, (nodes.Filter, nodes.Test)) or (
                isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)):
            if node.node is None:   # a filter block ({% filter %}): no value it filters
                return None
            node = node.node
        return node

    def names(node, key=None) -> str | None:
        """The variable node reads (node: var, or var['key'] / var.key with key), else None."""
        node = unwrapped(node)
        if key is not None:
            if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == key:
                node = node.node
            elif isinstance(node, nodes.Getattr) and node.attr == key:
                node = node.node
            else:
                return None
        return node.name if isinstance(node, nodes.Name) and node.ctx == "load" else None

    def target(node) -> str:
        if not isinstance(node, nodes.Name):
            raise _Undecided
        return node.name

    message_lists, queue = {"messages"}, ["messages"]
    while queue:   # every variable set from a message list
        source = queue.pop()
        for assign in tree.find_all(nodes.Assign):
            if names(assign.node) == source and (name := target(assign.target)) not in message_lists:
                message_lists.add(name)
                queue.append(name)
    messages = {target(loop.target) for loop in loops if names(loop.iter) in message_lists}
    for loop in loops:
        if names(loop.iter, "content") in messages or (
                isinstance(loop.iter, nodes.Name) and loop.iter.name == "content"):
            target(loop.target)
            return True
    return False


def template_message(message: dict, content_format: str = "string", at: str = "messages") -> dict:
    """One OpenAI message (at: where it is in the request) as vLLM gives it to templates: its content as text
    (its parts that are not empty joined by newlines, null as "") in vLLM's "string" content format, as a list of
    parts (a string one text part, null none; content_parts reads them) in "openai", where a tool's answer stays
    text (all its parts joined) unless it holds a tool reference; then only the fields of its role, as vLLM's
    conversation has them: an assistant's tool_calls (each call's JSON `arguments` parsed, as tool-use templates
    write `arguments | tojson`; arguments that are not JSON are a ChatTemplateError naming them) and its reasoning
    (`reasoning`, under both names), a tool's tool_call_id, any message's name (a string), a developer's tools."""
    role = message.get("role")
    content = message.get("content")
    if isinstance(content, list):
        try:
            parts = content_parts.template_parts(content, f"{at}.content")
        except content_parts.ContentPartError as e:
            raise ChatTemplateError(str(e), e.param) from e
    elif content is None or isinstance(content, str):
        parts = [] if content is None else [{"type": "text", "text": content}]
    else:
        raise ChatTemplateError(f"{at}.content must be a string or a list of parts", f"{at}.content")
    if content_format == "openai" and (role != "tool" or any(p["type"] != "text" for p in parts)):
        result = {"role": role, "content": parts}   # a tool's answer with a tool reference too, for the template
    elif content_format == "openai":   # vLLM joins a tool's text parts in either format (its answer is text);
        # a null one is left out, where vLLM's join fails (a TypeError, its 400)
        result = {"role": role, "content": _text(parts)}
    else:   # the string format: empty parts are left out of the join, as vLLM's
        texts = (content_parts.part_text(p) for p in parts)
        result = {"role": role, "content": "\n".join(text for text in texts if text)}
    if role == "assistant" and message.get("tool_calls") is not None:
        if not isinstance(message["tool_calls"], list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in message["tool_calls"]):
            raise ChatTemplateError("tool_calls must be a list of {'type': 'function', 'function': {'name': ..., "
                                    "'arguments': ...}}", "messages")
        calls = [{**c, "function": {**c["function"], "arguments": tool_call_arguments(
            c["function"].get("arguments"), f"{at}.tool_calls.{j}.function.arguments")}}
            for j, c in enumerate(message["tool_calls"])]
        if calls:   # an empty list is left out: the template's plain assistant path, as vLLM
            result["tool_calls"] = calls
    # An assistant's reasoning sent back (vLLM's `reasoning`) reaches the template under both names, as vLLM
    # passes it: Qwen3's template reads reasoning_content. A message's own reasoning_content is not read (vLLM's
    # chat_utils reads `reasoning` only: LLM.chat's messages drop it; the server renames it to `reasoning`).
    reasoning = message.get("reasoning")
    if role == "assistant" and reasoning is not None:
        result["reasoning"] = result["reasoning_content"] = reasoning
    if role == "tool" and "tool_call_id" in message:
        result["tool_call_id"] = message["tool_call_id"]
    for name in ("name", "task"):
        if isinstance(message.get(name), str):
            result[name] = message[name]
    if role == "developer":
        result["tools"] = message.get("tools")
    return result


def tool_call_arguments(value, param: str):
    """A call's arguments as vLLM gives them to the template: none (or "") as {}, a JSON text as its value
    (null as {}; an array or a number too, as vLLM keeps them), a mapping as given. Text that is not JSON is
    vLLM's 400 (its json.loads fails), here naming the field."""
    if not value:
        return {}
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"{param} is not JSON ({e}): a tool call's arguments are a JSON text, which the "
                                    f"chat template is given parsed", param) from e
        except RecursionError as e:   # nested past the decoder's depth (vLLM's is a 500 there)
            raise ChatTemplateError(f"{param} is JSON nested too deeply to parse", param) from e
        return {} if parsed is None else parsed
    return value
