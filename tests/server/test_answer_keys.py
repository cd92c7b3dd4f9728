"""A non-streamed chat or completions answer has every key of vLLM 0.26's (its response model dumped whole, nulls
kept), in its order, at the top and in each choice: a client reading `answer["prompt_token_ids"]` or comparing key
sets sees the same. Driven through the routes' _full with made-up engine outputs, no model."""
import asyncio
from types import SimpleNamespace

from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.server import chat, completions
from pagedllm.server.chat_tools import plan_tools
from pagedllm.server.protocol import ChatCompletionRequest, CompletionRequest

CTX = SimpleNamespace(response_role="assistant", enable_prompt_tokens_details=False, served_name=lambda name: "m",
                      system_fingerprint=None, enable_per_request_metrics=False, engine=None)
# vLLM 0.26's ChatCompletionResponse / CompletionResponse fields, and their choices', in declaration order
CHAT_KEYS = ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
             "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params",
             "metrics"]
MESSAGE_KEYS = ["role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"]
CHAT_CHOICE_KEYS = ["index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts"]
COMPLETION_KEYS = ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
                   "kv_transfer_params", "ec_transfer_params", "metrics"]
COMPLETION_CHOICE_KEYS = ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                          "prompt_logprobs", "prompt_token_ids", "routed_experts"]


def _streams():
    async def one():
        yield RequestOutput("r-0", None, [1, 2, 3], None, [CompletionOutput(0, "hi", [5], None, None, "length")],
                            True, RequestMetrics(0.0))
    return [one()]


def test_chat_answer_has_vllms_keys_null_where_unset():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    answer = asyncio.run(chat._full(CTX, req, plan_tools(req, None, False), "chatcmpl-1", _streams(), [], None, "x"))
    assert list(answer) == CHAT_KEYS and list(answer["choices"][0]) == CHAT_CHOICE_KEYS
    assert all(answer[k] is None for k in CHAT_KEYS[5:] if k != "usage")
    assert answer["choices"][0]["token_ids"] is None and answer["choices"][0]["message"]["content"] == "hi"
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                               "prompt_tokens_details": None}   # vLLM's UsageInfo dumped whole
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], return_token_ids=True)
    answer = asyncio.run(chat._full(CTX, req, plan_tools(req, None, False), "chatcmpl-1", _streams(), [], None, "x"))
    assert answer["prompt_token_ids"] == [1, 2, 3] and answer["choices"][0]["token_ids"] == [5]


def test_completion_answer_has_vllms_keys_null_where_unset():
    req = CompletionRequest(prompt="hi")
    answer = asyncio.run(completions._full(CTX, req, "cmpl-1", [""], _streams(), [], [""]))
    assert list(answer) == COMPLETION_KEYS and list(answer["choices"][0]) == COMPLETION_CHOICE_KEYS
    assert all(answer[k] is None for k in COMPLETION_KEYS[5:] if k != "usage")
    assert all(answer["choices"][0][k] is None for k in COMPLETION_CHOICE_KEYS[5:])
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                               "prompt_tokens_details": None}
    req = CompletionRequest(prompt="hi", return_token_ids=True)
    choice = asyncio.run(completions._full(CTX, req, "cmpl-1", [""], _streams(), [], [""]))["choices"][0]
    assert choice["prompt_token_ids"] == [1, 2, 3] and choice["token_ids"] == [5]


def test_chat_message_has_vllms_keys_tool_calls_only_when_called():
    """vLLM's ChatMessage dumped whole: OpenAI's refusal, annotations, audio, function_call and vLLM's reasoning
    null; tool_calls left out when there are none (its serializer drops an empty list), also under a tool parser."""
    for tools in (None, [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]):
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools)
        plan = plan_tools(req, "hermes" if tools else None, bool(tools))
        message = asyncio.run(chat._full(CTX, req, plan, "chatcmpl-1", _streams(), [], None, "x"))["choices"][0][
            "message"]
        assert list(message) == MESSAGE_KEYS and message["content"] == "hi" and message["role"] == "assistant"
        assert all(message[k] is None for k in MESSAGE_KEYS[2:])


def test_answer_usage_details_have_vllms_keys():
    """Under --enable-prompt-tokens-details vLLM's PromptTokenUsageInfo dumped whole: created_cache_tokens (chat
    only) and multimodal_tokens null where unset."""
    ctx = SimpleNamespace(**{**vars(CTX), "enable_prompt_tokens_details": True})
    req = CompletionRequest(prompt="hi")
    answer = asyncio.run(completions._full(ctx, req, "cmpl-1", [""], _streams(), [], [""]))
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "created_cache_tokens": None,
                                                        "multimodal_tokens": None}
