"""A chat template given by the user (`--chat-template`, `LLM(chat_template=...)`): a file, or the template text
itself, read and parsed once at start-up. Kept light (no transformers): the server's launch reads it."""
import os
from pathlib import Path


def read_chat_template(value: str | os.PathLike | None, name: str = "--chat-template") -> str | None:
    """The template's text. A value that names no file is a typo, not a template, when it has no Jinja tag and
    looks like a path (a .jinja name, a path separator), or has none of the characters a template has ("{", "}",
    a newline), as vLLM takes it: a name such as "chatml" (vLLM then looks among its built-in template files,
    which pagedllm does not ship) is refused, not used as the text."""
    if value is None:
        return None
    if Path(value).is_file():
        return _parsed(Path(value).read_text(), str(value), name)
    value = str(value)
    is_template = "{{" in value or "{%" in value
    looks_like_path = value.endswith((".jinja", ".jinja2", ".j2")) or "/" in value or os.sep in value
    if (not is_template and looks_like_path) or not any(c in value for c in "{}\n"):
        raise FileNotFoundError(f"{name} {value!r}: no such file (give a template file or the template text)")
    return _parsed(value, "its text", name)


def _parsed(template: str, where: str, name: str) -> str:
    """The template, checked to parse now (as transformers' sandbox reads it): a syntax error is the operator's,
    at start-up, not a 400 blamed on every chat request."""
    import jinja2.sandbox
    try:
        jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{name} ({where}) does not parse: {e.message} (line {e.lineno})") from e
    return template
