"""Tensor parallelism on CPU (gloo, float32): TP=2 gives TP=1's tokens and logprobs on tiny Llama, Qwen2,
Phi-3, OLMo-2, Gemma 2 / 3, Qwen3 and mixture-of-experts (Qwen3-MoE, Mixtral) checkpoints (GQA with 1 KV head,
replicated on both ranks, and 2, one a rank; tied and untied embeddings; biases on row-parallel layers; a
vocabulary that does not split evenly); a step failing on every rank fails its requests alone; a killed worker
ends the engine with a clear error within seconds. TP=1 is the independent reference: the same checkpoint through
the unsplit model."""
import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import assert_dies_within, final_token_ids, longrope, make_tiny_model
from pagedllm import LLM, SamplingParams
from pagedllm.distributed.executor import WorkerDiedError

pytestmark = pytest.mark.usefixtures("one_thread_per_rank")

MODELS = {   # name: (arch, overrides)
    # biases on every linear: a row-parallel layer's (o_proj, down_proj) is added once, after the all-reduce
    "llama_kv1_tied_bias": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, seed=11,
                                          attention_bias=True, mlp_bias=True)),
    "qwen2_kv2": ("qwen2", dict(num_key_value_heads=2, seed=12)),
    # Phi-4-mini's shape: fused qkv_proj / gate_up_proj checkpoint tensors (each rank takes its rows of every
    # part), longrope (long_factor: max_model_len 256 is past its 64) over 3/4 of each head
    "phi4_mini_kv2": ("phi3", dict(num_key_value_heads=2, seed=14, **longrope(0.75))),
    # OLMo-2: q_norm / k_norm over every head, each rank's q and k gathered; its 1 KV head on both ranks, once
    "olmo2_kv1": ("olmo2", dict(num_key_value_heads=1, seed=15)),
    # Gemma 2: each rank's heads windowed (layer 0) and soft-capped, the final cap on the gathered logits
    "gemma2_kv2": ("gemma2", dict(seed=17, tie_word_embeddings=True)),
    # Gemma 3 4B and up: the language model of a vision-language checkpoint (language_model.model.*), each rank's
    # vocabulary rows of its tied embedding cut by the name the model gives it; each rank's heads q/k-normed (the
    # per-head norms whole on both ranks), rotated by their layer's type (Gemma 3's text layers, as gemma-3-1b's)
    "gemma3_vl_tied": ("gemma3_vl", dict(seed=19, tie_word_embeddings=True)),
    # mixture of experts (every expert on both ranks, its I/N; the router whole): Qwen3-MoE's experts are
    # moe_intermediate_size (32) wide beside a dense layer of intermediate_size (128); Mixtral's w1/w2/w3 names
    "qwen3_moe": ("qwen3_moe", dict(seed=15)),
    "mixtral": ("mixtral", dict(seed=16)),
    "qwen3_kv1_vocab510": ("qwen3", dict(num_key_value_heads=1, vocab_size=510, seed=13)),   # 255 rows a rank
}
PROMPTS = [[1] + [5 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((0, 6, 40, 75))]
ENGINE = dict(device="cpu", log_stats_interval=0, max_num_batched_tokens=32, max_model_len=256)   # chunked


def _params() -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    return [greedy, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=2),
            SamplingParams(temperature=1.0, top_k=20, seed=7, repetition_penalty=1.2, max_tokens=12, ignore_eos=True),
            greedy]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp_models")
    return {name: make_tiny_model(root / name, arch, **kw) for name, (arch, kw) in MODELS.items()}


def _close(a: list[dict], b: list[dict], tol: float = 1e-5):
    """Per position {token id: Logprob}: the same ids, logprobs within tol."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None:
            assert y is None
            continue
        assert set(x) == set(y)
        assert all(abs(x[k].logprob - y[k].logprob) <= tol for k in x)


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_tokens_and_logprobs_equal_tp1(model_dirs, name):
    """Then, on the last model's engine (one start-up fewer): a killed worker ends it with WorkerDiedError."""
    d = model_dirs[name]
    reference = LLM(d, **ENGINE).generate(PROMPTS, _params(), use_tqdm=False)
    llm = LLM(d, tensor_parallel_size=2, **ENGINE)
    try:
        outputs = llm.generate(PROMPTS, _params(), use_tqdm=False)
        for ref, out in zip(reference, outputs):
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids
            if ref.outputs[0].logprobs is not None:
                _close(ref.outputs[0].logprobs, out.outputs[0].logprobs)
        _close(reference[1].prompt_logprobs, outputs[1].prompt_logprobs)
        mc, pc = llm.model_config, llm.llm_engine.vllm_config.parallel_config   # vLLM's views: a rank's share
        assert pc.tensor_parallel_size == pc.world_size == 2
        assert mc.get_num_kv_heads(pc) == llm.engine.runner.num_kv_heads   # rank 0's KV heads, as its cache holds
        assert mc.get_num_attention_heads(pc) == mc.hf_config.num_attention_heads // 2
        if name == list(MODELS)[-1]:
            _failed_step_on_every_rank(llm, reference[3].outputs[0].token_ids)
            _kill_a_worker_mid_run(llm.engine)
    finally:
        llm.shutdown()


def _failed_step_on_every_rank(llm, expected: list[int]):
    """A launch that raises on every rank (a request's data passed the edge's checks, then broke: its
    allowed_token_ids lie outside the vocabulary) fails that step's requests; the step before it is still read
    on every rank, and the engine serves on with TP=1's tokens."""
    engine, greedy = llm.engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    process = engine.input_processor.process

    def break_poison(request_id, *args, **kwargs):
        req = process(request_id, *args, **kwargs)
        for r in req.core_requests if request_id == "poison" else []:
            object.__setattr__(r.sampling_params, "allowed_token_ids", [10**9])
        return req
    engine.input_processor.process = break_poison
    engine.add_request("before", PROMPTS[0], greedy)
    engine.step()
    engine.step()   # "before" is in flight when the poisoned step launches
    engine.add_request("poison", PROMPTS[1], greedy)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o.outputs[0].finish_reason) for o in engine.step() if o.finished)
    assert finished == {"before": "error", "poison": "error"}
    assert llm.generate([PROMPTS[3]], greedy, use_tqdm=False)[0].outputs[0].token_ids == expected


def _kill_a_worker_mid_run(engine):
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"long{i}", prompt, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
    for _ in range(4):
        engine.step()
    worker = engine.core.runner.executor.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match="rank 1 .* died"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("call", ["execute", "result"])
def test_a_step_call_failing_on_one_rank_alone_ends_the_engine(model_dirs, monkeypatch, call):
    """A step call that raises on rank 1 and not on rank 0 (an OOM on one GPU) leaves the ranks' collectives and
    state out of step: the worker exits, and the engine ends with WorkerDiedError saying so, within seconds,
    where it hung in a collective (a launch: rank 0 waits for rank 1's all-reduce) or went on out of step (a
    read: rank 1's next inputs lack its tokens)."""
    import functools

    import tp_faults

    from pagedllm.distributed import executor
    monkeypatch.setattr(executor, "run_worker_process", functools.partial(tp_faults.failing_worker_process, call, 6))
    llm = LLM(model_dirs["qwen2_kv2"], tensor_parallel_size=2, **ENGINE)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1 .* exit code 3: a step call failed on it and not on rank 0"):
            llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 20
    finally:
        llm.shutdown()


def test_async_llm_tp2_and_a_killed_worker(model_dirs):
    """Through AsyncLLM (the core process starts the worker): TP=1's tokens; a killed worker ends the core
    process, and the request in flight fails with EngineDeadError within seconds."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    d = model_dirs["llama_kv1_tied_bias"]
    # the last row under a grammar: sampled deferred, its bitmask rows sent to the worker. (Not beside the
    # logprob checks: when its compile ends moves rows between steps, and a row's float sums with them.)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(PROMPTS) + [
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, structured_outputs={"regex": "(cat|dog)-[0-9]{2}"})]
    prompts = PROMPTS + [PROMPTS[1]]
    reference = [o.outputs[0].token_ids for o in LLM(d, **ENGINE).generate(prompts, params, use_tqdm=False)]

    async def main():
        engine = AsyncLLM(EngineConfig(d, tensor_parallel_size=2, **ENGINE))
        try:
            got = await asyncio.gather(*(final_token_ids(engine, f"r{i}", p, q)
                                         for i, (p, q) in enumerate(zip(prompts, params))))
            assert got == reference
            core_pid = engine.core.process.pid
            children = Path(f"/proc/{core_pid}/task/{core_pid}/children").read_text().split()
            await assert_dies_within(engine, PROMPTS[2], lambda: os.kill(int(children[0]), signal.SIGKILL))
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_experts_that_do_not_split_are_refused_before_any_worker_starts(tmp_path, monkeypatch):
    """Qwen3-MoE's experts are split by moe_intermediate_size (not intermediate_size): one that does not divide
    by the ranks is the config's ValueError naming it, as the heads' are, not a worker's RuntimeError after
    the workers started (each rank's model build failed the same way)."""
    from pagedllm.distributed import executor

    def no_workers(*args):
        raise AssertionError("a worker process was started")
    monkeypatch.setattr(executor, "MultiprocExecutor", no_workers)
    d = make_tiny_model(tmp_path / "moe", "qwen3_moe", moe_intermediate_size=33)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(33\) must be divisible by tensor_parallel_size "
                                         r"\(2\)"):
        LLM(d, tensor_parallel_size=2, **ENGINE)


def test_a_block_checkpoint_that_does_not_split_is_refused_before_any_worker_starts(tmp_path, monkeypatch):
    """A block-quantized FP8 checkpoint whose blocks a rank's share would cut (32-row blocks over 16-row KV heads
    at TP=2: rank 0 holds k rows 0:16) is the config's ValueError naming the block size, not each worker's
    RuntimeError after they start."""
    import json

    from pagedllm.distributed import executor

    def no_workers(*args):
        raise AssertionError("a worker process was started")
    monkeypatch.setattr(executor, "MultiprocExecutor", no_workers)
    d = make_tiny_model(tmp_path / "block", "llama")   # head_dim 16, 2 KV heads
    cfg = json.loads((tmp_path / "block" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    (tmp_path / "block" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rank 0 holds rows 0:16 of 32, not whole blocks of "
                                         r"quantization_config.weight_block_size \[32, 32\]"):
        LLM(d, tensor_parallel_size=2, **ENGINE)


def test_ranks_on_cpu_share_the_cores_and_the_threads_come_back(tiny_model_dirs, monkeypatch):
    """Without OMP_NUM_THREADS each rank on CPU takes its share of the cores (torch's default, a thread a core in
    every rank, made their OpenMP threads contend: a TP=2 step of a tiny model took 106 ms for 12 on 2 cores);
    this process's own count comes back at shutdown. With OMP_NUM_THREADS set, the user's choice stands."""
    import os

    import torch

    from pagedllm.distributed.parallel_state import cpu_threads_per_rank
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert cpu_threads_per_rank(torch.device("cpu"), 2) == 3 and cpu_threads_per_rank(torch.device("cpu"), 8) == 1
    assert cpu_threads_per_rank(torch.device("cuda"), 2) is None
    before = torch.get_num_threads()
    llm = LLM(tiny_model_dirs["llama"], tensor_parallel_size=2, **ENGINE)
    try:
        assert torch.get_num_threads() == 3
    finally:
        llm.shutdown()
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads_per_rank(torch.device("cpu"), 2) is None
