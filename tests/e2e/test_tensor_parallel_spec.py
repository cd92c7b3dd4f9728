"""Speculative decoding under tensor parallelism on CPU (gloo, float32): at TP=2, n-gram and draft-model speculation
give TP=1's tokens without speculation (greedy, and a seeded sampled row: the rejection sampler draws each position
from its seed), logprobs within float tolerance, and the same proposals accepted as at TP=1 with speculation: every
rank runs the verify pass (and the draft's passes, its heads sharded over the ranks as the target's) on the same
inputs and the rejection sampler's draws agree. TP=1 without speculation is the independent reference (TP=2 without
speculation equals it: tests/e2e/test_tensor_parallel.py)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread_per_rank")

ENGINE = dict(device="cpu", log_stats_interval=0, max_num_batched_tokens=32, max_model_len=256)   # chunked
PROMPTS = [[1] + [5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((0, 6, 40))]
PROMPTS.append([1] + [5 + (3 * j) % 11 for j in range(8)] * 3)   # repeats: n-gram proposes from the prompt too
PARAMS = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
          SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
          SamplingParams(temperature=0.3, seed=7, max_tokens=16, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def _run(d: str, **kw):
    llm = LLM(d, **ENGINE, **kw)
    try:
        outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        stats = llm.engine.get_stats()
        assert stats.num_blocks_free == stats.num_blocks_total   # rejected proposals' slots freed on rank 0
        return outputs, stats.spec_decode
    finally:
        llm.shutdown()


def _check_equal(reference, outputs):
    for ref, out in zip(reference, outputs, strict=True):
        a, b = ref.outputs[0], out.outputs[0]
        assert b.token_ids == a.token_ids
        if a.logprobs is not None:
            assert [list(p) for p in b.logprobs] == [list(p) for p in a.logprobs]
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-5 for x, y in zip(a.logprobs, b.logprobs) for t in x)


def test_tp2_ngram_equals_tp1(tmp_path):
    """A tiny Qwen3 (1 KV head on both ranks, a vocabulary of 510 that splits unevenly) whose greedy answers loop,
    so that proposals are accepted as well as rejected."""
    d = make_tiny_model(tmp_path / "qwen3", "qwen3", num_key_value_heads=1, vocab_size=510, seed=13)
    reference, _ = _run(d)
    tp1, tp1_stats = _run(d, speculative_config=NGRAM)
    tp2, tp2_stats = _run(d, speculative_config=NGRAM, tensor_parallel_size=2)
    _check_equal(reference, tp1)
    _check_equal(reference, tp2)
    assert 0 < tp2_stats.num_accepted_tokens < tp2_stats.num_draft_tokens
    assert tp2_stats == tp1_stats


def _as_two_kv_heads(draft: str, out) -> str:
    """The draft (1 KV head) with its KV head twice: a target with 2 KV heads that computes what the draft does,
    so that the draft's greedy proposals are all the target's tokens. At TP=2 the target holds one KV head a rank,
    the draft its one KV head on both: their KV caches differ in shape."""
    shutil.copytree(draft, out)
    weights = load_file(f"{out}/model.safetensors")
    for name in list(weights):
        if ".k_proj." in name or ".v_proj." in name:
            weights[name] = torch.cat([weights[name]] * 2).contiguous()
    save_file(weights, f"{out}/model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    return str(out)


def test_tp2_draft_model_equals_tp1(tmp_path, monkeypatch):
    """The draft sharded over both ranks, its proposal passes launched behind the verify too (DraftModel.prepass, on
    a CPU only with PREPASS_ON_CPU: set on both ranks). The greedy rows accept every proposal; the seeded row some."""
    from pagedllm.distributed import executor
    from pagedllm.runner import model_runner
    from pagedllm.spec_decode.draft_model import DraftModel
    import tp_spec_workers
    draft = make_tiny_model(tmp_path / "draft", "qwen2", num_key_value_heads=1, seed=12)
    d = _as_two_kv_heads(draft, tmp_path / "target")
    monkeypatch.setattr(model_runner, "PREPASS_ON_CPU", True)
    monkeypatch.setattr(executor, "run_worker_process", tp_spec_workers.prepass_on_cpu_worker_process)
    depth, served = DraftModel._prepass_depth, []   # passes the pre-pass served a step (rank 0's)
    monkeypatch.setattr(DraftModel, "_prepass_depth", lambda *a: served.append(sum(d := depth(*a))) or d)
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}
    reference, _ = _run(d)
    tp1, tp1_stats = _run(d, speculative_config=spec)
    served.clear()
    tp2, tp2_stats = _run(d, speculative_config=spec, tensor_parallel_size=2)
    _check_equal(reference, tp1)
    _check_equal(reference, tp2)
    assert tp2_stats == tp1_stats
    assert sum(served) > 0, served
    assert tp2_stats.num_accepted_tokens > 0.8 * tp2_stats.num_draft_tokens, tp2_stats


def test_a_draft_whose_heads_do_not_split_is_refused_before_any_worker_starts(tmp_path):
    d = make_tiny_model(tmp_path / "target", "qwen2", num_key_value_heads=2)
    draft = make_tiny_model(tmp_path / "draft", "qwen2", num_attention_heads=3, num_key_value_heads=3,
                            hidden_size=48)
    with pytest.raises(ValueError, match="speculative_config's model: num_attention_heads \\(3\\) must be divisible "
                                         "by tensor_parallel_size \\(2\\)"):
        LLM(d, **ENGINE, tensor_parallel_size=2,
            speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 2})


def test_draft_tensor_parallel_size_1_under_tp2_is_refused_naming_it(tmp_path):
    d = make_tiny_model(tmp_path / "target", "qwen2", num_key_value_heads=2)
    with pytest.raises(ValueError, match="speculative_config: draft_tensor_parallel_size must be None or 2"):
        LLM(d, **ENGINE, tensor_parallel_size=2, speculative_config={**NGRAM, "draft_tensor_parallel_size": 1})
