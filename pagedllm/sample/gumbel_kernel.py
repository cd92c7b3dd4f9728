"""Random sampling in one read of the logits (CUDA): argmax(logits / T + g), g ~ Gumbel(0, 1), draws token i
with probability softmax(logits / T)_i (the Gumbel-max trick). The torch path (sampler.exponential_race)
needs a float32 copy of the logits, a softmax and an (N, V) noise tensor: about ten passes over N x V.

The noise is Philox keyed by one seed per row (counters derived from the token id), so a row's draw depends
only on its seed: a seeded request's from its seed and the token's output index (sampler.position_seed), the
others' from the engine's generator, so seeded requests stay independent of their batch. Grid: (row, vocab
chunk); each program keeps the best score of its chunk, and a small (N, chunks) argmax picks the winner.
"""
import torch
import triton
import triton.language as tl

from pagedllm.sample.host_copy import to_device
from pagedllm.sampling_params import _GREEDY_EPS

CHUNK = 8192   # vocab entries a program covers: 19 chunks of Qwen3's 151,936, ~5k programs at 256 rows
BLOCK = 512    # ids per random word of a Philox call: 4 * BLOCK ids a step, CHUNK a multiple of that


@triton.jit
def _take_best(logits_row, ids, r, vocab_size, scale, best, best_id):
    mask = ids < vocab_size
    x = tl.load(logits_row + ids, mask=mask, other=float("-inf")).to(tl.float32)
    u = tl.uint_to_uniform_float(r)                  # [0, 1); u = 0 gives -inf noise, never picked
    score = x * scale - tl.log(-tl.log(u))
    take = mask & (score > best)                     # NaN scores are never taken
    return tl.where(take, score, best), tl.where(take, ids, best_id)


@triton.jit
def gumbel_chunk_kernel(logits_ptr, stride, vocab_size, temperature_ptr, seed_ptr, best_score_ptr, best_id_ptr,
                        num_chunks, greedy_eps, APPLY_TEMPERATURE: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """One Philox call gives four random words: each step covers 4 * BLOCK ids, the k-th BLOCK of them
    taking the k-th word. Counters (the step's first id // 4, plus the lane) never repeat within a row."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    seed = tl.load(seed_ptr + row)
    scale = 1.0
    if APPLY_TEMPERATURE:
        t = tl.load(temperature_ptr + row)
        scale = 1.0 / tl.where(t < greedy_eps, 1.0, t)   # greedy rows: their draw is discarded anyway
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], tl.int32)
    logits_row = logits_ptr + row * stride
    for start in range(0, CHUNK, 4 * BLOCK):
        first = chunk * CHUNK + start
        r0, r1, r2, r3 = tl.randint4x(seed, first // 4 + lanes)
        best, best_id = _take_best(logits_row, first + lanes, r0, vocab_size, scale, best, best_id)
        best, best_id = _take_best(logits_row, first + BLOCK + lanes, r1, vocab_size, scale, best, best_id)
        best, best_id = _take_best(logits_row, first + 2 * BLOCK + lanes, r2, vocab_size, scale, best, best_id)
        best, best_id = _take_best(logits_row, first + 3 * BLOCK + lanes, r3, vocab_size, scale, best, best_id)
    score, lane = tl.max(best, axis=0, return_indices=True)
    token = tl.sum(tl.where(lanes == lane, best_id, 0), axis=0)
    tl.store(best_score_ptr + row * num_chunks + chunk, score)
    tl.store(best_id_ptr + row * num_chunks + chunk, token)


def gumbel_sample(logits: torch.Tensor, seeds: torch.Tensor, temperature: torch.Tensor | None = None,
                  chunk: int = CHUNK, block: int = BLOCK) -> torch.Tensor:
    """logits (N, V) any float dtype, seeds (N,) int64, temperature (N,) float32 or None (already applied)
    -> (N,) int64 token ids. chunk, block: smaller for the Triton interpreter's tests (chunk a multiple
    of 4 * block)."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(vocab_size, chunk)
    best_score = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=logits.device)
    best_id = torch.empty((num_rows, num_chunks), dtype=torch.int32, device=logits.device)
    gumbel_chunk_kernel[(num_rows, num_chunks)](
        logits, logits.stride(0), vocab_size, seeds if temperature is None else temperature, seeds,
        best_score, best_id, num_chunks, _GREEDY_EPS, APPLY_TEMPERATURE=temperature is not None,
        CHUNK=chunk, BLOCK=block, num_warps=4)
    winner = best_score.argmax(dim=1, keepdim=True)
    return best_id.gather(1, winner).squeeze(1).long()


def draw_seeds(num_rows: int, row_seeds: dict[int, int], generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
    """One Philox seed per row: seeded rows their own (sampler.position_seed), the others from the engine's
    generator."""
    seeds = torch.randint(0, 2**62, (num_rows,), generator=generator, device=device)
    if row_seeds:   # rows and seeds in one copy
        rows, values = to_device([*row_seeds, *row_seeds.values()], torch.int64, device).split(len(row_seeds))
        seeds.index_copy_(0, rows, values)
    return seeds
