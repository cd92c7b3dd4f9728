"""The shipped real model (stories260k): CLI, text, stop conditions, streaming, errors, chat, stats."""
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedllm import LLM, SamplingParams
from pagedllm.config import DEMO_MODEL
from pagedllm.engine.output_processor import OutputKind


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", log_stats_interval=0)


@pytest.fixture(scope="module")
def hf():
    return (AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32),
            AutoTokenizer.from_pretrained(DEMO_MODEL))


def hf_greedy_text(hf, prompt, max_new):
    model, tok = hf
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False)[0, ids.shape[1]:]
    return out.tolist(), tok.decode(out, skip_special_tokens=True)


def test_cli_generate_default_prompt_matches_transformers(hf):
    proc = subprocess.run([sys.executable, "-m", "pagedllm.cli", "generate"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    _, text = hf_greedy_text(hf, "Once upon a time", 64)
    assert text.startswith(", there was a little girl named Lily")
    assert proc.stdout.strip() == "Once upon a time" + text


@pytest.mark.parametrize("prompt", ["Once upon a time", "Lily and Tom went to the park to", "The little dog was"])
def test_greedy_text_matches_transformers(llm, hf, prompt):
    ids, text = hf_greedy_text(hf, prompt, 40)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ids
    assert out.outputs[0].text.strip() == text.strip()
    assert out.prompt == prompt and out.prompt_token_ids == hf[1](prompt).input_ids


def test_stop_strings_trim_and_finish(llm):
    base = SamplingParams(temperature=0, max_tokens=40)
    full = llm.generate("Once upon a time", base, use_tqdm=False)[0].outputs[0].text
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop=["Lily"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full[:full.index("Lily")] and out.finish_reason == "stop" and out.stop_reason == "Lily"
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop=["Lily"],
                                                          include_stop_str_in_output=True), use_tqdm=False)[0]
    assert out.outputs[0].text == full[:full.index("Lily") + 4]
    assert llm.engine.get_stats().num_blocks_free == llm.engine.get_stats().num_blocks_total


def test_an_eos_id_of_the_generation_config_alone_is_the_stop_reason(llm):
    """vLLM adds the generation config's EOS ids other than the tokenizer's (2) to stop_token_ids, so a request
    they end has that id as its stop_reason; the tokenizer's EOS gives None. Their text is left out either way."""
    for eos, reason in ((1, 1), (2, None)):
        params = SamplingParams(temperature=0, max_tokens=4, logit_bias={eos: 100})
        out = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
        assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == ([eos], "", "stop", reason)
    params = SamplingParams(temperature=0, max_tokens=3, logit_bias={1: 100}, ignore_eos=True)
    out = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [1, 1, 1] and out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_ids_max_tokens_min_tokens_ignore_eos(llm, hf):
    ids, _ = hf_greedy_text(hf, "Once upon a time", 20)
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ids[5]]),
                       use_tqdm=False)[0].outputs[0]
    first = ids.index(ids[5])
    assert out.token_ids == ids[:first + 1] and out.finish_reason == "stop" and out.stop_reason == ids[5]
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=7), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
    # Greedy from BOS ends its story with BOS (id 1, an EOS of generation_config) after 346 tokens.
    natural = llm.generate("", SamplingParams(temperature=0, max_tokens=400), use_tqdm=False)[0].outputs[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in (1, 2)
    n = len(natural.token_ids)
    longer = llm.generate("", SamplingParams(temperature=0, max_tokens=n + 5, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) == n + 5 and longer.token_ids[:n - 1] == natural.token_ids[:n - 1]
    held = llm.generate("", SamplingParams(temperature=0, max_tokens=n + 5, min_tokens=n + 2),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= n + 2 and not (set(held.token_ids[:n + 1]) & {1, 2})


def test_streamed_deltas_concatenate_to_final_text(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=50, n=2)
    engine.add_request("s", "Once upon a time", params, output_kind=OutputKind.DELTA)
    texts, tokens, final = {0: "", 1: ""}, {0: [], 1: []}, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                texts[c.index] += c.text
                tokens[c.index] += c.token_ids
            final = out
    assert final.finished
    ref = llm.generate("Once upon a time", SamplingParams(temperature=0.8, seed=3, max_tokens=50, n=2),
                       use_tqdm=False)[0]
    for c in ref.outputs:
        assert texts[c.index] == c.text and tokens[c.index] == c.token_ids


def test_bad_input_is_a_clear_error_and_leaves_nothing_behind(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([1] * 512, SamplingParams(max_tokens=1), use_tqdm=False)   # a prompt that leaves no room
    with pytest.raises(ValueError, match=r"prompt_token_ids must be integers in \[0, 512\)"):
        llm.generate([[1, 2, 3], [1, 9999]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt_token_ids must be integers .* got \[True\]"):
        llm.generate([[1, True]], use_tqdm=False)      # bool is an int subclass, not a token id
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        llm.generate("hi", SamplingParams(top_p=2.0), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate("hi", SamplingParams(stop_token_ids=[600]), use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params has 2 entries for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    # what a fuzz of the API found crashing on an AttributeError / TypeError deep inside, or silently taken
    for params in ({"temperature": 0}, "xy", 5, [None, None]):
        with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, a list of them"):
            llm.generate(["a", "b"], params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"a dict prompt takes the keys .* got \['multi_modal_data'\]"):
        llm.generate({"prompt": "a", "multi_modal_data": {"image": None}}, use_tqdm=False)
    for bad in ({"prompt": 5}, {"prompt_token_ids": None}, {"prompt_token_ids": 5}):
        with pytest.raises(ValueError, match="a dict prompt's"):
            llm.generate(bad, use_tqdm=False)
    for messages in (["hi"], [{"role": "user", "content": "a"}, "x"], [[]], [{"content": "no role"}]):
        with pytest.raises(ValueError, match="messages: "):
            llm.chat(messages, chat_template="{{ messages[0]['content'] }}", use_tqdm=False)
    for messages in ("hi", None, 5):
        with pytest.raises(TypeError, match="messages must be a list"):
            llm.chat(messages, use_tqdm=False)
    with pytest.raises(ValueError, match="chat_template_kwargs must be a dict"):
        llm.chat([{"role": "user", "content": "a"}], chat_template="x", chat_template_kwargs=5, use_tqdm=False)
    with pytest.raises(TypeError, match="params must be a BeamSearchParams"):
        llm.beam_search("Hi", {"beam_width": 2})
    assert not llm.engine.has_unfinished_requests()
    # The engine still works afterwards.
    assert llm.generate("Once", SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_priority_that_is_not_a_list_is_a_type_error_naming_it(llm):
    """priority is one per prompt (vLLM's list[int]): a bare int was "object of type 'int' has no len()"."""
    for priority in (5, "a"):
        with pytest.raises(TypeError, match="priority must be a list of integers, one per prompt, got"):
            llm.generate(["a"], SamplingParams(max_tokens=2), use_tqdm=False, priority=priority)
    assert not llm.engine.has_unfinished_requests()


def test_request_that_can_never_fit_the_kv_cache_is_rejected():
    llm = LLM(dtype="float32", num_gpu_blocks_override=4, log_stats_interval=0)     # 64 slots
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate("Once upon a time", SamplingParams(max_tokens=100), use_tqdm=False)
    assert llm.generate("Once upon a time", SamplingParams(max_tokens=20), use_tqdm=False)[0].outputs[0].text


def test_bad_model_dir_and_engine_args(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=3)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(max_model_len=100000)


def test_chat_uses_the_template(llm):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = llm.chat([{"role": "user", "content": "Once upon a time"}], SamplingParams(temperature=0, max_tokens=10),
                   chat_template=template, use_tqdm=False)[0]
    ref = llm.generate(llm.get_tokenizer().encode("Once upon a time", add_special_tokens=False),
                       SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_the_prompt_text_of_chat_and_of_a_tokens_prompt_is_the_outputs_prompt(llm):
    """vLLM's: a chat's RequestOutput.prompt is the rendered conversation, and a TokensPrompt's optional "prompt"
    (its text) is the output's prompt (print(out.prompt) after llm.chat printed None)."""
    greedy = SamplingParams(temperature=0, max_tokens=3)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    a, b = llm.chat([[{"role": "user", "content": "Once"}], [{"role": "user", "content": "Lily"}]], greedy,
                    chat_template=template, use_tqdm=False)
    assert (a.prompt, b.prompt) == ("<user>Once", "<user>Lily")
    ids = llm.get_tokenizer().encode("Once upon a time")
    out, plain = llm.generate([{"prompt_token_ids": ids, "prompt": "Once upon a time"}, {"prompt_token_ids": ids}],
                              greedy, use_tqdm=False)
    assert out.prompt == "Once upon a time" and plain.prompt is None
    assert out.prompt_token_ids == ids and out.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match="a dict prompt's 'prompt' must be a string"):
        llm.generate({"prompt_token_ids": ids, "prompt": 5}, use_tqdm=False)


def test_engine_stats_count_tokens_and_cache(llm):
    before = llm.engine.get_stats()
    llm.generate(["Once upon a time there was", "Once upon a time there was"],
                 SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    after = llm.engine.get_stats()
    assert after.num_generation_tokens - before.num_generation_tokens == 10
    assert after.num_prompt_tokens > before.num_prompt_tokens
    assert after.prefix_cache_queries > before.prefix_cache_queries
    assert (after.num_running, after.num_waiting, after.num_blocks_used) == (0, 0, 0)


def test_stats_are_logged_periodically(caplog):
    llm = LLM(dtype="float32", log_stats_interval=1e-9)
    with caplog.at_level("INFO", logger="pagedllm"):
        llm.generate(["Once"] * 3, SamplingParams(max_tokens=4), use_tqdm=False)
    assert any("KV blocks used" in r.getMessage() for r in caplog.records)


def test_numpy_token_ids_and_reset_prefix_cache(llm):
    import numpy as np
    ids = np.array(llm.get_tokenizer().encode("Once upon a time"))
    a = llm.generate(ids.tolist(), SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    b = llm.generate(list(ids), SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[1, 2.5]], use_tqdm=False)
    long_prompt = llm.get_tokenizer().encode("Once upon a time " * 10)
    llm.generate(long_prompt, SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.generate(long_prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens > 0
    assert llm.reset_prefix_cache()
    assert llm.generate(long_prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 0


def test_request_ids_must_be_unique(llm):
    engine = llm.engine
    engine.add_request("a#0", [1, 5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1, 5, 6], SamplingParams(n=2, max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a#0", [1, 5, 6], SamplingParams(max_tokens=2))
    engine.abort_request("a#0")
    assert not engine.has_unfinished_requests()
    assert engine.get_stats().num_blocks_used == 0


def test_top_p_alone_from_candidates_samples_as_the_sort(llm, monkeypatch):
    """Llama-style defaults (temperature 0.6, top_p 0.9, no top_k) on a trained model: its rows reach p within a
    few candidates (64 here, of 512 tokens), and seeded outputs are those of the sort path, token for token."""
    from pagedllm.sample import sampler
    held = []
    candidates = sampler._top_p_of_candidates

    def counted(*args):
        out = candidates(*args)
        held.append(out is not None)
        return out
    monkeypatch.setattr(sampler, "_top_p_of_candidates", counted)
    monkeypatch.setattr(sampler, "_top_p_sorts_left", 0)   # no miss of an earlier test's to sit out
    prompts = ["Once upon a time", "The little dog was", "Lily wanted to"]
    params = [SamplingParams(temperature=0.6, top_p=0.9, seed=i, max_tokens=24, ignore_eos=True) for i in range(3)]
    monkeypatch.setattr(sampler, "_CANDIDATES_MAX_K", 64)
    fast = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(sampler, "_CANDIDATES_MAX_K", 0)
    sort = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert fast == sort and sum(held) >= len(held) // 2 > 0


def test_enqueue_then_wait_for_completion(llm):
    """vLLM's LLM.enqueue / wait_for_completion: requests added without running, run together later, outputs in
    the order enqueued and equal to generate()'s; a generate() in between runs them too, and its own outputs
    alone come back from it; a bad batch queues nothing."""
    prompts = ["Once upon a time", "The little dog", "Lily went to", "One day"]
    seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=12) for i in range(4)]
    want = [o.outputs[0].text for o in llm.generate(prompts, seeded, use_tqdm=False)]
    first = llm.enqueue(prompts[:2], seeded[:2])
    assert llm.engine.has_unfinished_requests() and len(first) == 2
    plain = llm.generate(prompts[2:], seeded[2:], use_tqdm=False)   # runs the queued ones too
    assert [o.outputs[0].text for o in plain] == want[2:]
    second = llm.enqueue(prompts[2:], seeded[2:])
    with pytest.raises(ValueError, match="stop_token_ids"):   # the fourth fails in the engine: none stays
        llm.enqueue(prompts, [*seeded[:3], SamplingParams(stop_token_ids=[10**6])])
    outs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outs] == first + second
    assert [o.outputs[0].text for o in outs] == want
    assert llm.wait_for_completion(use_tqdm=False) == [] and not llm.engine.has_unfinished_requests()


def test_use_tqdm_may_make_the_bar(llm):
    """vLLM's use_tqdm takes a tqdm factory too (functools.partial(tqdm, leave=False)): the bar is its."""
    import functools
    import io

    from tqdm import tqdm
    out = io.StringIO()
    llm.generate(["Once"], SamplingParams(max_tokens=2), use_tqdm=functools.partial(tqdm, file=out))
    assert "Processed prompts" in out.getvalue()
    from pagedllm.beam_search import BeamSearchParams   # beam_search's bar too
    llm.beam_search([{"prompt": "Once"}], BeamSearchParams(beam_width=2, max_tokens=2),
                    use_tqdm=functools.partial(tqdm, file=out))
    assert "Beam search" in out.getvalue()


def test_logprob_tokens_read_as_in_the_text(llm):
    """The demo's SentencePiece tokens in logprobs keep their leading space: the chosen tokens join to the text,
    and the 20 top entries of a position are 20 different strings (" loved" and "loved" collided before)."""
    prompt = "Once upon a time, there was a little girl named Lily. She"
    o = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0, logprobs=20), use_tqdm=False)[0]
    c = o.outputs[0]
    assert "".join(c.logprobs[i][t].decoded_token for i, t in enumerate(c.token_ids)) == c.text
    assert c.text.startswith(" ") and all(len({p.decoded_token for p in pos.values()}) >= 20 for pos in c.logprobs)


def test_chat_content_format(llm):
    """LLM.chat's chat_template_content_format (vLLM's): a template that loops over content parts gets them."""
    template = "{% for m in messages %}<{% for p in m['content'] %}{{ p.text }}{% endfor %}>{% endfor %}"
    messages = [{"role": "user", "content": "Once upon a time"}]
    params = SamplingParams(max_tokens=1)
    assert llm.chat(messages, params, use_tqdm=False, chat_template=template)[0].prompt == "<Once upon a time>"
    assert llm.chat(messages, params, use_tqdm=False, chat_template=template,
                    chat_template_content_format="string")[0].prompt == "<>"   # a str's characters have no .text
    with pytest.raises(ValueError, match="chat_template_content_format must be one of"):
        llm.chat(messages, params, chat_template=template, chat_template_content_format="text")
