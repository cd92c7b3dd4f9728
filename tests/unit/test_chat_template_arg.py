"""--chat-template: a file or the template text; a path-like value naming no file is an error."""
import pytest

from pagedllm.cli import main
from pagedllm.chat_template_arg import read_chat_template as _read_chat_template

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_file_and_text(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    assert _read_chat_template(str(path)) == TEMPLATE
    assert _read_chat_template(TEMPLATE) == TEMPLATE
    assert _read_chat_template("{{ messages[0]['content'] }}/x.jinja") == "{{ messages[0]['content'] }}/x.jinja"
    assert _read_chat_template(None) is None


@pytest.mark.parametrize("value", ["missing.jinja", "templates/chat.txt", "chat.j2", "chatml", "tool_use",
                                   "template_chatml.jinja"])
def test_missing_file_is_an_error(tmp_path, value):
    with pytest.raises(FileNotFoundError, match="--chat-template .*: no such file"):
        _read_chat_template(str(tmp_path / value) if "/" in value else value)


def test_serve_exits_before_loading_the_model(tmp_path, capsys):
    missing = str(tmp_path / "chat.jinja")
    assert main(["serve", "--chat-template", missing]) == 2
    assert capsys.readouterr().err == f"error: --chat-template {missing!r}: no such file (give a template file " \
                                      f"or the template text)\n"


def test_a_value_without_template_characters_is_a_missing_file_as_in_vllm():
    """vLLM takes a value with no "{", "}" or newline that names no file for a (built-in) template's name, and
    refuses it when there is none: pagedllm used it as the template text, every prompt that word."""
    with pytest.raises(FileNotFoundError, match="--chat-template 'chatml': no such file"):
        _read_chat_template("chatml")
    assert _read_chat_template("User: hi\nAssistant:") == "User: hi\nAssistant:"   # text (a newline), as vLLM's
