"""Scheduler on fake sizes without a model: a fake runner samples token 7 for every request that reaches
the end of its known tokens."""
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.messages import ModelRunnerOutput
from pagedllm.core.scheduler import Scheduler
from pagedllm.metrics import PromptTokenSources
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams

BS = 4


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=64, max_model_len=256):
    kv = KVCacheManager(num_blocks, BS)
    return Scheduler(kv, max_num_seqs, budget, max_model_len)


def add(sched, req_id, prompt_len, max_tokens=4, first_token=0, **params):
    params.setdefault("ignore_eos", True)
    req = Request(req_id, list(range(first_token, first_token + prompt_len)), SamplingParams(**params),
                  max_tokens, BS)
    sched.add_request(req)
    return req


def fake_runner(sched, sched_out, token=7):
    out = ModelRunnerOutput()
    for req_id, n in sched_out.num_scheduled_tokens.items():
        req = sched.requests[req_id]
        if req.num_computed_tokens == req.num_tokens:   # the step reached the end: it samples
            out.sampled_token_ids[req_id] = [token]
    return out


def step(sched):
    out = sched.schedule()
    return out, sched.update_from_output(out, fake_runner(sched, out))


def run_to_end(sched, max_steps=1000):
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outs
        outs.append(step(sched))
    raise AssertionError("did not finish")


def test_budget_is_filled_running_first_then_fcfs_with_chunking():
    sched = make_scheduler(budget=10)
    add(sched, "a", 6)
    add(sched, "b", 7, first_token=100)
    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"a": 6, "b": 4}           # b's prompt is chunked
    assert [r.req_id for r in out.new_reqs] == ["a", "b"]
    out, core = step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 3}           # a decodes, b finishes its prompt
    assert [c.req_id for c in core] == ["a", "b"]
    assert [c.req_id for c in out.cached_reqs] == ["a", "b"] and not out.new_reqs


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        add(sched, f"r{i}", 4, first_token=100 * i)
    out, _ = step(sched)
    assert list(out.num_scheduled_tokens) == ["r0", "r1"] and len(sched.waiting) == 1


def test_finish_by_length_frees_blocks_and_reports_to_runner():
    sched = make_scheduler()
    add(sched, "a", 5, max_tokens=3)
    outs = run_to_end(sched)
    finals = [c for _, core in outs for c in core if c.finish_reason]
    assert finals[0].finish_reason == "length" and finals[0].req_id == "a"
    assert sched.kv.num_free_blocks == 64
    assert "a" in sched.schedule().finished_req_ids


def test_stop_token_and_min_tokens():
    sched = make_scheduler()
    add(sched, "a", 5, max_tokens=10, stop_token_ids=[7], min_tokens=2)
    params = sched.requests["a"].sampling_params
    params.all_stop_token_ids = {7}
    outs = run_to_end(sched)
    tokens = [t for _, core in outs for c in core for t in c.new_token_ids]
    assert tokens == [7, 7]                      # first 7 ignored (min_tokens=2), second stops
    last = outs[-1][1][0]
    assert last.finish_reason == "stop" and last.stop_reason == 7


def test_preemption_recomputes_newest_and_everything_finishes_without_leaks():
    # 6 blocks of 4 = 24 slots; three requests of 8 prompt + 8 output need 12 blocks together.
    sched = make_scheduler(num_blocks=6, budget=64)
    reqs = [add(sched, f"r{i}", 8, max_tokens=8, first_token=100 * i) for i in range(3)]
    outs = run_to_end(sched)
    assert sched.num_preemptions > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 8 for r in reqs)
    assert sched.kv.num_free_blocks == 6
    # A preempted request comes back as a new request for the runner, with all its known tokens.
    resumed = [n for o, _ in outs for n in o.new_reqs if len(n.token_ids) > 8]
    assert resumed and all(n.num_prompt_tokens == 8 for n in resumed)


def test_preempted_request_goes_to_front_of_waiting_and_newest_is_victim():
    sched = make_scheduler(num_blocks=4, budget=64)
    add(sched, "old", 7, max_tokens=20)
    add(sched, "new", 7, max_tokens=20, first_token=100)
    step(sched)          # both prefilled: 2 blocks each, all 4 used
    add(sched, "later", 3, first_token=200)
    for _ in range(3):
        step(sched)
    assert sched.requests["new"].num_preemptions >= 1
    assert sched.requests["old"].num_preemptions == 0
    assert sched.waiting[0].request_id == "new"


def _add_at(sched, req_id, prompt_len, priority, arrival, **kw):
    req = Request(req_id, list(range(prompt_len)), SamplingParams(ignore_eos=True), kw.pop("max_tokens", 4), BS,
                  arrival_time=arrival, cache_salt=req_id, priority=priority)
    sched.add_request(req)
    return req


def test_priority_policy_admits_lower_priority_first_then_by_arrival():
    sched = Scheduler(KVCacheManager(64, BS), 2, 64, 256, policy="priority")
    for req_id, priority, arrival in [("late-urgent", 0, 3.0), ("b", 5, 1.0), ("early-urgent", 0, 2.0),
                                      ("c", 1, 0.5)]:
        _add_at(sched, req_id, 4, priority, arrival)
    out, _ = step(sched)     # two seats: the two of priority 0, the earlier first
    assert [r.req_id for r in out.new_reqs] == ["early-urgent", "late-urgent"]
    assert [r.request_id for r in sched.waiting] == ["c", "b"]
    fcfs = make_scheduler(max_num_seqs=2)
    for req_id, priority, arrival in [("x", 0, 3.0), ("y", 5, 1.0)]:
        _add_at(fcfs, req_id, 4, priority, arrival)
    assert [r.req_id for r in step(fcfs)[0].new_reqs] == ["x", "y"]   # fcfs: the order of arrival at the queue


def test_priority_policy_preempts_the_least_urgent_running_request():
    sched = Scheduler(KVCacheManager(4, BS), 8, 64, 256, policy="priority")
    _add_at(sched, "lax", 7, 9, 1.0, max_tokens=9)       # each fits alone (16 slots), not both; lax is
    _add_at(sched, "urgent", 7, 0, 2.0, max_tokens=9)    # older and queued first: fcfs would preempt urgent
    step(sched)                                          # both prefilled: 2 blocks each, all 4 used
    for _ in range(3):
        step(sched)
    assert sched.requests["lax"].num_preemptions >= 1
    assert sched.requests["urgent"].num_preemptions == 0
    _add_at(sched, "newest", 3, 0, 3.0)                  # more urgent than lax: ahead of it in the queue
    assert [r.request_id for r in sched.waiting] == ["newest", "lax"]
    run_to_end(sched)
    assert sched.kv.num_free_blocks == 4


def test_prefix_hit_skips_computed_tokens():
    sched = make_scheduler()
    add(sched, "a", 10, max_tokens=1)
    run_to_end(sched)
    add(sched, "b", 10, max_tokens=1)
    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"b": 2}             # 8 tokens (2 blocks) from the cache
    assert out.new_reqs[0].num_computed_tokens == 8
    stats = sched.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8)


def test_siblings_in_one_step_share_prompt_blocks():
    sched = make_scheduler()
    add(sched, "p#0", 10)
    add(sched, "p#1", 10)
    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"p#0": 10, "p#1": 2}
    ids0, ids1 = sched.kv.get_block_ids("p#0"), sched.kv.get_block_ids("p#1")
    assert ids0[:2] == ids1[:2] and ids0[2] != ids1[2]
    assert sched.kv.num_free_blocks == 64 - 4


def test_abort_waiting_and_running_frees_everything():
    sched = make_scheduler(max_num_seqs=1)
    add(sched, "a", 6, max_tokens=50)
    add(sched, "b", 6, first_token=100)
    step(sched)
    sched.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests() and sched.kv.num_free_blocks == 64
    assert sched.schedule().finished_req_ids == {"a", "b"}


def test_empty_schedule_when_nothing_to_do():
    sched = make_scheduler()
    out = sched.schedule()
    assert out.is_empty and out.num_scheduled_tokens == {}


def test_prompt_tokens_total_counts_each_prompt_once_cached_tokens_included():
    """vLLM's prompt_tokens counter: a request's whole prompt when it yields its first token; a prefix-cache hit
    counts, a recompute after preemption does not (num_prompt_tokens stays the tokens computed)."""
    sched = make_scheduler()
    add(sched, "a", 9)
    run_to_end(sched)
    add(sched, "b", 9)   # its first 8 tokens (2 blocks) are a's
    run_to_end(sched)
    stats = sched.make_stats()
    assert stats.num_prompt_tokens_total == 18 and stats.num_prompt_tokens == 9 + 1
    assert stats.prompt_token_sources == PromptTokenSources(local_compute=9 + 1, local_cache_hit=8)
    sched = make_scheduler(num_blocks=6, budget=64)
    for i in range(3):
        add(sched, f"r{i}", 8, max_tokens=8, first_token=100 * i)
    run_to_end(sched)
    assert sched.num_preemptions > 0 and sched.make_stats().num_prompt_tokens_total == 3 * 8


def test_iteration_tokens_histogram_counts_each_steps_tokens():
    """vLLM's iteration_tokens_total: one observation a step, of the computed prompt tokens of the requests whose
    first token came in it and the tokens sampled; a prefill chunk that samples nothing adds no tokens."""
    sched = make_scheduler(budget=6)
    add(sched, "a", 9, max_tokens=2)   # chunks of 6 and 3 tokens, then one decode step
    run_to_end(sched)
    hist = sched.make_stats().iteration_tokens
    assert sum(hist.counts) == 3 and hist.total == 0 + (9 + 1) + 1
    assert hist.counts[0] == 2 and hist.counts[hist.bounds.index(16)] == 1   # 0 and 1 in le=1, 10 in le=16


def test_prefix_cache_queries_count_first_admissions_that_read_the_cache():
    """vLLM's prefix_cache_queries/hits: a preempted request's readmission is not a query (its own blocks hit
    again), nor a request that skips the cache (prompt logprobs)."""
    sched = make_scheduler(num_blocks=6, budget=64)
    for i in range(3):
        add(sched, f"r{i}", 8, max_tokens=8, first_token=100 * i)
    run_to_end(sched)
    assert sched.num_preemptions > 0 and sched.kv.prefix_stats.queries == 3 * 8
    sched = make_scheduler()
    add(sched, "a", 9)
    run_to_end(sched)
    add(sched, "b", 9, prompt_logprobs=1)
    run_to_end(sched)
    assert (sched.kv.prefix_stats.queries, sched.kv.prefix_stats.hits) == (9, 0)
