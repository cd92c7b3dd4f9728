"""LLM's methods called as a script written for vLLM 0.26's LLM calls them: the same parameters, in the same
positions, with the same meaning; or a clear error naming what is not built and why."""
import pytest

from pagedllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=3)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def test_chat_parameters_by_position_mean_what_they_mean_in_vllm(llm):
    """vLLM's order: ..., chat_template, chat_template_content_format, add_generation_prompt, continue_final_message,
    tools, chat_template_kwargs. Here chat_template_content_format was keyword-only and tools came after
    chat_template_kwargs: by position, "string" became add_generation_prompt and the tools the template variables."""
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if tools %}T{{ tools | length }}{% endif %}"
                "{{ greeting }}{% if add_generation_prompt %}>{% endif %}")
    messages = [{"role": "user", "content": "hi"}]
    [out] = llm.chat(messages, GREEDY, False, None, template, "string", True, False, TOOLS, {"greeting": "G"})
    assert out.prompt == "hiT1G>"
    [out] = llm.chat(messages, GREEDY, False, None, template, "string", False, True, None, None)
    assert out.prompt == "hi"
