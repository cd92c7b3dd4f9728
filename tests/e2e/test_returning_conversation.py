"""A returning conversation through the CPU tier (tiny random Llama, float32, CPU): turn 1 (a long prompt and a
short answer) is pushed out of the GPU cache by other traffic, then the next turn (history + answer + a new
message) loads the whole history from the CPU tier: the chained block hashes of turn 1's prompt and output
name the blocks. Its greedy tokens must equal recompute's, and the tier must have served the blocks."""
import numpy as np
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.runner import kv_offload

BS = 8
BLOCK_BYTES = 2 * 2 * BS * 2 * 16 * 4     # layers x K,V x block_size x kv_heads x head_dim x float32
HISTORY, ANSWER, NEW, OUT = 150, 12, 10, 16
GPU_BLOCKS = 32                           # the returning turn needs 24; other traffic needs 39 to pass
ANSWER_PARAMS = SamplingParams(temperature=0.0, max_tokens=ANSWER, ignore_eos=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=OUT, ignore_eos=True)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 512, size=n).tolist()


def run(llm: LLM, prompt: list[int], params: SamplingParams):
    return llm.generate([prompt], params, use_tqdm=False)[0]


def converse(llm: LLM) -> tuple[list[int], list[int], int]:
    """Turn 1, other traffic, the returning turn: (turn 1's answer, the returning turn's tokens, the GPU
    prefix-cache hit tokens of the returning turn)."""
    history = ids(HISTORY, 0)
    answer = run(llm, history, ANSWER_PARAMS).outputs[0].token_ids
    for seed in (1, 2, 3):                # 3 x 13 blocks: every block of turn 1 leaves the GPU
        run(llm, ids(100, seed), SamplingParams(max_tokens=1))
    gpu_hits = llm.engine.scheduler.kv.prefix_stats.hits
    back = run(llm, history + list(answer) + ids(NEW, 4), GREEDY)
    return list(answer), list(back.outputs[0].token_ids), llm.engine.scheduler.kv.prefix_stats.hits - gpu_hits


@pytest.fixture(scope="module")
def recomputed(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", log_stats_interval=0, block_size=BS,
              num_gpu_blocks_override=GPU_BLOCKS)
    answer, back, gpu_hits = converse(llm)
    assert gpu_hits == 0 and "cpu" not in llm.engine.get_stats().kv_tiers
    return answer, back


@pytest.mark.parametrize("tier_blocks,chunk", [(256, None), (256, 3), (12, None)],
                         ids=["whole-history", "chunks-of-3", "tier-smaller-than-history"])
def test_returning_turn_loads_its_history_from_the_cpu_tier(tiny_model_dirs, recomputed, monkeypatch,
                                                            tier_blocks, chunk):
    if chunk is not None:                 # the history's 20 blocks in 7 copies through the scratch
        monkeypatch.setattr(kv_offload, "COPY_CHUNK_BLOCKS", chunk)
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", log_stats_interval=0, block_size=BS,
              num_gpu_blocks_override=GPU_BLOCKS, kv_offloading_size=tier_blocks * BLOCK_BYTES / 2**30)
    answer, back, gpu_hits = converse(llm)
    assert (answer, back) == recomputed
    assert gpu_hits == 0                  # nothing of turn 1 was left on the GPU
    cpu = llm.engine.get_stats().kv_tiers["cpu"]
    history_blocks = (HISTORY + ANSWER - 1) // BS   # turn 1's computed full blocks: its answer's too
    if tier_blocks >= history_blocks:
        assert cpu.hits == history_blocks
    else:                                 # the tier kept the head (a prefix is evicted tail first)
        assert 0 < cpu.hits <= tier_blocks
    assert cpu.bytes_loaded == cpu.hits * BLOCK_BYTES
    off = llm.engine.scheduler.offload
    assert off.cpu_pool.num_free_blocks == off.cpu_pool.num_blocks    # no slot left pinned
