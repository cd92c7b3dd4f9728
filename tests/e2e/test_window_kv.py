"""A model whose every layer slides (Mistral-7B-v0.1's kind) frees each request's blocks before the window
(KVCacheManager's sliding_window): greedy tokens and logprobs still match transformers, and requests that would
need preempting with every block kept run side by side in the same cache."""
import numpy as np
import pytest

from pagedllm import LLM, SamplingParams

from test_vs_transformers import check_greedy_matches, hf_greedy


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from conftest import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("mistral"), arch="mistral", sliding_window=32, seed=5)


def prompts() -> list[list[int]]:
    """Three 200-token prompts (two sharing 96 tokens: prefix hits on blocks the first one freed) for 60 tokens
    each: 260 tokens, past the window and its kernels' read slack (32 + 128)."""
    rng = np.random.default_rng(3)
    shared = rng.integers(3, 512, size=96).tolist()
    return [shared + rng.integers(3, 512, size=104).tolist(), shared + rng.integers(3, 512, size=104).tolist(),
            rng.integers(3, 512, size=200).tolist()]


@pytest.mark.parametrize("budget", [None, 48])
def test_freed_blocks_change_no_token_and_save_preemptions(mistral, budget):
    ref = hf_greedy(mistral, prompts(), max_new=60, attn_implementation="eager")
    params = SamplingParams(temperature=0.0, max_tokens=60, logprobs=0)
    # 3 x 17 blocks kept whole; 40 hold the three windows (about 12 blocks each) and a step's chunk
    llm = LLM(mistral, dtype="float32", num_gpu_blocks_override=40, max_num_batched_tokens=budget,
              enable_prefix_caching=True, log_stats_interval=0)
    assert llm.engine.core.kv_cache_manager.sliding_window == 32
    check_greedy_matches(llm.generate(prompts(), params, use_tqdm=False), ref)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions == 0
    check_greedy_matches(llm.generate(prompts(), params, use_tqdm=False), ref)   # prefix hits on freed blocks
    assert llm.engine.get_stats().prefix_cache_hits > stats.prefix_cache_hits


def test_a_returning_prompt_hits_its_window_after_its_first_blocks_were_evicted(mistral):
    """A 400-token prompt, then two others that evict its first blocks (freed first while it ran): asked again,
    it finds its last blocks (the lookup needs only what its next query reads) and gives the same tokens."""
    rng = np.random.default_rng(5)
    again, others = rng.integers(3, 512, size=400).tolist(), [rng.integers(3, 512, size=200).tolist() for _ in "ab"]
    ref = hf_greedy(mistral, [again], max_new=20, attn_implementation="eager")
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=0)
    llm = LLM(mistral, dtype="float32", num_gpu_blocks_override=40, max_num_batched_tokens=48,
              enable_prefix_caching=True, log_stats_interval=0)
    check_greedy_matches(llm.generate([again], params, use_tqdm=False), ref)
    for prompt in others:
        llm.generate([prompt], params, use_tqdm=False)
    hits = llm.engine.get_stats().prefix_cache_hits
    check_greedy_matches(llm.generate([again], params, use_tqdm=False), ref)
    assert llm.engine.get_stats().prefix_cache_hits - hits == 384   # all but the last block's 16 tokens


def test_a_model_with_full_attention_layers_keeps_every_block(tmp_path):
    """Gemma 2 alternates windowed and full layers: the full ones read every block (a hybrid allocator, as
    vLLM's, would keep two block lists)."""
    from conftest import make_tiny_model
    d = make_tiny_model(tmp_path / "g2", arch="gemma2", seed=9, tie_word_embeddings=True)
    llm = LLM(d, dtype="float32", log_stats_interval=0)
    assert llm.engine.core.kv_cache_manager.sliding_window is None


def _llm(mistral, monkeypatch, free: bool, **kw) -> LLM:
    from pagedllm.runner import model_runner
    if not free:
        monkeypatch.setattr(model_runner, "_kv_window", lambda model, draft: None)
    llm = LLM(mistral, dtype="float32", max_num_batched_tokens=48, log_stats_interval=0, **kw)
    assert (llm.engine.core.kv_cache_manager.sliding_window is not None) == free
    return llm


def test_beams_fork_a_prompt_whose_first_blocks_were_freed(mistral, monkeypatch):
    """A 400-token prompt's 48-token chunks free its first blocks (11 by its last chunk); the beams share the rest
    (held blocks with NULL_BLOCK in front): the same beams as with every block kept."""
    from pagedllm.beam_search import BeamSearchParams
    from pagedllm.core.block_pool import NULL_BLOCK
    from pagedllm.core.kv_fork import KVForks
    prompt, params = prompts()[0] + prompts()[2], BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True)
    held_nulls = []
    hold = KVForks.hold
    monkeypatch.setattr(KVForks, "hold", lambda self, r: (hold(self, r), held_nulls.append(
        sum(b is NULL_BLOCK for b in self.holds[r.request_id].blocks)))[0])
    got = [[b.tokens for b in o.sequences] for o in _llm(mistral, monkeypatch, True).beam_search([prompt], params)]
    assert held_nulls[0] == 11
    want = [[b.tokens for b in o.sequences] for o in _llm(mistral, monkeypatch, False).beam_search([prompt], params)]
    assert got == want


def test_ngram_speculation_rolls_back_inside_the_kept_blocks(mistral):
    """Prompts that repeat themselves: prompt lookup proposes, the verify rejects some, and the tokens are
    transformers' with blocks freed behind the window."""
    rng = np.random.default_rng(4)
    loops = [(rng.integers(3, 512, size=n).tolist() * 20)[:220] for n in (7, 11)]
    ref = hf_greedy(mistral, loops, max_new=60, attn_implementation="eager")
    llm = LLM(mistral, dtype="float32", max_num_batched_tokens=48, log_stats_interval=0,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                                  "prompt_lookup_max": 4})
    assert llm.engine.core.kv_cache_manager.sliding_window == 32
    check_greedy_matches(llm.generate(loops, SamplingParams(temperature=0.0, max_tokens=60, logprobs=0),
                                      use_tqdm=False), ref)
    sd = llm.engine.get_stats().spec_decode
    assert sd.num_draft_tokens > 0


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, 48])
def test_freed_blocks_on_cuda_change_no_token(mistral, budget):
    """The Triton kernels (their key tiles may start before the window: WINDOW_READ_SLACK) with blocks freed
    and handed to other requests: float32 greedy tokens on CUDA, graphs on, equal the CPU path's."""
    params = SamplingParams(temperature=0.0, max_tokens=60)
    outs = []
    for device in ("cpu", "cuda"):
        llm = LLM(mistral, dtype="float32", device=device, num_gpu_blocks_override=40, max_num_batched_tokens=budget,
                  log_stats_interval=0)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts(), params, use_tqdm=False)])
        assert llm.engine.get_stats().num_preemptions == 0
        del llm
    assert outs[0] == outs[1]
