"""LLM.beam_search against transformers generate(num_beams=k, do_sample=False, length_penalty=lp) on tiny random
float32 Llamas: the same sequences in the same order, the same scores within 1e-4, with EOS reachable (a model
whose EOS ids include a likely token) and not, beam widths 1..4, batched prompts; and the blocks beams share."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.bench.beam_blocks import beam_block_sharing

TOL = 1e-4
MAX_NEW = 12
LIKELY_EOS = 111
PROMPTS = [np.random.default_rng(1).integers(3, 512, size=n).tolist() for n in (3, 9, 20, 33)]


def _make_eos_likely(d: str, token: int = LIKELY_EOS, eos_ids: tuple = (2, LIKELY_EOS)) -> str:
    """Raise token LIKELY_EOS's logit by ~2 on average (along the mean final hidden state) and make it an EOS id
    beside 2: beams then finish early, and both EOS ids count in transformers' candidates per step (3k)."""
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    x = torch.randint(3, 512, (8, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model(x, output_hidden_states=True).hidden_states[-1].mean((0, 1))
    f = next(Path(d).glob("*.safetensors"))
    weights = load_file(f)
    weights["lm_head.weight"][token] += 2.0 * h / h.dot(h)
    save_file(weights, f, metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        config = json.loads((Path(d) / name).read_text())
        config["eos_token_id"] = list(eos_ids)
        (Path(d) / name).write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_models")
    plain = make_tiny_model(root / "plain", arch="llama", seed=0)
    eos = _make_eos_likely(make_tiny_model(root / "eos", arch="llama", seed=5))
    return {name: (d, AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32),
                   LLM(d, dtype="float32", log_stats_interval=0)) for name, d in (("plain", plain), ("eos", eos))}


def hf_beams(model, prompt, k, lp, ignore_eos=False):
    """(generated ids per returned sequence, fill value stripped; their scores)."""
    config = model.generation_config
    saved, config.eos_token_id = config.eos_token_id, None if ignore_eos else config.eos_token_id
    try:
        if k == 1:   # transformers runs greedy for num_beams=1: score its tokens ourselves
            g = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
            ids = g.sequences[0, len(prompt):].tolist()
            cum = sum(torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.logits, ids))
            return [ids], [cum / len(ids) ** lp]
        g = model.generate(torch.tensor([prompt]), num_beams=k, num_return_sequences=k, do_sample=False,
                           length_penalty=lp, max_new_tokens=MAX_NEW, pad_token_id=0, output_scores=True,
                           return_dict_in_generate=True)
    finally:
        config.eos_token_id = saved
    return [s[len(prompt):].tolist() for s in g.sequences], g.sequences_scores.tolist()


def check(models, name, k, lp, ignore_eos=False):
    d, model, llm = models[name]
    params = BeamSearchParams(beam_width=k, max_tokens=MAX_NEW, length_penalty=lp, ignore_eos=ignore_eos)
    outputs = llm.beam_search(PROMPTS, params)   # all prompts batched
    assert llm.engine.get_stats().peak_running > k   # one engine step ran the beams of several prompts
    finished_by_eos = 0
    for prompt, out in zip(PROMPTS, outputs):
        ref_ids, ref_scores = hf_beams(model, prompt, k, lp, ignore_eos)
        assert len(out.sequences) == k
        for seq, ref, ref_score in zip(out.sequences, ref_ids, ref_scores):
            got = seq.tokens[len(prompt):]
            assert seq.tokens[:len(prompt)] == prompt
            # transformers pads shorter sequences with its fill value (the first EOS id here)
            assert got == ref[:len(got)] and len(set(ref[len(got):])) <= 1, (prompt, got, ref)
            assert abs(seq.score - ref_score) < TOL
            assert abs(seq.cum_logprob - ref_score * len(got) ** lp) < TOL * len(got) ** max(lp, 0) + 1e-6
            assert len(seq.logprobs) == len(got)
            # the chosen tokens' texts, as vLLM's detokenized beam steps give them (they were None for a moment)
            assert all(position[t].decoded_token is not None for position, t in zip(seq.logprobs, got))
            finished_by_eos += seq.finish_reason == "stop"
            assert (seq.finish_reason == "stop") == (got[-1] in (2, LIKELY_EOS) and not ignore_eos)
    return finished_by_eos


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("lp", [1.0, 0.0, 2.0, -0.5])
def test_eos_reachable_matches_transformers(models, k, lp):
    check(models, "eos", k, lp)


def test_eos_reachable_finishes_early(models):
    assert check(models, "eos", 4, 0.0) >= 4   # beams ended by EOS, the search stopped before max_tokens


@pytest.mark.parametrize("k,lp", [(1, 1.0), (2, 1.0), (4, 1.0), (3, 2.0)])
def test_plain_model_matches_transformers(models, k, lp):
    check(models, "plain", k, lp)


def test_ignore_eos_matches_transformers_without_eos(models):
    check(models, "eos", 3, 1.0, ignore_eos=True)


def test_beams_share_blocks(models):
    """The prompt's full blocks are held once for all beams; only the beams' last blocks are their own."""
    d, _, llm = models["plain"]
    peak, unshared = beam_block_sharing(llm, beam_width=4, prompt_len=100, max_tokens=8)
    assert peak < unshared and 1 - peak / unshared > 0.5, (peak, unshared)
    stats = llm.engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total


def test_prefix_caching_off_same_beams_and_sharing(models):
    d, model, _ = models["eos"]
    llm = LLM(d, dtype="float32", log_stats_interval=0, enable_prefix_caching=False)
    out = llm.beam_search(PROMPTS[2], BeamSearchParams(beam_width=3, max_tokens=MAX_NEW))[0]
    ref_ids, ref_scores = hf_beams(model, PROMPTS[2], 3, 1.0)
    assert [s.tokens[len(PROMPTS[2]):] for s in out.sequences] == [r[:len(s.tokens) - len(PROMPTS[2])]
                                                                    for s, r in zip(out.sequences, ref_ids)]
    peak, unshared = beam_block_sharing(llm, beam_width=4, prompt_len=100, max_tokens=8)
    assert peak < unshared


def test_beam_search_params_are_checked(models):
    llm = models["plain"][2]
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="length_penalty"):
        BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=float("nan"))
    with pytest.raises(ValueError, match="beam_width must be at most 10"):
        llm.beam_search([[5, 6]], BeamSearchParams(beam_width=11, max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        llm.beam_search([[5, 6]], BeamSearchParams(beam_width=2, max_tokens=10_000))



def test_a_beam_past_the_kv_cache_is_refused_before_the_first_step(models):
    """prompt + max_tokens within max_model_len but past what the KV cache holds: refused naming max_tokens
    before any step runs (a step's request was refused mid-search, naming its own prompt length)."""
    d = models["plain"][0]
    llm = LLM(d, dtype="float32", log_stats_interval=0, num_gpu_blocks_override=3, block_size=4)   # 12 tokens
    with pytest.raises(ValueError, match=r"max_tokens must be at most what the KV cache holds \(12 tokens\) - "
                                         r"prompt length \(2\), got 20"):
        llm.beam_search([[5, 6]], BeamSearchParams(beam_width=2, max_tokens=20))
    assert llm.engine.get_stats().num_blocks_free == 3
    assert len(llm.beam_search([[5, 6]], BeamSearchParams(beam_width=2, max_tokens=8))[0].sequences) == 2


# ---- copy-on-write forks (core/kv_fork.py) ----------------------------------------------------------------------

def _same_beams(want, got):
    for a, b in zip(want, got):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        assert max(abs(x.score - y.score) for x, y in zip(a.sequences, b.sequences)) < TOL


def _no_leak(llm):
    stats = llm.engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total and not llm.engine.kv_cache_manager.forks.holds


def test_forked_beams_compute_only_their_new_token(models):
    """Tokens computed: the prompt once, then one per beam per step. Sharing full blocks alone (recomputing
    each beam's partial block) would compute sum over beams of (len % block_size) + 1 a step."""
    d, _, llm = models["plain"]
    k, n, prompt_len, bs = 4, 8, 100, llm.engine.config.block_size
    rng = np.random.default_rng(7)
    prompt = rng.integers(3, 512, size=prompt_len).tolist()   # a prompt no earlier test cached
    before, forks = llm.engine.get_stats().num_prompt_tokens, llm.engine.kv_cache_manager.forks.stats.num_forks
    llm.beam_search([prompt], BeamSearchParams(beam_width=k, max_tokens=n, ignore_eos=True))
    computed = llm.engine.get_stats().num_prompt_tokens - before
    recompute_partial = prompt_len + k * sum((prompt_len + t - 1) % bs + 1 for t in range(1, n))
    assert computed == prompt_len + k * (n - 1) < recompute_partial, (computed, recompute_partial)
    assert llm.engine.kv_cache_manager.forks.stats.num_forks - forks == k * (n - 1)
    _no_leak(llm)


def test_prefix_caching_off_forks_too(models):
    d, _, _ = models["plain"]
    llm = LLM(d, dtype="float32", log_stats_interval=0, enable_prefix_caching=False)
    k, n = 3, 6
    llm.beam_search(PROMPTS[3], BeamSearchParams(beam_width=k, max_tokens=n, ignore_eos=True))
    assert llm.engine.get_stats().num_prompt_tokens == len(PROMPTS[3]) + k * (n - 1)
    _no_leak(llm)


def test_no_block_leaks_after_many_beam_searches(models):
    d, _, llm = models["eos"]
    for i in range(12):
        k, lp = 1 + i % 4, (1.0, 0.0, 2.0)[i % 3]
        llm.beam_search(PROMPTS[i % 4:i % 4 + 2], BeamSearchParams(beam_width=k, max_tokens=4 + i, length_penalty=lp,
                                                                   ignore_eos=i % 2 == 1))
        _no_leak(llm)
    assert llm.engine.kv_cache_manager.forks.stats.num_block_copies > 0


@pytest.fixture(scope="module")
def eos_beams(models):
    params = BeamSearchParams(beam_width=4, max_tokens=MAX_NEW)
    return params, models["eos"][2].beam_search(PROMPTS, params)


@pytest.mark.parametrize("max_num_seqs,num_blocks", [(2, 16), (16, 24)])
def test_few_seqs_and_blocks_same_beams(models, eos_beams, max_num_seqs, num_blocks):
    """A few sequences at a time and a small pool: holds are dropped for room (those beams recompute), and, with
    a long request ahead of each step's beams (16, 24), running beams are preempted. Same beams as a roomy
    engine (itself equal to transformers above), no block left behind."""
    d, params, want = models["eos"][0], *eos_beams
    llm = LLM(d, dtype="float32", log_stats_interval=0, max_num_seqs=max_num_seqs, num_gpu_blocks_override=num_blocks,
              block_size=4)
    add, bg = llm.engine.add_request, iter(range(1000))
    if max_num_seqs == 16:
        def add_after_long_request(rid, prompt, *args, **kwargs):
            if not llm.engine.has_unfinished_requests():   # a step's first beam
                add(f"bg-{next(bg)}", list(range(40, 48)), SamplingParams(max_tokens=40, ignore_eos=True))
            return add(rid, prompt, *args, **kwargs)
        llm.engine.add_request = add_after_long_request
    _same_beams(want, llm.beam_search(PROMPTS, params))
    stats, forks = llm.engine.get_stats(), llm.engine.kv_cache_manager.forks.stats
    assert forks.num_dropped_holds > 0 and forks.num_forks > 0
    assert max_num_seqs != 16 or stats.num_preemptions > 0
    _no_leak(llm)


# ---- what vLLM's beam search shows of a beam ----------------------------------------------------------------------

def _server_beams(d: str, params: BeamSearchParams) -> list:
    """Each prompt's beam search on AsyncLLM, as the server runs it (its one RequestOutput)."""
    import asyncio

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.server.beam_search import beam_search_stream

    async def main():
        engine = AsyncLLM(EngineConfig(d, dtype="float32", log_stats_interval=0, device="cpu"))
        try:
            outs = []
            for i, p in enumerate(PROMPTS):
                outs.append([o async for o in beam_search_stream(engine, f"s{i}", p, params)][-1])
            return outs
        finally:
            engine.shutdown()
    return asyncio.run(main())


@pytest.mark.parametrize("include_stop", [False, True])
def test_server_beam_shows_its_eos_only_with_include_stop_str(models, include_stop):
    """The server's beams (use_beam_search), as vLLM's: a beam ended by an EOS id (either of the model's two)
    leaves it out of token_ids, and so out of usage and logprobs, unless include_stop_str_in_output; the text
    never shows it without. Was: the EOS always in token_ids, one more completion token than vLLM counts."""
    d, _, llm = models["eos"]
    params = BeamSearchParams(beam_width=4, max_tokens=MAX_NEW, include_stop_str_in_output=include_stop)
    offline = llm.beam_search(PROMPTS, params)
    num_stopped = 0
    for prompt, want, got in zip(PROMPTS, offline, _server_beams(d, params)):
        assert len(got.outputs) == len(want.sequences) == 4
        for seq, c in zip(want.sequences, got.outputs):
            generated = seq.tokens[len(prompt):]
            assert c.finish_reason == seq.finish_reason
            if seq.finish_reason == "stop":
                num_stopped += 1
                assert generated[-1] in (2, LIKELY_EOS) and c.stop_reason == generated[-1]
                shown = generated if include_stop else generated[:-1]
            else:
                assert not set(generated) & {2, LIKELY_EOS}
                shown = generated
            assert list(c.token_ids) == shown
            assert len(c.logprobs) == len(shown) and all(t in pos for t, pos in zip(shown, c.logprobs))
            assert abs(c.cumulative_logprob - sum(pos[t].logprob for t, pos in zip(generated, seq.logprobs))) < TOL
    assert num_stopped >= 4


def test_beams_carry_their_prompt_as_vllms_orig_prompt(models):
    """vLLM's BeamSearchSequence.orig_prompt (the prompt's engine input: its token ids, and its text and cache salt
    where given) and get_prompt() (the beam's tokens under that text and salt), in vLLM's field order. Was: no
    orig_prompt, no get_prompt, and a positional BeamSearchSequence(orig_prompt, tokens, logprobs, lora_request,
    cum_logprob) of vLLM's read differently."""
    from pagedllm.beam_search import BeamSearchSequence
    llm = models["plain"][2]
    text = "Once upon a time"
    text_ids = llm.get_tokenizer().encode(text)
    prompts = [text, {"prompt_token_ids": PROMPTS[0], "cache_salt": "salt-a"}, PROMPTS[1],
               {"prompt": text, "cache_salt": "salt-b"}]
    want = [{"type": "token", "prompt_token_ids": text_ids, "prompt": text},
            {"type": "token", "prompt_token_ids": PROMPTS[0], "cache_salt": "salt-a"},
            {"type": "token", "prompt_token_ids": PROMPTS[1]},
            {"type": "token", "prompt_token_ids": text_ids, "prompt": text, "cache_salt": "salt-b"}]
    outputs = llm.beam_search(prompts, BeamSearchParams(beam_width=2, max_tokens=3))
    for orig, out in zip(want, outputs):
        for seq in out.sequences:
            assert seq.orig_prompt == orig
            assert seq.tokens[:len(orig["prompt_token_ids"])] == orig["prompt_token_ids"]
            assert seq.get_prompt() == {**orig, "prompt_token_ids": seq.tokens}
    seq = BeamSearchSequence(want[2], PROMPTS[1] + [7], [{}], None, -1.5)   # vLLM's positional order
    assert seq.lora_request is None and seq.cum_logprob == -1.5


def test_server_beam_text_leaves_a_special_eos_out_with_include_stop_str(tmp_path):
    """With include_stop_str_in_output the server's beams hold their EOS in token_ids (above), but the text of a
    special EOS is none ("</s>" ended it), as a sampled answer's text skips special tokens and vLLM's beams
    leave it out; a model whose likely token is its one EOS id, 2 ("</s>")."""
    d = _make_eos_likely(make_tiny_model(tmp_path / "eos2", arch="llama", seed=5), token=2, eos_ids=(2,))
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_NEW, include_stop_str_in_output=True)
    tok = AutoTokenizer.from_pretrained(d)
    assert 2 in tok.all_special_ids
    num_stopped = 0
    for prompt, got in zip(PROMPTS, _server_beams(d, params)):
        head = tok.decode(prompt)
        for c in got.outputs:
            ids = list(c.token_ids)
            if c.finish_reason == "stop":
                num_stopped += 1
                assert ids[-1] == 2
                ids = ids[:-1]
            assert c.text == tok.decode(prompt + ids)[len(head):]
    assert num_stopped >= 3
