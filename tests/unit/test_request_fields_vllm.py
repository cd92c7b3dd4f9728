"""Completions and chat request bodies as vLLM 0.26's protocol takes or refuses them, checked on the request models
alone (server/protocol.py), without an engine."""
import pytest

from pagedllm.server.errors import APIError
from pagedllm.server.protocol import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "Hi"}]


def test_a_prompt_list_is_bounded_as_vllms(monkeypatch):
    """vLLM refuses more than VLLM_MAX_COMPLETION_PROMPTS (1024) prompts in one request; a list of token ids is one
    prompt, whatever its length. Any number was taken here, each prompt a request in the engine."""
    for prompt in (["a"] * 1024, [[1, 2]] * 1024, list(range(5000))):
        CompletionRequest.model_validate({"prompt": prompt})
    for prompt in (["a"] * 1025, [[1, 2]] * 1025):
        with pytest.raises(APIError) as e:
            CompletionRequest.model_validate({"prompt": prompt})
        assert (e.value.status, e.value.param) == (400, "prompt")
        assert "1025" in e.value.message and "VLLM_MAX_COMPLETION_PROMPTS" in e.value.message
    monkeypatch.setenv("VLLM_MAX_COMPLETION_PROMPTS", "2")
    CompletionRequest.model_validate({"prompt": ["a", "b"]})
    with pytest.raises(APIError):
        CompletionRequest.model_validate({"prompt": ["a", "b", "c"]})


def test_chat_takes_return_assistant_tokens_mask_as_vllm_does():
    """vLLM 0.26's chat request has the field (its /render endpoints answer the mask; chat completions leave it
    out of the answer): it was a 400 "Unrecognized request argument" here."""
    for value in (True, False, None):
        ChatCompletionRequest.model_validate({"messages": MESSAGES, "return_assistant_tokens_mask": value})


def test_a_batch_of_conversations_takes_early_stopping_false_as_vllms():
    """vLLM 0.26's BatchChatCompletionRequest declares early_stopping (false by default), a beam search's field in
    a request that runs none: false was a 400 "Unrecognized request argument" here; true asks for what the batch
    cannot do, a 400 naming it (vLLM ignores it)."""
    from pagedllm.server.chat_batch import BatchChatCompletionRequest
    conversations = [MESSAGES, MESSAGES]
    for value in (False, None):
        req = BatchChatCompletionRequest.model_validate({"messages": conversations, "early_stopping": value})
        assert len(req.conversations()) == 2
    req = BatchChatCompletionRequest.model_validate({"messages": conversations, "early_stopping": True})
    with pytest.raises(APIError) as e:
        req.conversations()
    assert (e.value.status, e.value.param) == (400, "early_stopping")


@pytest.mark.parametrize("cls,extra", [(CompletionRequest, {"prompt": "a"}), (ChatCompletionRequest,
                                                                           {"messages": MESSAGES})])
@pytest.mark.parametrize("body,param", [({"temperature": 0.7}, "temperature"), ({"n": 0}, "n"),
                                        ({"length_penalty": float("inf")}, "length_penalty")])
def test_a_beam_search_value_is_refused_naming_the_request_field(cls, extra, body, param):
    """The beam search's own checks (BeamSearchParams') reach the client naming the request's field: they were
    400s with param null and a message naming BeamSearchParams.temperature / beam_width, which the request has
    not."""
    req = cls.model_validate({**extra, "use_beam_search": True, **body})
    with pytest.raises(APIError) as e:
        req.to_beam_search_params(4, 512)
    assert (e.value.status, e.value.param) == (400, param)
    assert e.value.message.startswith(param) and "BeamSearchParams" not in e.value.message
