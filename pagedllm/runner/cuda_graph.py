"""CUDA graphs for decode-only steps: one graph per padded batch size, captured at start-up.

A decode step of B requests runs at the smallest capture size >= B; the extra rows are padding (seq_len 0,
slot -1) that attention skips. Every graph reads the runner's persistent input tensors and writes one
static hidden-state tensor, so a replay is: write the inputs, replay, read the rows you need.
"""
import bisect
import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger("pagedllm")


MAX_CAPTURE_SIZE = 512   # as vLLM: larger decode batches run eager, where launch overhead is a small share


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs (which is always one of them) or MAX_CAPTURE_SIZE."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4] + list(range(8, top, 8))
    return sorted({s for s in sizes if s < top} | {top})


class CudaGraphs:
    def __init__(self, sizes: list[int]):
        self.sizes = sorted(sizes)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def padded_size(self, num_reqs: int) -> int | None:
        """The capture size a decode batch of num_reqs runs at; None when it is too large for any graph."""
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(self, forward: Callable[[int], torch.Tensor]):
        """forward(size) runs the model on the first `size` rows of the persistent inputs. Largest first, so
        the smaller graphs fit in the memory pool the largest one left."""
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            forward(size)                      # warm-up: compiles kernels, sets up library handles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward(size)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d CUDA graphs (decode batches of 1 to %d) in %.2f s", len(self.sizes),
                    self.sizes[-1], self.capture_seconds)

    def replay(self, size: int) -> torch.Tensor:
        graph, out = self.graphs[size]
        graph.replay()
        return out
