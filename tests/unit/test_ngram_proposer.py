import random

import numpy as np
import pytest

from pagedllm.spec_decode.ngram import NgramProposer, TokenArrays


def reference(token_ids: list[int], min_n: int, max_n: int, k: int, max_tokens: int) -> list[int]:
    """The definition, one n and one start at a time."""
    if max_tokens <= 0:
        return []
    num = len(token_ids)
    for n in range(max_n, min_n - 1, -1):
        if n >= num:
            continue
        suffix = token_ids[num - n:]
        for start in range(num - n):          # start < num - n: not the suffix itself
            if token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + min(k, max_tokens)]
    return []


def propose(token_ids, min_n=1, max_n=3, k=4, max_tokens=100):
    return NgramProposer(min_n, max_n, k).propose(token_ids, max_tokens)


def test_longest_n_wins():
    # "3" alone first occurs at 2 (-> 7); "2 3" first occurs at 5 (-> 8 9).
    assert propose([1, 9, 3, 7, 5, 2, 3, 8, 9, 2, 3]) == [8, 9, 2, 3]
    assert propose([1, 9, 3, 7, 5, 2, 3, 8, 9, 2, 3], max_n=1) == [7, 5, 2, 3]


def test_earliest_occurrence():
    assert propose([5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 6], min_n=2, max_n=2) == [1, 5, 6, 2]


def test_truncation_at_k_and_max_tokens():
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert propose(ids, k=3) == [3, 4, 5]
    assert propose(ids, k=5, max_tokens=2) == [3, 4]
    assert propose(ids, max_tokens=0) == []
    assert propose(ids, max_tokens=-1) == []


def test_proposal_runs_to_the_end():
    # The only earlier "7 7" starts at 0 and overlaps the suffix: what follows is the rest of the sequence.
    assert propose([7, 7, 7], min_n=2, max_n=2, k=5) == [7]
    assert propose([4, 1, 2, 9, 1, 2], min_n=2, max_n=2, k=10) == [9, 1, 2]


def test_no_match():
    assert propose([1, 2, 3, 4, 5]) == []
    assert propose([1, 2, 3, 1, 5], min_n=2) == []   # "5" never occurred before; "1 5" neither
    assert propose([]) == []
    assert propose([3]) == []


def test_n_larger_than_sequence():
    assert propose([2, 2], min_n=1, max_n=8) == [2]
    assert propose([2, 2], min_n=2, max_n=8) == []
    assert propose([1, 2, 1, 2], min_n=2, max_n=8, k=1) == [1]


def test_numpy_input_is_the_same():
    ids = [1, 9, 3, 7, 5, 2, 3, 8, 9, 2, 3]
    assert propose(np.array(ids)) == propose(ids) == [8, 9, 2, 3]


@pytest.mark.parametrize("min_n,max_n", [(1, 1), (1, 3), (2, 4), (3, 5)])
def test_matches_reference_on_random_sequences(min_n, max_n):
    rng = random.Random(min_n * 10 + max_n)
    proposer = NgramProposer(min_n, max_n, 3)
    for _ in range(300):
        ids = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        max_tokens = rng.randrange(-1, 5)
        assert proposer.propose(ids, max_tokens) == reference(ids, min_n, max_n, 3, max_tokens), ids


def test_token_arrays_follow_appends():
    """A request's tokens grow step by step (past the array's spare room too): proposals from its kept array
    always match a fresh computation."""
    rng = random.Random(0)
    proposer, arrays = NgramProposer(1, 3, 4), TokenArrays()
    ids: list[int] = []
    for _ in range(400):
        ids += [rng.randrange(5) for _ in range(rng.randrange(1, 4))]
        tokens = arrays.get("r", ids)
        assert tokens.tolist() == ids
        assert proposer.propose(tokens, 4) == reference(ids, 1, 3, 4, 4)


def test_token_arrays_forget_finished_requests():
    arrays = TokenArrays()
    arrays.get("a", [1, 2, 3])
    arrays.get("b", [4, 5])
    arrays.forget(["a", "gone"])
    assert list(arrays.arrays) == ["b"]
    assert arrays.get("a", [7, 8]).tolist() == [7, 8]   # a new request under the id starts afresh
