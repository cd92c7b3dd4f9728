"""The speculation policy: which steps speculate, which rows propose and how many tokens, and the back-off."""
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.speculator import Speculator

REPEAT = [5, 6, 7, 8, 9, 5, 6, 7]   # the last tokens 5 6 7 appeared before, followed by 8 9 5


def make(i: int, prompt=REPEAT, max_tokens: int = 100, computed: int | None = None, **params) -> Request:
    r = Request(str(i), list(prompt), SamplingParams(**params), max_tokens, block_size=16)
    r.append_output_token_id(7)   # decoding: one output token
    r.status = RequestStatus.RUNNING
    r.num_computed_tokens = r.num_tokens - 1 if computed is None else computed
    return r


def speculator(**kw) -> Speculator:
    cfg = SpeculativeConfig(**{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                               "prompt_lookup_max": 3, **kw})
    return Speculator(cfg, max_model_len=1000)


def test_ngram_proposals_and_their_limits():
    s = speculator()
    r = make(0, [5, 6, 7, 8, 9, 5, 6])   # + output 7: ... 5 6 7 -> 8 9 5
    assert s.wants_step([r], 0)
    assert s.propose([r]) == {"0": [8, 9, 5]}
    short = make(1, [5, 6, 7, 8, 9, 5, 6], max_tokens=3)   # one output so far: room for 1 proposal + 1 token
    assert s.propose([short]) == {"1": [8]}


def test_step_token_budget_shrinks_proposals():
    s = speculator(max_step_tokens=8)
    rows = [make(i, [5, 6, 7, 8, 9, 5, 6]) for i in range(3)]   # 8 // 3 - 1 = 1 proposal each
    assert all(len(ids) == 1 for ids in s.propose(rows).values())


def test_rows_that_may_not_speculate():
    s = speculator(disable_by_batch_size=2)
    assert not s.wants_step([make(0, computed=3)], 0)              # prompt chunks still running
    assert not s.wants_step([make(0, repetition_penalty=1.2)], 0)  # a logits processor
    assert not s.wants_step([make(0, min_tokens=5)], 0)            # min_tokens bans ahead
    assert not s.wants_step([make(0), make(1)], 1)                 # more than disable_by_batch_size
    assert s.wants_step([make(0, repetition_penalty=1.2), make(1)], 0)
    assert list(s.propose([make(0, repetition_penalty=1.2), make(1)])) == ["1"]


def test_back_off_doubles_and_recovers():
    s = speculator()
    r = make(0)
    waits = []
    for _ in range(3):
        s.observe("0", 3, 0)             # rejected
        steps = 0
        while not s.wants_step([r], 0):
            steps += 1
        waits.append(steps)
    assert waits == [1, 3, 7]            # due again after 2, 4, 8 steps (the call that says yes counts)
    s.observe("0", 3, 3)                 # accepted: the next draft is due at once
    assert s.wants_step([r], 0)
    assert (s.stats.num_drafts, s.stats.num_draft_tokens, s.stats.num_accepted_tokens) == (4, 12, 3)
    assert s.stats.accepted_per_pos == [1, 1, 1]
    s.forget(["0"])                      # finished: forgotten
    assert "0" not in s.tracks


def test_finished_requests_leave_nothing_behind():
    s = speculator()
    r = make(0)
    assert s.propose([r]) == {"0": [8, 9, 5]}
    s.observe("0", 3, 1)
    assert "0" in s.tracks and "0" in s.tokens.arrays
    s.forget({"0"})
    assert not s.tracks and not s.tokens.arrays


def test_a_lookup_that_finds_nothing_backs_off():
    s = speculator()
    r = make(0, [1, 2, 3, 4])            # + output 7: no earlier 7
    assert s.wants_step([r], 0) and s.propose([r]) == {}
    assert not s.wants_step([r], 0)
