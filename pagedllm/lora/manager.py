"""Adapters of a model: an LRU of host copies (max_cpu_loras) and max_loras device slots.

An adapter is read from disk by `load` (any thread: lora/loader.py reads a request's new adapter off the step
loop) and put in the host LRU by `insert` (the step thread), or both at once by `get` (add_lora). Requests
hold a reference to their adapter (`acquire` / `release`); an adapter in use is never evicted from the host
LRU (it may exceed max_cpu_loras until they finish) and `remove` refuses it (returns False: its requests
finish under it, as nothing of theirs changes mid-generation). Device slots are filled per step
(`prepare_step`): the scheduler keeps the running requests to at most max_loras distinct adapters, so the
step's adapters always fit; a slot keeps its adapter until another needs it (LRU).
The step's token slots go to one persistent device buffer (LoRAStepState.meta) that CUDA graphs read at replay.
"""
import hashlib
import logging
from collections import Counter, OrderedDict

import numpy as np
import torch

from pagedllm.lora.layers import sort_by_slot, sorted_len, wrap_lora_layers
from pagedllm.lora.peft_loader import LoRAModel, load_peft_adapter
from pagedllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: torch.nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int | None,
                 device: torch.device, lora_dtype: str = "auto", target_modules: list[str] | None = None):
        """lora_dtype: the adapters' dtype in the slots (vLLM's --lora-dtype); auto: the base weights'.
        target_modules: vLLM's --lora-target-modules, the linears that take adapters (None: all)."""
        self.model = model
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.max_cpu_loras = max_cpu_loras or max_loras
        self.device = device
        dtype = None if lora_dtype == "auto" else getattr(torch, lora_dtype)
        self.target_modules = target_modules
        self.state, self.layers = wrap_lora_layers(model, max_loras, max_lora_rank, dtype, target_modules)
        self.cpu: OrderedDict[int, LoRAModel] = OrderedDict()   # lora_int_id -> host copy, LRU first
        self.in_use: Counter[int] = Counter()                   # lora_int_id -> requests holding it
        self.pinned: set[int] = set()                           # never evicted from the host LRU (pin_lora)
        self.slots: list[int | None] = [None] * max_loras       # slot -> lora_int_id
        self.slot_used: list[int] = [0] * max_loras             # step count of last use (LRU among slots)
        self.req_lora: dict[str, int] = {}                      # req_id -> lora_int_id
        self._meta_dirty = False                                # the step buffer holds a slot >= 0
        self._step_key = None   # (rows, lengths, tokens) the step buffer holds; None after any change to them
        self._steps = 0

    # ---- adapters ------------------------------------------------------------------------------------
    def get(self, req: LoRARequest) -> LoRAModel:
        """The adapter's host copy, read from disk now if it is not there (on the caller's thread)."""
        return self.cached(req) or self.insert(self.load(req))

    def cached(self, req: LoRARequest) -> LoRAModel | None:
        """The host copy if loaded; the same id with another name or path is an error."""
        lora = self.cpu.get(req.lora_int_id)
        if lora is not None:
            if lora.request.identity != req.identity:
                raise ValueError(f"lora_int_id {req.lora_int_id} is already adapter {lora.request.lora_name!r} "
                                 f"({lora.request.lora_path}), not {req.lora_name!r} ({req.lora_path})")
            self.cpu.move_to_end(req.lora_int_id)
        return lora

    def load(self, req: LoRARequest) -> LoRAModel:
        """Reads and stages an adapter; touches no state of the manager, so it runs on a loader thread."""
        lora = load_peft_adapter(req, self.model, self.max_lora_rank)
        outside = sorted({name.rsplit(".", 1)[1] for name in lora.modules if name not in self.layers})
        if outside:   # vLLM applies an adapter on the --lora-target-modules linears alone, as here: said, once
            logger.warning("LoRA adapter %r (%s): its weights on %s are not applied: --lora-target-modules %s",
                           req.lora_name, req.lora_path, outside, " ".join(self.target_modules))
            lora.modules = {name: shards for name, shards in lora.modules.items() if name in self.layers}
        return self._keyed(self._staged(lora))

    def _keyed(self, lora: LoRAModel) -> LoRAModel:
        """Its block-hash identity also says how it applies here (the linears that take it, the slots' dtype):
        the disk tier outlives this engine, and a restart under another --lora-target-modules or --lora-dtype
        computes other KV from the same files."""
        how = f"{next(iter(self.layers.values())).lora_a.dtype}|{sorted(lora.modules)}"
        lora.fingerprint = hashlib.sha256(f"{lora.fingerprint}|{how}".encode()).hexdigest()
        return lora

    def insert(self, lora: LoRAModel) -> LoRAModel:
        """Puts a loaded adapter in the host LRU (the step thread's work: prepare_step reads it); one loaded
        meanwhile under the same id (add_lora) is kept."""
        have = self.cached(lora.request)
        if have is not None:
            return have
        self.cpu[lora.request.lora_int_id] = lora
        self._evict(keep=lora.request.lora_int_id)
        return lora

    def _staged(self, lora: LoRAModel) -> LoRAModel:
        """Host copies in the slots' dtype (scale folded into B in float32 first), pinned on CUDA: filling a
        slot is then a non-blocking copy that waits for no step in flight."""
        dtype = next(iter(self.layers.values())).lora_a.dtype
        pin = self.device.type == "cuda"
        for shards in lora.modules.values():
            for k, (a, b) in shards.items():
                a, b = a.to(dtype), b.to(dtype)
                shards[k] = (a.pin_memory(), b.pin_memory()) if pin else (a, b)
        return lora

    def add(self, req: LoRARequest) -> bool:
        self.get(req)
        return True

    def remove(self, lora_int_id: int, in_use: bool | None = None) -> bool:
        """False when no such adapter is loaded or requests still run under it (they finish unchanged).
        in_use: the engine core's own answer (its scheduler knows at once when a request ends; the runner's
        count lags a step), else this manager's count."""
        if in_use is None:
            in_use = bool(self.in_use[lora_int_id])
        if lora_int_id not in self.cpu or in_use:
            return False
        del self.cpu[lora_int_id]
        self.pinned.discard(lora_int_id)
        self._step_key = None
        for s, held in enumerate(self.slots):
            if held == lora_int_id:
                self.slots[s] = None
        return True

    def loaded_ids(self) -> set[int]:
        return set(self.cpu)

    def pin(self, lora_int_id: int) -> bool:
        """vLLM's pin_lora: a loaded adapter stays on the host until removed (the LRU passes it over, and it may
        exceed max_cpu_loras). vLLM also keeps it in a device slot; slots here are filled per step from the host
        copy, so that part changes nothing but a copy."""
        if lora_int_id not in self.cpu:
            raise ValueError(f"Pinning failed. LoRA {lora_int_id} is not loaded (add_lora it first)")
        self.pinned.add(lora_int_id)
        return True

    def _evict(self, keep: int = 0):
        """Least recently used first; never one in use or pinned, nor `keep` (just inserted: its request acquires
        it next)."""
        for lid in [lid for lid in self.cpu if not self.in_use[lid] and lid != keep and lid not in self.pinned]:
            if len(self.cpu) <= self.max_cpu_loras:
                break
            self.remove(lid)

    # ---- requests ------------------------------------------------------------------------------------
    def acquire(self, req_id: str, req: LoRARequest):
        self.get(req)
        self.in_use[req.lora_int_id] += 1
        self.req_lora[req_id] = req.lora_int_id
        self._step_key = None

    def release(self, req_id: str):
        lid = self.req_lora.pop(req_id, None)
        if lid is not None:
            self._step_key = None
            self.in_use[lid] -= 1
            if not self.in_use[lid]:
                del self.in_use[lid]
                self._evict()

    # ---- one step ------------------------------------------------------------------------------------
    def reserve(self, num_tokens: int):
        """Sizes the step buffer for the largest step; the runner calls it before CUDA graphs take its address."""
        columns = sorted_len(num_tokens, self.max_loras)
        if columns > self.state.meta.shape[1]:
            self._step_key = None
            self.state.meta = torch.full((3, columns), -1, dtype=torch.int32, device=self.device)

    def prepare_step(self, row_req_ids: list[str], query_lens: list[int], num_tokens: int):
        """Puts the step's adapters in slots and writes the step buffer for the forward's num_tokens tokens (graph
        padding included): every token's slot (-1 for base rows and padding), then the tokens sorted by slot and
        their slots (layers.sort_by_slot; numpy: no per-row tensor op). One host -> device copy on the step's
        stream, no sync; none when the step has the rows, lengths and slots of the step before (most decode
        steps: the buffer already holds them)."""
        self._steps += 1
        key = (tuple(row_req_ids), tuple(query_lens), num_tokens)   # copies: the caller may reuse its lists
        if key == self._step_key:
            for s in self.state.active_slots:
                self.slot_used[s] = self._steps
            return
        ids = [self.req_lora.get(r, 0) for r in row_req_ids]
        wanted = {lid for lid in ids if lid}
        if not wanted:
            self.state.active_slots = []
            self._clear_meta()
            self._step_key = key
            return
        slot_of = {lid: s for s, lid in enumerate(self.slots) if lid in wanted}
        for lid in wanted - slot_of.keys():
            free = [s for s in range(self.max_loras) if self.slots[s] not in wanted]
            s = min(free, key=lambda s: (self.slots[s] is not None, self.slot_used[s]))
            self._fill(s, lid)
            slot_of[lid] = s
        for s in slot_of.values():
            self.slot_used[s] = self._steps
        columns = sorted_len(num_tokens, self.max_loras)
        host = torch.empty((3, columns), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        h = host.numpy()
        row_slots = np.array([slot_of.get(lid, -1) for lid in ids], dtype=np.int32)
        n = sum(query_lens)
        h[0, :n] = np.repeat(row_slots, query_lens)
        h[0, n:] = -1                                             # graph padding (and columns past the tokens)
        sort_by_slot(h[0, :num_tokens], self.max_loras, h[1], h[2])
        self.reserve(num_tokens)
        self.state.meta[:, :columns].copy_(host, non_blocking=True)
        self._meta_dirty = True
        self.state.active_slots = sorted(slot_of.values())
        self._step_key = key

    def _clear_meta(self):
        """Every token base: what a captured graph's kernels must read in a step without adapters."""
        self._step_key = None
        if self._meta_dirty:
            self.state.meta.fill_(-1)
            self._meta_dirty = False

    def profile_step(self, num_tokens: int):
        """The start-up memory profile's step: every token under an adapter, every slot active."""
        self.reserve(num_tokens)
        self._step_key = None
        meta = self.state.meta[:, :num_tokens]   # slot 0's run from entry 0: what sort_by_slot gives
        meta[0].zero_()
        meta[1].copy_(torch.arange(num_tokens, device=self.device))
        meta[2].zero_()
        self.state.meta[1:, num_tokens:] = torch.tensor([[0], [-1]], dtype=torch.int32, device=self.device)
        self._meta_dirty = True
        self.state.active_slots = list(range(self.max_loras))

    def capture_slots(self, with_lora: bool):
        """During capture, per graph: every slot active (each LoRALinear's kernels go into the graph, whatever a
        replayed step holds) or none (the graph base-only steps replay). No device op: it may run inside the
        capture, where a write to the step buffer would be replayed with the graph."""
        self.state.active_slots = list(range(self.max_loras)) if with_lora else []

    def clear_step(self):
        self.state.active_slots = []
        self._clear_meta()

    def _fill(self, slot: int, lid: int):
        lora = self.cpu[lid]
        for name, layer in self.layers.items():
            layer.set_slot(slot, lora.modules.get(name))
        self.slots[slot] = lid
