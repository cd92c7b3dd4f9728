"""How a long prompt row is cut into cuDNN calls whose shapes come from a small fixed set (cudnn_prefill.py).

cuDNN builds an execution plan (55-70 ms on the H200) for every new (query len, key len) shape, so a row of
L new tokens after C cached ones is padded and split into calls of a few fixed shapes:

    keys  | piece 8192 | piece 8192 | piece 4096 | r ctx | L own | dummy |      C_big = C - C % 4096, r = C % 4096
    square (causal): queries [r dummies, the L real ones, dummies] x keys [r ctx, L own, dummies], S = roundup(r + L, G)
    pieces (no mask): queries [the L real ones, dummies up to roundup(L, G)] x one piece of the context each

cuDNN's causal mask is top-left aligned: query i sees keys 0..i. Real query j sits at index r + j of the
square, so it sees the r context keys after C_big and its own keys 0..j; the trailing dummy keys are seen by
dummy rows only. Each call gives its log-sum-exp, and the parts are merged (cudnn_prefill._merge).

Why these sizes: G = 1024 (= LONG_QUERY_LEN, the shortest row sent here) pads a row by under 1024 query rows at
each end: a row of 1025 new tokens computes up to twice its pairs against the context and four times in its
square, rows of 8k+ under 13% more; and it is a multiple of cuDNN's tiles (64/128) and of every block size.
Context pieces of 8192 and 4096 keys, with the remainder (< 4096) folded into the square, keep the calls few
(a 30k context: 5) and the plans few: on a W4-like sequence of chunks (32 x 30k tokens, budget 16384) 30
distinct shapes and 2.1 calls a row, computing 7.7% more (query, key) pairs than the exact split; pieces of
8192..1024 (a remainder under 1024) would compute 6.4% more, with 2.7 calls a row (each a part to merge) and
42 shapes (81 against 52 to pre-build at start-up for W4's limits). The price: a row of ~1k new tokens after a
long context computes up to 4095^2 / 2 extra pairs in its square (rows of 4k+ new tokens: a few %).
"""
from dataclasses import dataclass

GRANULE = 1024              # query rows and square sides are multiples of this
PIECES = (8192, 4096)       # context piece lengths, largest first; each a multiple of the next
UNIT = PIECES[-1]           # context tokens past the last multiple of UNIT go into the square


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class RowSplit:
    """One row's calls. Key positions count from the row's first token; pieces are (first key, length)."""
    query_len: int          # L: the row's new tokens
    context: int            # C: its cached tokens before them

    @property
    def context_big(self) -> int:           # C_big: the context the pieces cover
        return self.context - self.context % UNIT

    @property
    def lead(self) -> int:                  # r: context keys in the square, and dummy query rows before the real
        return self.context % UNIT

    @property
    def square(self) -> int:                # S: the causal call's queries and keys
        return round_up(self.lead + self.query_len, GRANULE)

    @property
    def padded_query_len(self) -> int:      # the pieces' queries
        return round_up(self.query_len, GRANULE)

    @property
    def query_rows(self) -> int:            # one padded query buffer serves both: [0, S) and [r, r + padded)
        return max(self.square, self.lead + self.padded_query_len)

    @property
    def pieces(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for size in PIECES:
            while self.context_big - start >= size:
                out.append((start, size))
                start += size
        return out

    def shapes(self) -> list[tuple[bool, int, int]]:
        """(causal, query len, key len) of each call."""
        return [(True, self.square, self.square)] + [(False, self.padded_query_len, n) for _, n in self.pieces]


def reachable_shapes(min_query_len: int, max_query_len: int, max_model_len: int) -> set[tuple[bool, int, int]]:
    """Every call shape of rows with min_query_len..max_query_len new tokens (the step's token budget) and at
    most max_model_len tokens in all: what start-up pre-builds."""
    max_query_len = min(max_query_len, max_model_len)
    if min_query_len > max_query_len:
        return set()
    shapes = set()
    # Square: r + L takes every value from min_query_len to this top (r < UNIT, r + L <= max_model_len).
    top = min(UNIT - 1 + max_query_len, max_model_len)
    for side in range(round_up(min_query_len, GRANULE), round_up(top, GRANULE) + 1, GRANULE):
        shapes.add((True, side, side))
    for padded in range(round_up(min_query_len, GRANULE), round_up(max_query_len, GRANULE) + 1, GRANULE):
        shortest = max(min_query_len, padded - GRANULE + 1)     # the shortest row padded to this length
        most_context = max_model_len - shortest
        for size in PIECES:
            if most_context >= size:
                shapes.add((False, padded, size))
    return shapes


def chunked_rows(num_prompts: int = 32, prompt_len: int = 30000, budget: int = 16384,
                 output_len: int = 256) -> list[tuple[int, int]]:
    """(query_len, context) of each prefill row as the scheduler cuts W4 (the defaults): running requests first
    (a decoding one takes a token of the budget a step), then waiting prompts in order, budget tokens a step.
    What the shape-count test and benchmarks/prefill_long.py --chunks replay."""
    left, decoding, rows = [prompt_len] * num_prompts, [0] * num_prompts, []
    while any(left):
        budget_left = budget - sum(d > 0 for d in decoding)
        decoding = [max(d - 1, 0) for d in decoding]
        for i in range(num_prompts):
            if left[i] and budget_left > 0:
                n = min(left[i], budget_left)
                rows.append((n, prompt_len - left[i]))
                left[i] -= n
                budget_left -= n
                decoding[i] = 0 if left[i] else output_len - 1
    return rows
