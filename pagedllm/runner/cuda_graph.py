"""CUDA graphs for every step up to a size: captured at start-up, one per padded token count and kind.

Graphs are keyed by (num_tokens, mixed, shared, lora):
- decode-only steps (one token a row) at 1, 2, 4, 8, 16, 24, ... rows: the batch is padded to the
  smallest capture size; its rows run the decode kernels only. Each size has a second graph (shared)
  that also runs shared_prefix, for steps whose rows share prefix segments (attention/shared_prefix.py).
- mixed steps (some row has more tokens: prompts, chunks) at 16, 32, ... tokens, with every row the
  runner has (max_num_seqs): they also run the prefill kernel. An eager launch of a whole model costs about
  20 ms of host time (28 layers, H200 host), which a step of a few prompt tokens would wait for. Only up to
  the size where the step's own device time hides that (mixed_graph_token_cap): beyond, graphs would only
  add padding.
- with LoRA on, every graph twice: with the LoRA kernels (captured with every adapter slot present) and
  without, which steps with no adapter row replay, so that they pay nothing for LoRA (the kernels' early exits
  cost 0.21 ms a 256-row decode step of Qwen3-0.6B on the H200, benchmarks/lora_kernels.py).
Padding is rows with no tokens (seq_len 0) and tokens of no row (slot -1): attention reads and writes
nothing for them, and their outputs are never read. Grid sizes depend only on those padded shapes (the
kernels read the step's real lengths from the device), so one graph serves any batch that fits.

Every graph reads the runner's persistent input tensors and writes one static hidden-state tensor, so a
replay is: write the inputs, replay, read the rows you need.
"""
import bisect
import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger("pagedllm")


MAX_CAPTURE_SIZE = 512         # as vLLM: larger decode batches run eager, where launch overhead is a small share
MAX_MIXED_CAPTURE_SIZE = 8192  # bounds the graphs' memory pool for the smallest models
MIXED_GRAPH_MAX_FLOP = 1e13    # ~20 ms of an H100's or H200's bf16 throughput: about an eager launch's host time


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode batches: 1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs (which is always one of them) or
    MAX_CAPTURE_SIZE."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4] + list(range(8, top, 8))
    return sorted({s for s in sizes if s < top} | {top})


def mixed_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    """Mixed steps: 16, 32, ... doubling to 512, then steps of a quarter of the power of two below, so
    that padding adds at most 25% to a step; up to max_num_batched_tokens or MAX_MIXED_CAPTURE_SIZE."""
    top = min(max_num_batched_tokens, MAX_MIXED_CAPTURE_SIZE)
    sizes, s = [], 16
    while s < top:
        sizes.append(s)
        s += s if s < 512 else 1 << (s.bit_length() - 3)
    return sizes + [top] if top >= 16 else []


def mixed_graph_token_cap(num_params: int) -> int:
    """Mixed steps of more tokens than this take longer on the device (2 FLOP per parameter and token) than
    their eager launch takes on the host, which async scheduling then hides behind the step before.
    Llama-8B's cap is about 700 tokens, Qwen3-0.6B's 11,000. W2 (8B) ran at 5,592 tok/s with graphs up to 8192
    tokens and at 5,818 with the cap (H200, two machines: not an A/B)."""
    return int(MIXED_GRAPH_MAX_FLOP // (2 * max(num_params, 1)))


class CudaGraphs:
    def __init__(self, decode_sizes: list[int], mixed_sizes: list[int], shared: bool = False, lora: bool = False):
        """shared: also capture decode graphs with shared_prefix, at every decode size of 2 rows or more.
        lora: each graph with the LoRA kernels and without."""
        self.sizes = {False: sorted(decode_sizes), True: sorted(mixed_sizes)}
        keys = [(n, mixed, False) for mixed, sizes in self.sizes.items() for n in sizes]
        keys += [(n, False, True) for n in self.sizes[False] if shared and n >= 2]
        self.keys = [k + (with_lora,) for k in keys for with_lora in ((True, False) if lora else (False,))]
        self.graphs: dict[tuple[int, bool, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def padded_size(self, num_tokens: int, mixed: bool) -> int | None:
        """The capture size a step of num_tokens runs at; None when it is too large for any graph."""
        sizes = self.sizes[mixed]
        i = bisect.bisect_left(sizes, num_tokens)
        return sizes[i] if i < len(sizes) else None

    def capture(self, forward: Callable[[int, bool, bool, bool], torch.Tensor]):
        """forward(num_tokens, mixed, shared, lora) runs the model on the persistent inputs, shaped as a padded
        step. Largest first, so the smaller graphs fit in the memory pool the largest one left."""
        start = time.perf_counter()
        pool = None
        for key in sorted(self.keys, reverse=True):
            forward(*key)                      # warm-up: compiles kernels, sets up library handles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward(*key)
            pool = graph.pool()
            self.graphs[key] = (graph, out)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d CUDA graphs (decode batches of 1 to %d rows, mixed steps of 16 to %d tokens%s) "
                    "in %.2f s", len(self.keys), max(self.sizes[False], default=0), max(self.sizes[True], default=0),
                    "; with and without LoRA" if any(k[3] for k in self.keys) else "", self.capture_seconds)

    def replay(self, num_tokens: int, mixed: bool, shared: bool = False, lora: bool = False) -> torch.Tensor:
        graph, out = self.graphs[(num_tokens, mixed, shared, lora)]
        graph.replay()
        return out
