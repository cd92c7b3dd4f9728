"""/v1/completions streamed, chunk by chunk and field by field, against vLLM 0.26's completion_stream_generator:
which fields a chunk's choice carries, null or not, and its logprobs' text offsets. In process, on the DELTA
outputs of test_chunk_json (no server)."""
import json

from pagedllm.outputs import Logprob
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
    for logprobs in (None, 1):
        req = CompletionRequest(prompt=[[1, 2, 3]], n=2, logprobs=logprobs, stream=True)
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


def test_a_chunks_first_text_offset_is_the_length_of_the_text_streamed():
    """vLLM's streamed text_offset starts each chunk at the length of the choice's text so far (within a chunk
    the token strings add up), which is not the sum of the token strings before when they are not the text: a
    byte token's "\\ufffd", a "token_id:<id>" name (return_tokens_as_token_ids). Ours added up the strings."""
    starts = [sum(len(t) for t in TEXTS[:step]) for step in range(len(TEXTS))]
    for as_ids in (False, True):
        req = CompletionRequest(prompt=[[1, 2, 3]], logprobs=1, stream=True, return_tokens_as_token_ids=as_ids)
        choices = _choices(req, [_outputs(1, True)])
        assert [c["logprobs"]["text_offset"] for c in choices] == [[start] for start in starts]
        assert [c["text"] for c in choices] == TEXTS


def test_echoed_offsets_go_on_from_the_echoed_prompts_tokens():
    """With echo, vLLM's text so far leaves out the echoed prompt, so its offsets after the first chunk would start
    over below the first chunk's (a vLLM bug, not copied): they go on adding up the token strings, as the
    non-streamed answer's."""
    req = CompletionRequest(prompt=[[1, 2, 3]], logprobs=1, echo=True, stream=True)
    choices = _choices(req, [_outputs(1, True)])
    offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
    tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_an_echoed_choices_first_chunk_has_the_prompts_ids():
    """vLLM's stream returns the prompt's ids where it echoes the prompt: each choice's first chunk has
    prompt_token_ids with echo, return_token_ids or not (token_ids stay null without it)."""
    for n, logprobs in ((1, None), (2, 1)):
        req = CompletionRequest(prompt=[[1, 2, 3], [4]], n=n, logprobs=logprobs, echo=True, stream=True)
        choices = _choices(req, [_outputs(n, logprobs is not None) for _ in range(2)])
        firsts = {}
        for choice in choices:
            firsts.setdefault(choice["index"], choice["prompt_token_ids"])
            assert choice["token_ids"] is None
        assert firsts == {index: [1, 2, 3] for index in range(2 * n)}   # the fake outputs' prompt
        assert sum(c["prompt_token_ids"] is not None for c in choices) == 2 * n


def test_top_logprobs_keys_keep_the_positions_order_chosen_token_first():
    """vLLM 0.26's completion top_logprobs dict is built in the order the engine lists a position: the chosen
    token, then the top ones by rank. A sampled token ranked 3rd is the dict's first key (ours sorted by rank,
    so it came last). Tokens of the same text keep the likeliest logprob, where vLLM's comprehension keeps
    the last one written."""
    position = {9: Logprob(-3.0, 3, "c"), 5: Logprob(-0.5, 1, "a"), 6: Logprob(-1.0, 2, "b")}
    token, logprob, top = completions._entry(position, 9)
    assert (token, logprob, list(top.items())) == ("c", -3.0, [("c", -3.0), ("a", -0.5), ("b", -1.0)])
    _, _, top = completions._entry(position, 9, as_ids=True)
    assert list(top) == ["token_id:9", "token_id:5", "token_id:6"]
    same_text = {9: Logprob(-3.0, 3, "\ufffd"), 5: Logprob(-0.5, 1, "a"), 6: Logprob(-1.0, 2, "\ufffd")}
    assert list(completions._entry(same_text, 9)[2].items()) == [("\ufffd", -1.0), ("a", -0.5)]
