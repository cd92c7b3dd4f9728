"""The Ray executor (`--distributed-executor-backend ray`): ranks 1..N-1 as Ray actors placed on a Ray cluster's
nodes; rank 0 stays in the engine core process, as with the multiprocess executor (its runner's outputs then
need no trip through Ray's object store, and TPRunner is unchanged).

    ray start --head --port=6379              (the node the engine runs on: rank 0 is there)
    ray start --address=HEAD_IP:6379          (each other node)

The engine joins the cluster with ray.init(address="auto") (RAY_ADDRESS, else the cluster last started on this
machine). With none, it starts a local one with this machine's resources, as vLLM's ray.init(address=None) does.
Placement: a placement group of one bundle a rank ({"GPU": 1}, or {"CPU": 1} on CPU), bundle 0 on the engine's
node (rank 0's device: the GPU Ray reserved there); PACK fills a node before the next. The ranks' rendezvous is
the engine node's IP. Ray runs an actor's calls from one caller in the order they were made, so `send` is
`handle.remote(msg)` for each actor, not waited for. A dead actor: its latest call's result is Ray's
ActorDiedError, which a monitor thread polls for `check`; it also ends a process stuck in a collective (as the
multiprocess executor's does).
"""
import atexit
import logging
import os
import threading
import time

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.executor import WorkerDiedError, exit_unless_noticed, free_port

logger = logging.getLogger("pagedllm")
PLACEMENT_TIMEOUT_SECONDS = 120.0


class RankActor:
    """One rank in a Ray actor: a Worker on this actor's device (cuda:0: Ray shows it its one GPU)."""

    def __init__(self, config: EngineConfig, model, rank: int, size: int, init_method: str, log_level: int):
        from pagedllm.distributed.worker import Worker
        logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s (TP rank {rank}): %(message)s")
        device = torch.device("cuda", 0) if model.device.type == "cuda" else model.device
        self.worker = Worker(config, model, rank, size, init_method, device)

    def num_blocks(self) -> int:
        return self.worker.runner.num_blocks

    def handle(self, msg: tuple) -> None:
        self.worker.handle(msg)

    def shutdown(self) -> None:
        self.worker.shutdown()


class DriverSlot:
    """Holds bundle 0's GPU for rank 0 (the engine core process, not an actor) and says which GPU it is."""

    def gpu_ids(self) -> list:
        import ray
        return ray.get_gpu_ids()


class RayExecutor:
    """Same calls as MultiprocExecutor: send, check, wait_ready, startup_failure, shutdown; init_method."""

    def __init__(self, config: EngineConfig, model, size: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        self.size, self.closing, self.noticed = size, False, False
        self.dead: list[tuple[int, str]] = []   # (rank, why) of dead actors, as the monitor thread found them
        self.started_ray = connect()
        self.key = "GPU" if model.device.type == "cuda" else "CPU"
        try:
            self.pg = make_placement_group(size, self.key)
        except BaseException:
            if self.started_ray:
                ray.shutdown()
            raise
        ip = ray.util.get_node_ip_address()
        self.init_method = f"tcp://{_url_host(ip)}:{free_port('')}"

        def place(i):
            return dict(scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                        **{"num_gpus" if self.key == "GPU" else "num_cpus": 1})
        self.driver_slot = ray.remote(DriverSlot).options(**place(0)).remote() if self.key == "GPU" else None
        level = logging.getLogger("pagedllm").getEffectiveLevel()
        actor = ray.remote(max_restarts=0)(RankActor)
        self.actors = [actor.options(**place(r)).remote(config, model, r, size, self.init_method, level)
                       for r in range(1, size)]
        self.ready_refs = [a.num_blocks.remote() for a in self.actors]
        self.latest = list(self.ready_refs)   # each actor's last call: its result says whether it died
        self.monitor = threading.Thread(target=self._monitor, name="pagedllm-tp-ray-monitor", daemon=True)
        self.monitor.start()
        atexit.register(self._stop_monitor)   # runs before Ray's own exit hook (registered earlier, run later)

    def _stop_monitor(self):
        """A Ray call on another thread during ray.shutdown() ends the process: the monitor stops first."""
        self.closing = True
        self.monitor.join(5)

    def driver_device(self, device: torch.device) -> torch.device:
        """Rank 0's device: on CUDA the GPU Ray reserved for bundle 0 (by its index among this process's)."""
        if self.driver_slot is None:
            return device
        import ray
        gpu = str(ray.get(self.driver_slot.gpu_ids.remote(), timeout=PLACEMENT_TIMEOUT_SECONDS)[0])
        return torch.device("cuda", local_gpu_index(gpu, os.environ.get("CUDA_VISIBLE_DEVICES")))

    def wait_ready(self) -> list[int]:
        """Each worker's KV block count; a worker that failed to start raises its own error."""
        import ray
        refs = self.ready_refs
        while True:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
            why = self._start_error(done)
            if why is not None:
                raise RuntimeError(why)
            if len(done) == len(refs):
                return ray.get(refs)

    def _start_error(self, done: list) -> str | None:
        failed = _failures(self.ready_refs, done)
        return f"tensor-parallel rank {failed[0][0]} (Ray actor) failed to start: {failed[0][1]}" if failed else None

    def startup_failure(self, seconds: float = 1.0) -> str | None:
        import ray
        return self._start_error(ray.wait(self.ready_refs, num_returns=len(self.ready_refs), timeout=seconds)[0])

    def send(self, msg: tuple) -> None:
        self.latest = [a.handle.remote(msg) for a in self.actors]   # Ray pickles msg once a call

    def check(self, wait: float = 0.0) -> None:
        """Raises WorkerDiedError if an actor is dead. wait 0 (before each call): what the monitor thread found
        (a Ray call here would cost the step loop ~0.2 ms); wait > 0 (after a failed call): asks Ray, giving it
        up to `wait` seconds to learn of a death, less once every actor's last call has ended."""
        dead = self.dead
        if not dead and wait > 0:
            import ray
            latest = self.latest
            dead = _dead(latest, ray.wait(latest, num_returns=len(latest), timeout=wait)[0])
        if dead:
            self.noticed = True
            raise WorkerDiedError(f"tensor-parallel rank {dead[0][0]} (Ray actor) died: {dead[0][1]}: the engine "
                                  "cannot run without its part of the model")

    def _monitor(self):
        """Polls the actors' last calls (every ~1 s); a death the engine does not notice (a collective that waits
        for the dead rank, as NCCL does) ends this process after a grace."""
        import ray
        while not self.closing:
            latest = self.latest
            try:
                dead = _dead(latest, ray.wait(latest, num_returns=len(latest), timeout=0.5)[0])
            except Exception:   # Ray itself is going away (shutdown, the driver exiting)
                return
            if dead and not self.closing:
                self.dead = dead
                break
            time.sleep(0.5)
        else:
            return
        logger.error("tensor-parallel Ray actor died: %s", ", ".join(f"rank {r}: {why}" for r, why in dead))
        exit_unless_noticed(self)

    def shutdown(self) -> None:
        import ray
        atexit.unregister(self._stop_monitor)
        self._stop_monitor()
        refs = [a.shutdown.remote() for a in self.actors]
        ray.wait(refs, num_returns=len(refs), timeout=5)
        for a in self.actors + ([self.driver_slot] if self.driver_slot else []):
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)
        if self.started_ray:
            ray.shutdown()


def connect() -> bool:
    """Joins the running Ray cluster (True: this call started Ray in this process)."""
    import ray
    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto")
    except ConnectionError:
        logger.warning("no Ray cluster found (RAY_ADDRESS unset, none started on this machine by `ray start "
                       "--head`): starting a local one with this machine's resources, as vLLM does")
        ray.init()
    return True


def make_placement_group(size: int, key: str):
    """One {key: 1} bundle a rank, bundle 0 on this node (rank 0 runs here); ready, or a ValueError that says
    what the cluster lacks."""
    import ray
    from ray.util import placement_group
    node = ray.get_runtime_context().get_node_id()
    total = ray.cluster_resources().get(key, 0)
    here = next((n["Resources"].get(key, 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    if total < size or here < 1:
        raise ValueError(f"tensor_parallel_size ({size}) needs {size} {key}s in the Ray cluster, one of them on "
                         f"the engine's node: the cluster has {total:g}, this node {here:g} (see `ray status`)")
    bundles = [{key: 1.0} for _ in range(size)]
    pg = placement_group(bundles, strategy="PACK",
                         bundle_label_selector=[{"ray.io/node-id": node}] + [{}] * (size - 1))
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_SECONDS)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise ValueError(f"the Ray cluster did not free {size} {key}s (one on the engine's node) for "
                         f"tensor_parallel_size within {PLACEMENT_TIMEOUT_SECONDS:g} s (see `ray status`)") from None
    return pg


def local_gpu_index(gpu_id: str, visible: str | None) -> int:
    """Ray's id of a GPU (the machine's index, or a UUID) as an index among this process's visible GPUs."""
    if visible is None or visible.strip() == "":
        return int(gpu_id)
    ids = [v.strip() for v in visible.split(",")]
    if gpu_id not in ids:
        raise ValueError(f"Ray reserved GPU {gpu_id} for rank 0, but this process sees only "
                         f"CUDA_VISIBLE_DEVICES={visible}: start the engine without it, or Ray with the same GPUs")
    return ids.index(gpu_id)


def _failures(refs: list, done: list) -> list[tuple[int, Exception]]:
    """(rank, Ray's error) of each finished call in refs (rank r's at index r - 1) that raised."""
    import ray
    failed = []
    for rank, ref in enumerate(refs, start=1):
        if ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                failed.append((rank, e))
    return failed


def _dead(refs: list, done: list) -> list[tuple[int, str]]:
    return [(rank, _first_line(e)) for rank, e in _failures(refs, done)]


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
