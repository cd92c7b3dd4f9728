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
request's numpy copy is kept between steps and only its new tokens are converted (TokenArrays: a request's
tokens only grow).
"""
import numpy as np


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, k: int):
        assert 1 <= min_n <= max_n and k >= 1, (min_n, max_n, k)
        self.min_n, self.max_n, self.k = min_n, max_n, k

    def propose(self, tokens: np.ndarray | list[int], max_tokens: int) -> list[int]:
        """tokens: the request's prompt and output tokens (a 1-D numpy int array, e.g. from TokenArrays, or a
        list); max_tokens: the most tokens the caller can take (e.g. what is left of max_tokens)."""
        num_tokens = min(self.k, max_tokens)
        if num_tokens <= 0 or len(tokens) <= self.min_n:
            return []
        tokens = np.asarray(tokens)
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


class TokenArrays:
    """Each request's tokens as an int32 numpy array with spare room, kept between steps; a request's tokens
    only grow, so a call converts only those appended since the last. forget() drops finished requests."""

    def __init__(self):
        self.arrays: dict[str, tuple[np.ndarray, int]] = {}   # req_id -> (array, tokens valid in it)

    def get(self, req_id: str, token_ids: list[int]) -> np.ndarray:
        array, num = self.arrays.get(req_id, (None, 0))
        if array is None or len(token_ids) > len(array):
            grown = np.empty(max(len(token_ids) * 3 // 2, 64), dtype=np.int32)
            if array is not None:
                grown[:num] = array[:num]
            array = grown
        array[num:len(token_ids)] = token_ids[num:]
        self.arrays[req_id] = (array, len(token_ids))
        return array[:len(token_ids)]

    def forget(self, req_ids):
        for req_id in req_ids:
            self.arrays.pop(req_id, None)
