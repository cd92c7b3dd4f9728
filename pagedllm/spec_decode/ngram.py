"""Prompt lookup (vLLM's "ngram" method): propose the tokens that followed an earlier occurrence of the
sequence's own last n tokens.

    token_ids:  ... a b c X Y ... ... a b c      last n = 3 tokens "a b c"
                    └─┬─┘ └┬┘          └─┬─┘
            earliest earlier   proposal    the suffix itself (never its own match)
            occurrence         (<= k tokens)

n runs from max_n down to min_n; the first n with an occurrence wins, and of its occurrences the earliest.

One pass finds every n: a mask of the positions where an earlier occurrence of the last n tokens ends is
narrowed from n to n + 1 by one vectorised compare, until it is empty or n reaches max_n; the last
non-empty mask at n >= min_n gives the longest n, and its first position the earliest occurrence.

Converting a Python list to numpy costs ~35 ns a token (1 ms at 30,000), far more than the search, so each
sequence's numpy copy is kept between calls and only its new tokens are converted (_TokenCache).
"""
import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, k: int, max_cached: int = 256):
        assert 1 <= min_n <= max_n and k >= 1, (min_n, max_n, k)
        self.min_n, self.max_n, self.k = min_n, max_n, k
        self.cache = _TokenCache(max_cached)

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """token_ids: the request's prompt and output tokens (a list, or a 1-D numpy int array: no copy);
        max_tokens: the most tokens the caller can take (e.g. what is left of max_tokens)."""
        num_tokens = min(self.k, max_tokens)
        if num_tokens <= 0 or len(token_ids) <= self.min_n:
            return []
        tokens = token_ids if isinstance(token_ids, np.ndarray) else self.cache.as_array(token_ids)
        end = find_match_end(tokens, self.min_n, self.max_n)
        return [] if end < 0 else tokens[end + 1:end + 1 + num_tokens].tolist()


def find_match_end(tokens: np.ndarray, min_n: int, max_n: int) -> int:
    """The end index of the earliest earlier occurrence of the longest suffix (min_n..max_n tokens) that
    occurs earlier; -1 when none does. Earlier: it ends before the last token, so at least one token follows."""
    num = len(tokens)
    if num <= min_n:
        return -1
    # ends[e]: the last t + 1 tokens also occur ending at e (e <= num - 2). Whole-array compares, not a
    # candidate list: a frequent last token (a space, a newline) would make that list long.
    ends = tokens[:num - 1] == tokens[num - 1]
    best = int(ends.argmax()) if min_n == 1 and ends.any() else -1
    for t in range(1, min(max_n, num - 1)):
        ends[t:] &= tokens[:num - 1 - t] == tokens[num - 1 - t]
        ends[:t] = False                     # an occurrence cannot start before the sequence
        if not ends.any():
            break
        if t + 1 >= min_n:
            best = int(ends.argmax())        # the first True: the earliest occurrence of this length
    return best


@dataclass
class _Entry:
    token_ids: list[int]   # the caller's list itself: holding it keeps id(token_ids) from being reused
    copy: list[int]        # its contents when last seen: the check that it only grew
    array: np.ndarray      # int32 with spare room; array[:len(copy)] is valid


class _TokenCache:
    """Each list's numpy copy, updated with the tokens appended since the last call. Keyed by id(list),
    safe because the entry holds the list (so the id cannot pass to a new object) and checks its contents
    against a plain copy (list == list over the same int objects: ~2 ns a token, against ~35 to convert).
    Any other change (a truncation, an edit) rebuilds the entry. Entries whose list nobody else holds any
    more (a finished request) are dropped when a new list arrives; past max_entries, the least recent."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries: OrderedDict[int, _Entry] = OrderedDict()

    def as_array(self, token_ids: list[int]) -> np.ndarray:
        key = id(token_ids)
        entry = self.entries.get(key)
        if entry is None:
            self._drop_dead()
        if entry is None or entry.token_ids is not token_ids or not _grew(entry, token_ids):
            entry = self.entries[key] = _Entry(token_ids, list(token_ids), _to_array(token_ids))
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry.array[:len(token_ids)]

    def _drop_dead(self):
        # getrefcount: the entry's reference plus the call's own argument. A miscount costs only speed:
        # a live list dropped is rebuilt on its next call.
        dead = [key for key, entry in self.entries.items() if sys.getrefcount(entry.token_ids) <= 2]
        for key in dead:
            del self.entries[key]


def _grew(entry: _Entry, token_ids: list[int]) -> bool:
    """Appends the new tokens to the entry when token_ids is its old contents plus new tokens."""
    old = len(entry.copy)
    if len(token_ids) < old:
        return False
    new = token_ids[old:]
    entry.copy.extend(new)
    if entry.copy != token_ids:
        return False
    if len(token_ids) > len(entry.array):
        entry.array = np.concatenate((entry.array[:old], np.empty(len(token_ids), np.int32)))
    entry.array[old:len(token_ids)] = new
    return True


def _to_array(token_ids: list[int]) -> np.ndarray:
    array = np.empty(max(len(token_ids) * 3 // 2, 64), dtype=np.int32)   # spare room for appends
    array[:len(token_ids)] = token_ids
    return array
