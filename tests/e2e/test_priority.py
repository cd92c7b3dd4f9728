"""scheduling_policy "priority" (vLLM's): the most urgent requests run first, greedy outputs stay exactly
FCFS's (under preemption too), and a priority is refused where the policy is fcfs."""
import pytest

from pagedllm import LLM, SamplingParams

PRIORITIES = [3, 0, 2, 0, 1, 5]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts():
    return [[(7 * i + j) % 500 + 1 for j in range(20 + 3 * i)] for i in range(len(PRIORITIES))]


def _llm(model, policy):
    # two seats, and 6 blocks of 16 for two requests of up to 59 tokens (4 blocks each): preemptions
    return LLM(model, dtype="float32", log_stats_interval=0, scheduling_policy=policy, max_num_seqs=2,
               num_gpu_blocks_override=6, enable_prefix_caching=False)


def test_urgent_requests_run_first_and_outputs_equal_fcfs(tiny_model_dirs):
    model = tiny_model_dirs["llama"]
    fcfs = _llm(model, "fcfs").generate(_prompts(), GREEDY, use_tqdm=False)
    llm = _llm(model, "priority")
    prio = llm.generate(_prompts(), GREEDY, use_tqdm=False, priority=PRIORITIES)
    assert [o.outputs[0].token_ids for o in prio] == [o.outputs[0].token_ids for o in fcfs]
    assert llm.engine.core.scheduler.num_preemptions > 0
    urgent, lax = [1, 3], [0, 2, 5]      # priority 0; and 2, 3, 5 (priority 1 takes the first free seat)
    assert max(prio[i].metrics.finished_time for i in urgent) < min(prio[i].metrics.first_token_time for i in lax)
    # fcfs runs them in arrival order: the first request starts before the urgent ones finish
    assert fcfs[0].metrics.first_token_time < max(fcfs[i].metrics.finished_time for i in urgent)


def test_priority_is_refused_without_the_policy_and_checked(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", log_stats_interval=0)
    with pytest.raises(ValueError, match="priority 2 needs scheduling_policy 'priority'"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False, priority=[2])
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False, priority=[0])[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="priority has 1 entries for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], GREEDY, use_tqdm=False, priority=[0])
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False, priority=[0.5])
    assert not llm.engine.core.scheduler.has_unfinished_requests()
