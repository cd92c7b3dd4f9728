"""Structured output in the engine: constrained rows sample under their grammar's bitmask in any batch, the
matcher follows the tokens through preemption, chunked prefill, prefix caching and n > 1, and a constraint
that does not compile in time fails its request alone. (The schema corpus is in test_structured_output.py.)"""
import re
import time
from dataclasses import replace

import pytest

from pagedllm import LLM, SamplingParams

REGEX = r"(cat|dog)-[0-9]{2,4}\.(red|blue)"
PROMPTS = ["Once upon a time", "The little dog was", "Lily and Tom went to the park and", "One day"]


def _params(seed: int, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 24)
    return SamplingParams(temperature=1.0, seed=seed, structured_outputs={"regex": REGEX}, **kw)


def _texts(outputs) -> list[list[str]]:
    return [[c.text for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", log_stats_interval=0)


def test_regex_rows_mixed_with_plain_rows(llm):
    """Constrained and unconstrained rows in one batch: every constrained output full-matches (stop), and the
    plain greedy rows are what they are alone."""
    plain = SamplingParams(temperature=0.0, max_tokens=20)
    params = [_params(i) for i in range(6)] + [plain, plain]
    prompts = [PROMPTS[i % 4] for i in range(6)] + PROMPTS[:2]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o in outs[:6]:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0]
        assert re.fullmatch(REGEX, o.outputs[0].text), o.outputs[0].text
    alone = llm.generate(PROMPTS[:2], plain, use_tqdm=False)
    assert _texts(outs[6:]) == _texts(alone)


def test_seeded_constrained_output_is_the_same_alone_and_batched(llm):
    batched = llm.generate(PROMPTS, [_params(7 + i) for i in range(4)], use_tqdm=False)
    alone = [llm.generate([p], _params(7 + i), use_tqdm=False)[0] for i, p in enumerate(PROMPTS)]
    assert _texts(batched) == _texts(alone)


def test_preemption_chunked_prefill_prefix_caching_and_n(llm):
    """A tight KV cache (preemptions: recompute) and a small token budget (chunked prompts), n = 3 siblings
    sharing their prompt's blocks, prompts sharing prefixes: the same tokens as the roomy run."""
    long_prompts = [p + " there was a big red ball that rolled down the hill" * 3 for p in PROMPTS]
    params = [_params(100 + i, n=3, max_tokens=40) for i in range(4)]
    roomy = llm.generate(long_prompts, params, use_tqdm=False)
    tight = LLM(dtype="float32", log_stats_interval=0, num_gpu_blocks_override=14, max_num_batched_tokens=32,
                max_num_seqs=6)
    outs = tight.generate(long_prompts, params, use_tqdm=False)
    assert tight.engine.get_stats().num_preemptions > 0
    assert _texts(outs) == _texts(roomy)
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c


def test_length_and_ignore_eos(llm):
    """max_tokens first: finish_reason "length" (the text may be cut short). With ignore_eos the grammar's end
    still ends the request: nothing may follow a complete match."""
    cut = llm.generate(PROMPTS[:1], _params(1, max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 2
    done = llm.generate(PROMPTS[:1], _params(1, ignore_eos=True, max_tokens=60), use_tqdm=False)[0].outputs[0]
    assert done.finish_reason == "stop" and re.fullmatch(REGEX, done.text), done


def test_compile_past_its_time_limit_fails_that_request_alone(monkeypatch):
    """A compile slower than the limit (made slow here: a schema like vLLM #54003's runs for minutes) fails its
    request with a bad-request error while the rest of the batch runs; once it is done, the cached grammar
    serves the same constraint at once."""
    import pagedllm.structured_output.compiler as compiler
    real = compiler.compile_constraint

    def slow(c, params):
        time.sleep(3.0)
        return real(c, params)
    monkeypatch.setattr(compiler, "compile_constraint", slow)
    llm = LLM(dtype="float32", log_stats_interval=0, structured_outputs_compile_timeout=0.3)
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    start = time.perf_counter()
    outs = llm.generate(PROMPTS[:2], [_params(0), plain], use_tqdm=False)
    assert time.perf_counter() - start < 2.5    # the failure came at the limit, not after the compile
    assert outs[0].outputs[0].finish_reason == "error"
    assert outs[1].outputs[0].finish_reason == "length" and outs[1].outputs[0].text
    future = next(iter(llm.engine.core.structured.pool._cache.values()))
    future.result(timeout=30)
    again = llm.generate(PROMPTS[:1], _params(0), use_tqdm=False)[0].outputs[0]
    assert again.finish_reason == "stop" and re.fullmatch(REGEX, again.text)


def test_fields_that_leave_no_token_fail_the_request_alone(llm, caplog):
    """min_tokens past the end of a choice, or allowed_token_ids that miss every token the constraint allows:
    the request fails with an error naming the fields (the log says it), its neighbours run on."""
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    choice = {"choice": ["yes", "no"]}
    bad = [SamplingParams(temperature=0.0, max_tokens=12, min_tokens=8, structured_outputs=choice),
           SamplingParams(temperature=0.0, max_tokens=12, allowed_token_ids=[5, 6], structured_outputs=choice)]
    with caplog.at_level("WARNING", logger="pagedllm"):
        outs = llm.generate(PROMPTS[:3], [bad[0], plain, bad[1]], use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error", "length", "error"]
    assert outs[1].outputs[0].text == llm.generate(PROMPTS[1:2], plain, use_tqdm=False)[0].outputs[0].text
    assert "structured_outputs and min_tokens left no token" in caplog.text
    assert "structured_outputs and allowed_token_ids left no token" in caplog.text
    stats = llm.engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total


def test_a_constraint_that_matches_no_text_fails_as_the_request_s_fault(llm, caplog):
    """A regex with no text in its language (from the start, or after a first character): the request fails
    with an error naming the constraint, as a bad request (a 400 on the server), not as an engine bug; the
    tokens it was allowed are kept, and its neighbours run on."""
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    empty = [SamplingParams(temperature=1.0, seed=1, max_tokens=5, structured_outputs={"regex": rx})
             for rx in (r"[^\s\S]", r"a[^\s\S]")]
    with caplog.at_level("WARNING", logger="pagedllm"):
        outs = llm.generate(PROMPTS[:3], [empty[0], plain, empty[1]], use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error", "length", "error"]
    assert [outs[0].outputs[0].text, outs[2].outputs[0].text] == ["", "a"]
    assert caplog.text.count("structured_outputs.regex matches no text") == 2
    assert "engine bug" not in caplog.text


def test_constraint_starts_after_its_start_token(llm):
    """reasoning_end_token_id (what the server sets to a reasoning parser's `</think>`): the output is free up
    to that token, then follows the grammar; a row whose token never comes stays free."""
    tok = llm.get_tokenizer()
    end, other = tok.encode(" Once", add_special_tokens=False)[-1], tok.encode(" Lily", add_special_tokens=False)[-1]
    after = dict(structured_outputs={"regex": REGEX}, reasoning_end_token_id=end)
    forced_end = SamplingParams(temperature=1.0, seed=3, max_tokens=30, logit_bias={end: 100.0}, **after)
    [o] = llm.generate(PROMPTS[:1], forced_end, use_tqdm=False)
    ids = o.outputs[0].token_ids
    assert ids[0] == end and o.outputs[0].finish_reason == "stop", o.outputs[0]
    assert re.fullmatch(REGEX, tok.decode(ids[1:], skip_special_tokens=True)), ids
    # without it the same bias cannot act: the grammar holds from the first token
    [o] = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, seed=3, max_tokens=30, logit_bias={end: 100.0},
                                                   structured_outputs={"regex": REGEX}), use_tqdm=False)
    assert end not in o.outputs[0].token_ids and re.fullmatch(REGEX, o.outputs[0].text)
    # the start token never comes: free text, here the biased token (the grammar would refuse it)
    never = SamplingParams(temperature=1.0, seed=3, max_tokens=6, logit_bias={other: 100.0}, **after)
    [o] = llm.generate(PROMPTS[:1], never, use_tqdm=False)
    assert o.outputs[0].token_ids == [other] * 6 and o.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="reasoning_end_token_id must be None or an integer >= 0"):
        SamplingParams(structured_outputs={"regex": REGEX}, reasoning_end_token_id=-1)


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_thinking_token_budget_forces_the_end_token(llm, budget):
    """thinking_token_budget (vLLM's): after `budget` output tokens without reasoning_end_token_id, that token
    is the next one, whatever the sampler preferred (here it is banned by a bias); the constraint then starts.
    The same alone and batched with plain rows."""
    tok = llm.get_tokenizer()
    end = tok.encode(" Once", add_special_tokens=False)[-1]
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, logit_bias={end: -100.0},
                            reasoning_end_token_id=end, thinking_token_budget=budget,
                            structured_outputs={"regex": REGEX})
    [o] = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    ids = o.outputs[0].token_ids
    assert end not in ids[:budget] and ids[budget] == end, ids
    assert re.fullmatch(REGEX, tok.decode(ids[budget + 1:], skip_special_tokens=True)), ids
    # a budget the reasoning does not reach, or reached after the end came on its own: nothing forced
    free = SamplingParams(temperature=1.0, seed=5, max_tokens=8, reasoning_end_token_id=end,
                          thinking_token_budget=50)
    plain = SamplingParams(temperature=1.0, seed=5, max_tokens=8)
    ids_of = lambda p: [o.outputs[0].token_ids for o in llm.generate(PROMPTS, p, use_tqdm=False)]  # noqa: E731
    assert ids_of(free) == ids_of(plain)
    batched = llm.generate(PROMPTS * 2, [params] * 4 + [plain] * 4, use_tqdm=False)
    assert batched[0].outputs[0].token_ids == ids
    with pytest.raises(ValueError, match="thinking_token_budget must be set with reasoning_end_token_id"):
        SamplingParams(thinking_token_budget=3)


@pytest.mark.parametrize("budget", [0, 1, 3])
def test_thinking_budget_counts_from_the_start_token(llm, budget):
    """With reasoning_start_token_id (vLLM's semantics): the budget counts the tokens after the last start token
    of the prompt and output that no end token follows, and nothing is forced where no block is open. Here the
    greedy output's third token opens the block; it is still in flight when the next token is chosen, so a budget
    of 0 is settled on the device. A block the prompt opens counts its tokens there too; one it closes does not."""
    tok = llm.get_tokenizer()
    end = tok.encode(" Once", add_special_tokens=False)[-1]
    ban_end = dict(temperature=0.0, max_tokens=8, logit_bias={end: -100.0})
    [plain] = llm.generate(PROMPTS[:1], SamplingParams(**ban_end), use_tqdm=False)
    ids = plain.outputs[0].token_ids
    start = ids[2]
    assert start not in ids[:2] and start not in ids[3:3 + budget]
    think = dict(reasoning_end_token_id=end, reasoning_start_token_id=start, thinking_token_budget=budget)
    [o] = llm.generate(PROMPTS[:1], SamplingParams(**ban_end, **think), use_tqdm=False)
    assert o.outputs[0].token_ids[:4 + budget] == ids[:3 + budget] + [end], (o.outputs[0].token_ids, ids)

    prompt = tok.encode(PROMPTS[0])
    [o] = llm.generate([{"prompt_token_ids": prompt + [start, 300, 301]}], SamplingParams(**ban_end, **think),
                       use_tqdm=False)
    assert o.outputs[0].token_ids.index(end) == max(budget - 2, 0)   # two of the block's tokens are the prompt's
    closed = [{"prompt_token_ids": prompt + [start, 300, end]}]
    never = SamplingParams(**{**ban_end, "logit_bias": {end: -100.0, start: -100.0}})
    [a], [b] = (llm.generate(closed, p, use_tqdm=False) for p in (never, replace(never, **think)))
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and end not in b.outputs[0].token_ids


def test_thinking_budget_spares_an_end_token_still_in_flight(llm):
    """The end token came on its own as the last token before the budget is spent: nothing is forced. The
    engine launches a step before the one before it is read, so that token is still in flight when the next
    step's rows are chosen: the device spares the row (else it would force a second end token)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    [plain] = llm.generate(PROMPTS[:1], greedy, use_tqdm=False)
    ids = plain.outputs[0].token_ids
    end = ids[0]             # the end token is the greedy first one
    assert ids[1] != end
    budget = SamplingParams(temperature=0.0, max_tokens=6, reasoning_end_token_id=end, thinking_token_budget=1)
    [o] = llm.generate(PROMPTS[:1], budget, use_tqdm=False)
    assert o.outputs[0].token_ids == ids
