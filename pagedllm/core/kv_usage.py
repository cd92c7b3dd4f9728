"""KV memory accounting: how much of the allocated KV cache holds no token, at the peak of usage.

Measured at the end of each step's scheduling (after every allocation and preemption of the step):
- allocated slots = blocks in use x block_size; a block shared by several requests counts once;
- empty slots = allocated slots that hold no token once this step's K/V is written;
- waste = empty slots / allocated slots, taken at the step with the most blocks in use (the first such
  step), as in the PagedAttention paper's figure.
Blocks freed but still cached for prefix reuse are free, not in use: they are outside the figure.

KVCacheManager keeps the number of empty slots up to date on every allocate_slots and free (O(1) each), so
a step's observation is O(1).
"""
from dataclasses import dataclass


@dataclass
class KVUsagePeak:
    block_size: int
    peak_blocks: int = 0          # most blocks in use at the end of any step's scheduling
    empty_slots_at_peak: int = 0  # at the (first) step with peak_blocks
    peak_running: int = 0         # most requests running in any step (need not be the same step)

    def observe(self, num_blocks_used: int, num_empty_slots: int, num_running: int):
        if num_blocks_used > self.peak_blocks:
            self.peak_blocks, self.empty_slots_at_peak = num_blocks_used, num_empty_slots
        self.peak_running = max(self.peak_running, num_running)

    @property
    def kv_waste_at_peak(self) -> float:
        """Share of the allocated slots that hold no token, at the peak (0.0 before any block is used)."""
        return self.empty_slots_at_peak / (self.peak_blocks * self.block_size) if self.peak_blocks else 0.0

    def reset(self):
        """Start a new measurement (e.g. after a warm-up request)."""
        self.peak_blocks = self.empty_slots_at_peak = self.peak_running = 0
