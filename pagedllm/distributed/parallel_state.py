"""Tensor-parallel state of one rank: its rank, the group size, the process groups, and the collectives the
parallel layers call. TP=1 is `TPGroup()`: every collective is then the identity and no group exists.

Two groups when size > 1: `group` (NCCL on CUDA, gloo on CPU) carries the activations; `cpu_group` (gloo)
carries host data (the KV block count every rank must agree on, the disk tier's files).
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective whose peer is gone: gloo raises at once (its socket closes); this bounds a hang of the others
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


# torch 2.13 names it all_gather_single (all_gather_into_tensor: deprecated); older torch has only the latter
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object = None       # torch.distributed ProcessGroup (None at size 1)
    cpu_group: object = None

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (row-parallel layers' partial sums, the vocab-parallel embedding)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """(N, V/size) on each rank -> (N, V), rank r's columns at r * V/size."""
        if self.size == 1:
            return x
        n = x.shape[0]
        out = torch.empty((self.size * n, *x.shape[1:]), dtype=x.dtype, device=x.device)   # one collective
        _all_gather_single(out, x.contiguous(), group=self.group)
        return out.view(self.size, n, -1).transpose(0, 1).reshape(n, -1)   # rank r's columns at r * V/size

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (the KV block count: each rank profiled its own memory)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def gather_objects(self, obj) -> list:
        """Every rank's obj (picklable), in rank order, on every rank (over the gloo group: host data, such as
        the KV tiers' disk files each rank found or failed to read)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out


def init_tp(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    """Joins the ranks' rendezvous at init_method (tcp://HOST:port: 127.0.0.1, or the engine node's IP under
    Ray); every rank calls it at once."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    group = dist.group.WORLD
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return TPGroup(rank, size, group, cpu_group)


def destroy_tp(tp: TPGroup) -> None:
    if tp.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on cuda:r (one process per local GPU); on CPU every rank shares the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def cpu_threads_per_rank(device: torch.device, size: int) -> int | None:
    """The torch threads of each rank on CPU: its share of the cores. torch's default is a thread a core in every
    rank's process, and their OpenMP threads then spin against each other (TP=2 on 2 cores: a tiny model's step
    took 106 ms for 12). None on CUDA, or where OMP_NUM_THREADS is set (the user's own choice)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // size)
