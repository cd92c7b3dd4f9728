"""/v1/completions streamed, chunk by chunk and field by field, against vLLM 0.26's completion_stream_generator:
which fields a chunk's choice carries, null or not, and its logprobs' text offsets. In process, on the DELTA
outputs of test_chunk_json (no server)."""
import json

from pagedllm.server import completions
from pagedllm.server.protocol import CompletionRequest
from pagedllm.server.serving import merge
from server.test_chunk_json import CTX, TEXTS, _chunks, _outputs, _stream


def _choices(req: CompletionRequest, outputs_of_each_prompt: list[list]) -> list[dict]:
    texts = [""] * len(outputs_of_each_prompt)
    chunks = _chunks(completions._stream(CTX, req, "cmpl-1", texts, 4,
                                         merge([_stream(outs) for outs in outputs_of_each_prompt]), texts))
    return [c for chunk in chunks for c in json.loads(chunk[6:])["choices"]]


def test_every_choice_carries_its_token_id_fields_null_unless_asked():
    """vLLM's stream choice sets prompt_token_ids and token_ids always (serialized exclude_unset: they are sent,
    null without return_token_ids); they were left out."""
    for logprobs, echo in ((None, False), (1, False), (None, True)):
        req = CompletionRequest(prompt=[[1, 2, 3]], n=2, logprobs=logprobs, echo=echo, stream=True)
        choices = _choices(req, [_outputs(2, logprobs is not None)])
        assert len(choices) == 2 * len(TEXTS)
        for choice in choices:
            assert list(choice) == ["index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids",
                                    "token_ids"]
            assert choice["prompt_token_ids"] is None and choice["token_ids"] is None
    req = CompletionRequest(prompt=[[1, 2, 3]], stream=True, return_token_ids=True)
    choices = _choices(req, [_outputs(1, False)])
    assert [c["prompt_token_ids"] for c in choices] == [[1, 2, 3]] + [None] * (len(TEXTS) - 1)
    assert all(c["token_ids"] for c in choices)
