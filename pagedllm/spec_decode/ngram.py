"""Prompt lookup (vLLM's "ngram" method): propose the tokens that followed an earlier occurrence of the
sequence's own last n tokens.

    token_ids:  ... a b c X Y ... ... a b c      last n = 3 tokens "a b c"
                    └─┬─┘ └┬┘          └─┬─┘
            earliest earlier   proposal    the suffix itself (never its own match)
            occurrence         (<= k tokens)

n runs from max_n down to min_n; the first n with an occurrence wins, and of its occurrences the earliest.

One search finds every n at once: the candidates are the ends e of earlier occurrences of the last min_n
tokens (a vectorised compare over the whole sequence), and each candidate's match is then extended
backwards to at most max_n. The longest match wins; among those that reach it, the earliest end.

Converting a Python list to numpy costs ~35 ns a token (1 ms at 30,000), far more than the search, so each
sequence's numpy copy is kept between calls and only its new tokens are converted (_TokenCache).
"""
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
    # Occurrences of the last min_n tokens that end at e <= num - 2: compare all ends at once.
    match = tokens[min_n - 1:num - 1] == tokens[num - 1]
    for t in range(1, min_n):
        match &= tokens[min_n - 1 - t:num - 1 - t] == tokens[num - 1 - t]
    ends = np.flatnonzero(match) + (min_n - 1)
    if len(ends) == 0:
        return -1
    # Extend each candidate backwards; a match stops at the sequence start or the first difference.
    length = np.full(len(ends), min_n)
    alive = np.ones(len(ends), dtype=bool)
    for t in range(min_n, min(max_n, num - 1)):
        starts = ends - t
        alive &= starts >= 0
        alive[alive] = tokens[starts[alive]] == tokens[num - 1 - t]
        if not alive.any():
            break
        length += alive
    return int(ends[np.argmax(length)])   # argmax: the first (earliest) of the longest


@dataclass
class _Entry:
    token_ids: list[int]   # the caller's list itself: holding it keeps id(token_ids) from being reused
    copy: list[int]        # its contents when last seen: the check that it only grew
    array: np.ndarray      # a numpy copy with spare room; array[:len(copy)] is valid


class _TokenCache:
    """Each list's numpy copy, updated with the tokens appended since the last call. Keyed by id(list),
    safe because the entry holds the list (so the id cannot pass to a new object) and checks its contents
    against a plain copy (list == list with the same int objects: ~2 ns a token, not ~35 for conversion).
    Any other change (a truncation, an edit) rebuilds the entry. Least recently used entries go first."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries: OrderedDict[int, _Entry] = OrderedDict()

    def as_array(self, token_ids: list[int]) -> np.ndarray:
        entry = self.entries.get(id(token_ids))
        if entry is None or entry.token_ids is not token_ids or not _grew(entry, token_ids):
            entry = _Entry(token_ids, list(token_ids), _to_array(token_ids, 2 * len(token_ids)))
        self.entries[id(token_ids)] = entry
        self.entries.move_to_end(id(token_ids))
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry.array[:len(token_ids)]


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
        entry.array = np.concatenate((entry.array[:old], np.empty(len(token_ids), entry.array.dtype)))
    entry.array[old:len(token_ids)] = new
    return True


def _to_array(token_ids: list[int], capacity: int) -> np.ndarray:
    array = np.empty(max(capacity, 16), dtype=np.int64)
    array[:len(token_ids)] = token_ids
    return array
