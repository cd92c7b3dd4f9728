"""The LoRA step buffer the kernels read (LoRAManager.prepare_step, built with numpy) against a per-token Python
construction: each token's slot (-1 for base rows and graph padding), the tokens sorted by slot (stable), each
slot's run from a multiple of SEGMENT, and their slots; decode-only steps and mixed ones (prompt chunks beside
decode rows)."""
import random
from collections import Counter, OrderedDict

import pytest
import torch

from pagedllm.lora.layers import SEGMENT, LoRAStepState, sorted_len
from pagedllm.lora.manager import LoRAManager


def manager(max_loras: int, assigned: dict[str, int]) -> LoRAManager:
    """A manager without a model: its slots already hold adapters 1..max_loras (no fill)."""
    m = LoRAManager.__new__(LoRAManager)
    m.state, m.max_loras = LoRAStepState(torch.full((3, 0), -1, dtype=torch.int32)), max_loras
    m.device = torch.device("cpu")
    m.slots, m.slot_used, m._steps, m._meta_dirty = list(range(1, max_loras + 1)), [0] * max_loras, 0, False
    m._step_key = None
    m.req_lora = dict(assigned)
    return m


def expected(m: LoRAManager, rows: list[str], query_lens: list[int], num_tokens: int) -> torch.Tensor:
    """Row 0: each token's slot (then -1); rows 1, 2: slot by slot, its tokens in order from the next multiple
    of SEGMENT, their slot (gaps and tail: token 0, slot -1)."""
    slots = []
    for r, q in zip(rows, query_lens):
        lid = m.req_lora.get(r, 0)
        slots += [m.slots.index(lid) if lid else -1] * q
    columns = sorted_len(num_tokens, m.max_loras)
    order, sorted_slots = [0] * columns, [-1] * columns
    at = 0
    for s in range(m.max_loras):
        mine = [i for i, v in enumerate(slots) if v == s]
        for k, i in enumerate(mine):
            order[at + k], sorted_slots[at + k] = i, s
        at += -(-len(mine) // SEGMENT) * SEGMENT
    return torch.tensor([slots + [-1] * (columns - len(slots)), order, sorted_slots], dtype=torch.int32)


@pytest.mark.parametrize("decode", [True, False])
def test_step_buffer(decode):
    rng = random.Random(1 if decode else 2)
    rows = [f"r{i}" for i in range(40)]
    assigned = {r: rng.randint(1, 5) for r in rows if rng.random() > 0.3}   # the rest: base rows
    m = manager(5, assigned)
    for _ in range(5):
        step = rng.sample(rows, rng.randint(1, len(rows)))
        query_lens = [1 if decode else rng.randint(1, 9) for _ in step]
        num_tokens = sum(query_lens) + rng.randint(0, 7)   # graph padding
        m.prepare_step(step, query_lens, num_tokens)
        want = expected(m, step, query_lens, num_tokens)
        if not any(r in assigned for r in step):
            assert m.state.active_slots == []
            continue
        assert torch.equal(m.state.meta[:, :want.shape[1]], want)
        assert m.state.active_slots == sorted({m.slots.index(assigned[r]) for r in step if r in assigned})



def test_repeated_step_keeps_buffer():
    """A step with the rows, lengths and size of the step before writes nothing (its buffer holds them); a change
    in between (a cleared buffer, a released request, other rows) writes it again."""
    rows = [f"r{i}" for i in range(12)]
    m = manager(4, {r: 1 + i % 4 for i, r in enumerate(rows) if i % 3})
    m.in_use, m.cpu = Counter(m.req_lora.values()), OrderedDict()
    step, lens = rows[:10], [1] * 10
    m.prepare_step(step, lens, 16)
    m.state.meta[:, :16].fill_(7)   # a write now would show
    m.prepare_step(list(step), list(lens), 16)
    assert (m.state.meta[:, :16] == 7).all() and m._steps == 2 and m.slot_used == [2, 2, 2, 2]
    columns = sorted_len(16, 4)
    for change in (m.clear_step, lambda: m.release("r1")):
        change()
        m.state.meta[:, :16].fill_(7)
        m.prepare_step(step, lens, 16)
        assert torch.equal(m.state.meta[:, :columns], expected(m, step, lens, 16))
    m.prepare_step(step[:9], lens[:9], 16)
    assert torch.equal(m.state.meta[:, :columns], expected(m, step[:9], lens[:9], 16))


def test_capture_slots_write_no_device_buffer():
    """Inside a CUDA graph capture, the runner switches each graph between the LoRA kernels and none through
    capture_slots: any write to the step buffer there would be captured and replayed with the graph, wiping the
    adapter slots every step (the bug this guards). clear_step, before the capture, clears it once."""
    m = manager(4, {})
    m.reserve(16)
    m.state.meta.fill_(5)
    m._meta_dirty = True
    for with_lora in (True, False, True):
        m.capture_slots(with_lora)
        assert (m.state.meta == 5).all() and m._meta_dirty
        assert m.state.active_slots == ([0, 1, 2, 3] if with_lora else [])
    m.clear_step()
    assert (m.state.meta == -1).all()
