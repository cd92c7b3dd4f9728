"""Copy-on-write forks of held requests (core/kv_fork.py) on fake sizes, no model: which blocks are shared, taken
over or copied, what each child computes, and that every block is freed exactly once (preemption, holds dropped
for room, aborts, mismatched children, prefix caching off); and the runner's block copy against plain torch."""
import pytest
import torch

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.messages import ModelRunnerOutput
from pagedllm.core.scheduler import Scheduler
from pagedllm.layers.quantization.fp8 import FP8
from pagedllm.request import Request, RequestStatus
from pagedllm.runner.kv_offload import copy_blocks
from pagedllm.sampling_params import SamplingParams

BS = 4


def make(num_blocks=32, max_num_seqs=8, budget=64):
    return Scheduler(KVCacheManager(num_blocks, BS), max_num_seqs, budget, 256)


def add(sched, rid, tokens, max_tokens=1, salt=None, **kw):
    req = Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens, BS,
                  cache_salt=salt, **kw)
    sched.add_request(req)
    return req


def step(sched, token=7):
    out = sched.schedule()
    res = ModelRunnerOutput()
    for rid in out.num_scheduled_tokens:
        req = sched.requests[rid]
        if req.num_computed_tokens == req.num_tokens:
            res.sampled_token_ids[rid] = [token]
    sched.update_from_output(out, res)
    return out


def run(sched, max_steps=200):
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outs
        outs.append(step(sched))
    raise AssertionError("did not finish")


def assert_all_free(sched):
    kv = sched.kv
    assert not kv.forks.holds and not kv.req_to_blocks
    assert kv.num_free_blocks == kv.pool.num_blocks and all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.num_empty_slots == 0 and not kv.req_to_empty_slots


def held_parent(sched, n=10, rid="p"):
    """A finished 1-token request of n prompt tokens (KV of n tokens: n // BS full blocks and a partial one)."""
    parent = add(sched, rid, range(100, 100 + n), hold_kv=True)
    run(sched)
    assert parent.status == RequestStatus.FINISHED_LENGTH and rid in sched.kv.forks.holds
    return parent, [b.block_id for b in sched.kv.forks.holds[rid].blocks]


def test_children_share_full_blocks_copy_partial_last_takes_it_over():
    sched = make()
    parent, pblocks = held_parent(sched)
    assert len(pblocks) == 3                                   # 10 tokens: 2 full + 2 of 4
    used_before = sched.kv.num_used_blocks
    kids = [add(sched, f"c{i}", parent.prompt_token_ids + [20 + i], kv_parent="p") for i in range(3)]
    sched.kv.forks.release(["p"])
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"c0": 1, "c1": 1, "c2": 1}    # only the new token: nothing recomputed
    tables = {r.req_id: r.block_ids for r in out.new_reqs}
    assert all(t[:2] == pblocks[:2] for t in tables.values())
    assert tables["c2"][2] == pblocks[2]                       # the last claimant takes the partial block over
    assert out.kv_transfers.block_copies == [(pblocks[2], tables["c0"][2]), (pblocks[2], tables["c1"][2])]
    assert sched.kv.num_used_blocks == used_before + 2         # two copies, no other block
    assert [sched.kv.pool.blocks[b].ref_cnt for b in pblocks] == [3, 3, 1]
    assert "p" not in sched.kv.forks.holds                     # the hold ended with its last claim
    assert all(k.num_computed_tokens == 11 for k in kids)
    sched.update_from_output(out, ModelRunnerOutput({f"c{i}": [7] for i in range(3)}))
    run(sched)
    assert_all_free(sched)
    assert sched.kv.forks.stats.num_forks == 3 and sched.kv.forks.stats.num_block_copies == 2


def test_block_aligned_parent_needs_no_copy():
    sched = make()
    parent, pblocks = held_parent(sched, n=8)
    assert len(pblocks) == 2
    add(sched, "c0", parent.prompt_token_ids + [1], kv_parent="p")
    add(sched, "c1", parent.prompt_token_ids + [2], kv_parent="p")
    sched.kv.forks.release(["p"])
    out = sched.schedule()
    assert not out.kv_transfers.block_copies and out.num_scheduled_tokens == {"c0": 1, "c1": 1}
    tables = [r.block_ids for r in out.new_reqs]
    assert tables[0][:2] == tables[1][:2] == pblocks and tables[0][2] != tables[1][2]
    sched.update_from_output(out, ModelRunnerOutput({"c0": [7], "c1": [7]}))
    assert_all_free(sched)


def test_release_without_children_frees_and_unknown_ids_are_ignored():
    sched = make()
    held_parent(sched)
    assert sched.kv.num_used_blocks == 3
    sched.kv.forks.release(["p", "nobody"])
    sched.kv.forks.release(["p"])                              # twice: nothing freed twice
    assert_all_free(sched)


def test_preempted_fork_child_recomputes_from_prefix_hits():
    sched = make()
    parent, pblocks = held_parent(sched)
    kid = add(sched, "c", parent.prompt_token_ids + [5], max_tokens=4, kv_parent="p")
    sched.kv.forks.release(["p"])
    step(sched)
    assert kid.kv_parent is None and kid.num_computed_tokens == 11
    sched.running.remove(kid)
    sched._preempt(kid)                                        # as allocate_or_preempt would
    prompt_tokens, num_tokens = sched.num_prompt_tokens, kid.num_tokens
    out = step(sched)
    # full blocks hit in the prefix cache; the partial block's tokens (and the new ones) are recomputed
    assert out.num_scheduled_tokens == {"c": num_tokens - 8}
    assert sched.num_prompt_tokens - prompt_tokens == 11 - 8
    run(sched)
    assert kid.status == RequestStatus.FINISHED_LENGTH
    assert_all_free(sched)


def test_holds_are_dropped_before_a_request_waits_for_room():
    sched = make(num_blocks=6)
    parent, _ = held_parent(sched)                             # 3 of 6 blocks held
    kid = add(sched, "c", parent.prompt_token_ids + [5], kv_parent="p")
    other = add(sched, "o", range(300, 320))                   # 20 tokens: 5 blocks, more than are free
    sched.finish_requests(["c"], RequestStatus.FINISHED_ABORTED)
    assert "p" in sched.kv.forks.holds                         # not released yet: the driver may add children
    run(sched)
    assert other.status == RequestStatus.FINISHED_LENGTH and kid.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv.forks.stats.num_dropped_holds == 1
    assert_all_free(sched)


def test_child_of_a_dropped_hold_is_admitted_without_a_fork():
    sched = make(num_blocks=8)
    parent, _ = held_parent(sched)
    kid = add(sched, "c", parent.prompt_token_ids + [5], kv_parent="p")
    sched.kv.forks.drop_oldest()
    out = step(sched)
    assert out.num_scheduled_tokens == {"c": 11 - 8} and not out.kv_transfers.block_copies
    assert kid.kv_parent is None
    run(sched)
    assert_all_free(sched)


def test_abort_of_the_last_waiting_child_ends_the_hold():
    sched = make()
    parent, _ = held_parent(sched)
    add(sched, "c", parent.prompt_token_ids + [5], kv_parent="p")
    sched.kv.forks.release(["p"])
    assert "p" in sched.kv.forks.holds
    sched.finish_requests(["c"], RequestStatus.FINISHED_ABORTED)
    assert_all_free(sched)


@pytest.mark.parametrize("salt,tokens", [("other", None), (None, [1, 2, 3]), (None, "short")])
def test_a_child_that_does_not_extend_its_parent_is_not_forked(salt, tokens):
    sched = make()
    parent, _ = held_parent(sched)
    tokens = parent.prompt_token_ids[:5] if tokens == "short" else tokens or parent.prompt_token_ids + [5]
    add(sched, "c", tokens, kv_parent="p", salt=salt)
    sched.kv.forks.release(["p"])
    out = step(sched)
    assert not out.kv_transfers.block_copies and sched.kv.forks.stats.num_forks == 0
    run(sched)
    assert_all_free(sched)


def test_prefix_caching_off_salted_beams_fork():
    sched = make()
    parent = add(sched, "p", range(100, 110), salt="beam-1", hold_kv=True)
    run(sched)
    add(sched, "c", parent.prompt_token_ids + [5], kv_parent="p", salt="beam-1")
    sched.kv.forks.release(["p"])
    assert step(sched).num_scheduled_tokens == {"c": 1}
    assert_all_free(sched)


def test_chain_of_forks_over_many_steps_leaks_nothing():
    """Beam-search shaped: 3 beams, each step every beam forks one of the last step's requests."""
    sched = make(num_blocks=40, max_num_seqs=2)                # fewer seqs than beams: admitted over several steps
    parents = [add(sched, "s0", range(50, 63), hold_kv=True)]
    run(sched)
    computed = sched.num_prompt_tokens
    for t in range(1, 12):
        kids = [add(sched, f"s{t}-{j}", parents[j % len(parents)].prompt_token_ids + [j], kv_parent=parents[
            j % len(parents)].request_id, hold_kv=True) for j in range(3)]
        sched.kv.forks.release([p.request_id for p in parents])
        run(sched)
        parents = kids
    sched.kv.forks.release([p.request_id for p in parents])
    assert sched.num_prompt_tokens - computed == 3 * 11        # one token per beam per step
    assert_all_free(sched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
def test_copy_blocks_copies_every_layer_k_and_v(dtype):
    g = torch.Generator().manual_seed(0)
    caches = [torch.randn((2, 6, BS, 2, 8), generator=g).to(dtype) for _ in range(3)]
    want = [c.clone() for c in caches]
    for w in want:
        w[:, 4], w[:, 5] = w[:, 1], w[:, 2]
    copy_blocks(caches, [(1, 4), (2, 5)])
    for c, w in zip(caches, want):
        assert torch.equal(c.view(torch.uint8), w.view(torch.uint8))
