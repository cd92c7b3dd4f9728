"""EngineCore: the scheduler and the model runner, token ids in and token ids out, one step at a time.

It holds no tokenizer and no user-facing request state: `Engine` runs it in-process behind the input and
output processors; `AsyncLLM` runs it in a process of its own (`core_process.py`) so that HTTP work in the
API process never delays a step.
"""
import concurrent.futures
import logging
import time
from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.messages import EngineCoreOutput, SchedulerOutput
from pagedllm.core.offload import KVOffloadManager
from pagedllm.core.scheduler import PauseState, Scheduler
from pagedllm.metrics import SchedulerStats, StepStats
from pagedllm.profiler import not_enabled
from pagedllm.request import Request, RequestStatus
from pagedllm.distributed.executor import WorkerDiedError, build_runner
from pagedllm.runner.model_runner import PendingOutput
from pagedllm.engine.pause import check_mode
from pagedllm.engine.tokenizer import load_engine_tokenizer, load_eos_token_ids
from pagedllm.lora.loader import LoRALoader
from pagedllm.lora.request import LoRARequest
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.speculator import Speculator
from pagedllm.structured_output.compiler import GrammarCompilePool
from pagedllm.structured_output.manager import StructuredOutputManager, live_grammar_rows

logger = logging.getLogger("pagedllm")

@dataclass
class EngineCoreRequest:
    """One sequence to run (a child of a user request when n > 1), already tokenized and validated."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    arrival_time: float
    cache_salt: str | None
    lora_request: "LoRARequest | None" = None
    kv_parent: str | None = None      # a held request whose KV it extends, forked copy-on-write (beam search)
    hold_kv: bool = False             # keep its blocks when it ends, until release_kv_holds
    priority: int = 0                 # scheduling_policy priority: lower runs first


class EngineCore:
    def __init__(self, config: EngineConfig, hf_config, device: torch.device, dtype: torch.dtype,
                 max_model_len: int):
        torch.manual_seed(config.seed)
        self.block_size = config.block_size
        self.runner = build_runner(config, hf_config, device, dtype, max_model_len)   # TP: rank 0's, mirrored
        offload = self.runner.kv_offload and KVOffloadManager(
            config.block_size, config.preemption_mode, config.enable_prefix_caching, self.runner.kv_offload.sizes)
        self.kv_cache_manager = KVCacheManager(self.runner.num_blocks, config.block_size,
                                               offload and offload.on_gpu_evict, self.runner.kv_window)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   max_model_len, offload, config.max_loras if config.enable_lora else None,
                                   config.scheduling_policy)
        self._in_flight: tuple[SchedulerOutput, PendingOutput, StepStats] | None = None   # launched, not read
        self.structured = StructuredOutputManager(GrammarCompilePool(
            lambda: load_engine_tokenizer(config), hf_config.vocab_size,
            lambda tokenizer: load_eos_token_ids(config.model, tokenizer, config.generation_config),
            config.structured_outputs_compile_workers, config.structured_outputs_compile_timeout),
            hf_config.vocab_size, self.runner.config.max_num_seqs, self.runner.device)
        self._failed: list[EngineCoreOutput] = []   # error outputs of requests failed outside a step
        self.lora_loader: LoRALoader | None = None   # reads adapters off the step loop (with the first one)
        self.speculator = None   # speculative decoding: which steps and rows propose (spec_decode/speculator.py)
        if config.speculative is not None:
            self.speculator = Speculator(config.speculative, max_model_len)
        self._pause_waiters: list[tuple[concurrent.futures.Future, bool]] = []   # (its call, clear_cache)
        self._sleep_level: int | None = None   # sleep(level 0)'s pause, until resumed: the metrics' sleep state

    def add_request(self, r: EngineCoreRequest):
        """A request whose own data raises here (hashing its blocks, its grammar) ends with an error
        output at the next step(); nothing of it is left in the engine. One whose adapter is not on the host
        waits in the queue while a loader thread reads it (lora/loader.py); a read that fails fails it alone."""
        try:
            # The Request hashes the prompt's blocks: that work stays here, off the API process; under an
            # adapter still being read, once it is on the host (its identity is in the first block's hash)
            lora_key = None if r.lora_request is None else self._lora_loader().key_if_loaded(r.lora_request)
            request = Request(r.request_id, r.prompt_token_ids, r.sampling_params, r.max_tokens,
                              self.block_size, r.arrival_time, r.cache_salt, r.lora_request, lora_key,
                              r.kv_parent, r.hold_kv, lora_loading=r.lora_request is not None and lora_key is None,
                              priority=r.priority)
            if r.request_id in self.scheduler.finished_req_ids:
                # An id used again right after its last request ended: the runner drops that one now, as told
                # with the next step its end would drop this one; and the step in flight's token for it is not
                # this one's.
                self.scheduler.finished_req_ids.discard(r.request_id)
                self.runner.drop_request(r.request_id)
                if self._in_flight is not None:
                    self._in_flight[0].num_scheduled_tokens.pop(r.request_id, None)
                if self.speculator is not None:
                    self.speculator.forget([r.request_id])
            sp = r.sampling_params
            if sp.structured_outputs is not None:   # compiles on a worker from now on
                opens_with = sp.reasoning_start_token_id if sp.reasoning_first_token_decides else None
                request.grammar = self.structured.request_grammar(sp.structured_outputs, sp.reasoning_end_token_id,
                                                                  opens_with)
            if request.lora_loading:
                self.lora_loader.wait_for(r.lora_request, r.request_id)
            elif r.lora_request is not None:   # last: nothing after it can fail and leave the adapter held
                self.runner.add_lora_request(r.request_id, r.lora_request)
        except WorkerDiedError:   # not the request's fault: the engine cannot go on
            raise
        except Exception as e:
            logger.error("request %s failed as it entered the engine core: %s", r.request_id, _describe(e))
            self._failed.append(EngineCoreOutput(r.request_id, [], finish_reason="error", error=_describe(e)))
            return
        self.scheduler.add_request(request)

    # ---- LoRA adapters (vLLM's LLMEngine names) -------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads an adapter into the host LRU now, on the caller's thread (a bad one raises its ValueError)."""
        self._unload_for_inplace(lora_request)
        return self._lora().add(lora_request)

    def add_lora_async(self, lora_request: LoRARequest) -> concurrent.futures.Future:
        """add_lora with the read on a loader thread: a future of True (or of the adapter's ValueError), set by
        the step() that puts it on the host. The core process answers its add_lora calls this way."""
        future = concurrent.futures.Future()
        self._unload_for_inplace(lora_request)
        if self._lora_loader().key_if_loaded(lora_request) is not None:
            future.set_result(True)
        else:
            self.lora_loader.wait_for(lora_request, caller=future)
        return future

    def remove_lora(self, lora_int_id: int) -> bool:
        """False for an unknown adapter or one that unfinished requests use (they finish under it)."""
        lora = self._lora()   # the scheduler's requests: a finished one reaches the runner a step later
        return lora.remove(lora_int_id, self._lora_in_use(lora_int_id))

    def _lora_in_use(self, lora_int_id: int) -> bool:
        return any(r.lora_int_id == lora_int_id for r in self.scheduler.requests.values())

    def _unload_for_inplace(self, req: LoRARequest):
        """vLLM's load_inplace: the adapter loaded under the request's id (the same files, rewritten, or another
        path) leaves the host, so that add_lora reads it again. Its blocks in the prefix cache are never reused:
        they are keyed by the old weights' sha256. Refused while unfinished requests run under it (vLLM swaps
        the weights under them: their KV would mix both)."""
        lora = self._lora()
        if not req.load_inplace or req.lora_int_id not in lora.loaded_ids():
            return
        if self._lora_in_use(req.lora_int_id):
            raise ValueError(f"LoRA adapter {req.lora_name!r} ({req.lora_path}): load_inplace while unfinished "
                             f"requests run under lora_int_id {req.lora_int_id}: load it in place once they "
                             f"finish, or under another lora_int_id")
        lora.remove(req.lora_int_id, in_use=False)

    def list_loras(self) -> set[int]:
        return self._lora().loaded_ids()

    def pin_lora(self, lora_int_id: int) -> bool:
        return self._lora().pin(lora_int_id)

    def _lora(self):
        if self.runner.lora is None:
            raise ValueError("LoRA adapters need enable_lora=True (--enable-lora)")
        return self.runner.lora

    def _lora_loader(self) -> LoRALoader:
        if self.lora_loader is None:
            self.lora_loader = LoRALoader(self._lora())
        return self.lora_loader

    def _poll_lora_loads(self) -> list[EngineCoreOutput]:
        """Requests whose adapter is now on the host may be scheduled; those whose read failed end with its error."""
        outputs = []
        for result in self.lora_loader.poll():
            for req_id in result.req_ids:
                req = self.scheduler.requests.get(req_id)
                if req is None or req.status.finished:
                    continue   # aborted while it waited
                if result.error is None:
                    self.runner.add_lora_request(req_id, req.lora_request)
                    req.lora_loaded(result.lora_key)
                    continue
                logger.error("request %s failed: %s", req_id, result.error)
                self.scheduler.finish_requests([req_id], RequestStatus.FINISHED_ERROR)
                outputs.append(EngineCoreOutput(req_id, [], finish_reason="error", error=result.error,
                                                bad_request=True))
        return outputs

    @property
    def _lora_loading(self) -> bool:
        return self.lora_loader is not None and bool(self.lora_loader.pending)

    def finish_requests(self, request_ids: list[str], status: RequestStatus):
        self.scheduler.finish_requests(request_ids, status)

    def release_kv_holds(self, request_ids: list[str]):
        """No more children will fork these held requests: their blocks go once the waiting ones have."""
        self.kv_cache_manager.forks.release(request_ids)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or self._in_flight is not None or bool(self._failed)
                or self._lora_loading)

    def has_work(self) -> bool:
        """Whether step() has anything to do now: as has_unfinished_requests, less the requests a pause holds."""
        return (self.scheduler.has_schedulable_requests() or self._in_flight is not None or bool(self._failed)
                or self._lora_loading)

    # ---- pausing (vLLM's pause_scheduler; engine/pause.py) --------------------------------------------------
    def pause(self, mode: str, clear_cache: bool, sleep_level: int | None = None
              ) -> concurrent.futures.Future | None:
        """Pauses scheduling (mode: engine/pause.py). None when the pause is complete at once, else a Future
        that step() completes once nothing runs (the aborts' outputs, and the running requests' last ones
        under "wait", are returned by step() first). clear_cache: the prefix cache is reset then; refused under
        "keep" while requests hold KV blocks (preempting them to reset it is not built). sleep_level: the pause
        is sleep(level)'s, which the stats report until resumed (pause_generation's is not a sleep, as vLLM's)."""
        check_mode(mode)
        if mode == "keep" and clear_cache and self.kv_cache_manager.num_used_blocks:
            raise ValueError("pause mode 'keep' with clear_cache: the kept requests hold KV blocks, and preempting "
                             "them to clear the prefix cache is not built; pass clear_cache=False")
        if mode == "abort":
            ids = [r.request_id for r in (*self.scheduler.running, *self.scheduler.waiting)]
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            self._failed += [EngineCoreOutput(i, [], finish_reason="abort") for i in ids]
        self.scheduler.pause_state = PauseState.PAUSED_ALL if mode == "keep" else PauseState.PAUSED_NEW
        if sleep_level is not None:
            self._sleep_level = sleep_level
        future = concurrent.futures.Future()
        self._pause_waiters.append((future, clear_cache))
        self._settle_pause()
        if not future.done():
            return future
        future.result()   # a cache that could not be cleared raises here
        return None

    def resume(self):
        """Scheduling goes on; the requests queued while paused run. A pause still draining ("wait") completes."""
        self.scheduler.pause_state = PauseState.UNPAUSED
        self._sleep_level = None
        for future, _ in self._pause_waiters:
            future.set_result(None)
        self._pause_waiters = []

    def is_paused(self) -> bool:
        return self.scheduler.pause_state != PauseState.UNPAUSED

    def _settle_pause(self):
        """Completes the pauses waiting for the engine to be idle."""
        if not self._pause_waiters or self.has_work():
            return
        waiters, self._pause_waiters = self._pause_waiters, []
        cleared = not any(clear for _, clear in waiters) or self.reset_prefix_cache()
        for future, clear in waiters:
            if clear and not cleared:
                future.set_exception(RuntimeError("paused, but the prefix cache was not cleared: requests hold KV "
                                                  "blocks"))
            else:
                future.set_result(None)

    def step(self) -> tuple[list[EngineCoreOutput], StepStats] | None:
        """See _step; then a pause waiting for the engine to be idle completes if it is."""
        done = self._step()
        self._settle_pause()
        return done

    def _step(self) -> tuple[list[EngineCoreOutput], StepStats] | None:
        """Schedules and launches step N+1 (when there is work), then waits for step N and applies it to the
        requests; returns N's outputs and timings (None when there was nothing to report). The caller's
        work on them overlaps N+1 on the device: the device never waits for the host between steps.

        A launch that raises fails the requests of N+1 alone (error outputs, returned with N's); N is
        still read. A device error (torch.AcceleratorError: the CUDA context is lost) and a failure
        while reading N propagate: the core process ends and the API process with it."""
        outputs, self._failed = self._failed, []
        if self._lora_loading:
            outputs += self._poll_lora_loads()
        if self.scheduler.compiling:
            outputs += self.scheduler.check_grammars()
        schedulable = self.scheduler.has_schedulable_requests()
        if schedulable and self.speculator is not None and self.speculator.wants_step(self.scheduler.running,
                                                                                      len(self.scheduler.waiting)):
            return self._spec_step(outputs)
        launched = None
        if schedulable:
            launched, failed = self._launch()
            outputs += failed
        done, self._in_flight = self._in_flight, launched
        if done is not None:
            outputs += self.scheduler.update_from_output(done[0], done[1].result())
        if launched is not None and launched[1].deferred is not None:
            outputs += self._sample_constrained(*launched[:2])
        if done is None:
            if launched is None and not outputs and self._lora_loading:
                self.lora_loader.wait(0.05)   # only add_lora reads under way: no spinning
            return (outputs, StepStats()) if outputs else None
        return outputs, done[2]

    def _launch(self, spec: dict[str, list[int]] | None = None):
        """Schedules a step (with proposals: a speculative one) and launches it: ((its SchedulerOutput, its
        PendingOutput, its StepStats), []), or (None, the error outputs of its requests) when the launch raised."""
        stats = StepStats()
        sched_out = self.scheduler.schedule(spec)
        if self.speculator is not None:
            self.speculator.forget(sched_out.finished_req_ids)
        self._record_first_scheduled(sched_out, stats)
        if sched_out.is_empty and self._in_flight is None and (self.scheduler.compiling or self._lora_loading):
            self._wait_for_workers()   # nothing runs but grammars compiling, adapters loading: no spinning
        try:
            return (sched_out, self.runner.execute_async(sched_out), stats), []
        except (torch.AcceleratorError, WorkerDiedError):   # the engine cannot go on
            raise
        except Exception as e:
            return None, self._fail_step(sched_out, e)

    def _spec_step(self, outputs: list[EngineCoreOutput]) -> tuple[list[EngineCoreOutput], StepStats]:
        """A synchronous step: scheduled with the proposals, launched and read at once. A step still in flight
        is only read and returned by this call (proposals need its tokens; one call reports one step, so the
        caller's stop strings end their requests before they are scheduled again)."""
        done, self._in_flight = self._in_flight, None
        if done is not None:
            return outputs + self.scheduler.update_from_output(done[0], done[1].result()), done[2]
        launched, failed = self._launch(self.speculator.propose(self.scheduler.running))
        if launched is None:
            return outputs + failed, StepStats()
        sched_out, pending, stats = launched
        if pending.deferred is not None:
            failed = self._sample_constrained(sched_out, pending)
            if failed:
                return outputs + failed, stats
        result = pending.result()
        outputs += self.scheduler.update_from_output(sched_out, result)
        for req_id, proposed in sched_out.spec_token_ids.items():
            self.speculator.observe(req_id, len(proposed), len(result.sampled_token_ids[req_id]) - 1)
        return outputs, stats

    def _wait_for_workers(self):
        """Blocks until a grammar compiles or an adapter is read (or 50 ms pass: the core process reads its pipe
        between steps)."""
        futures = [req.grammar.future for req in self.scheduler.compiling]
        if self._lora_loading:
            futures += [load.future for load in self.lora_loader.pending.values()]
        concurrent.futures.wait(futures, timeout=0.05, return_when=concurrent.futures.FIRST_COMPLETED)

    def _sample_constrained(self, sched_out: SchedulerOutput, pending: PendingOutput) -> list[EngineCoreOutput]:
        """A launched step with rows under a grammar: the step before it is applied now (its tokens are the
        matchers' pending ones), so their bitmask is filled while the device runs this step's forward, then it
        samples. A request that ended meanwhile, or whose grammar is complete, samples unmasked (its token is
        dropped). On the step thread: the fill's xgrammar calls give the GIL away, and on a second thread,
        getting it back behind this one cost more than the overlap gained (H200, W1 with every request
        constrained: 96.3 / 89.1 / 95.0 / 102.6% of plain on the step thread, 83.2 / 93.9 / 92.0 / 89.1% on a
        second)."""
        try:
            rows = live_grammar_rows(pending.rows, self.scheduler.requests)
            start = time.perf_counter()
            bitmask = self.structured.fill_bitmask(rows) if rows else None
            self.structured.stats.record(time.perf_counter() - start, pending.forward_done)
            self.runner.sample_constrained(pending, bitmask, [j for j, _ in rows])
            return []
        except (torch.AcceleratorError, WorkerDiedError):   # the engine cannot go on
            raise
        except Exception as e:
            self._in_flight = None
            return self._fail_step(sched_out, e)

    def _fail_step(self, sched_out: SchedulerOutput, e: Exception) -> list[EngineCoreOutput]:
        logger.error("a step of %d requests failed; they end with an error, the others carry on",
                     len(sched_out.num_scheduled_tokens), exc_info=e)
        self.runner.reset_after_failed_step()
        return self.scheduler.fail_step(sched_out, _describe(e))

    def _record_first_scheduled(self, sched_out: SchedulerOutput, stats: StepStats):
        now = time.time()
        for new in sched_out.new_reqs:
            req = self.scheduler.requests[new.req_id]
            if req.num_preemptions == 0:   # resumed requests come back as new ones too
                stats.first_scheduled_ids.append(new.req_id)
                stats.queue_times.append(now - req.arrival_time)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix: the GPU's, the CPU tier's, and the disk tier's (its files of this model
        are deleted). The swap pool is kept: it holds preempted requests' own KV. Returns False, changing
        nothing, while a request holds GPU blocks, or CPU tier slots are pinned (a disk read of a step whose
        result is not applied yet)."""
        if self.kv_cache_manager.num_used_blocks or not self.scheduler.offload.reset_prefix_cache():
            return False
        self.kv_cache_manager.reset_prefix_cache()   # no block in use: it succeeds
        self.runner.clear_kv_disk()   # every rank's files
        return True

    def profile(self, is_start: bool, prefix: str | None = None):
        """vLLM's: every rank's torch profiler starts (prefix: its trace files' names start with it) or stops,
        writing the traces (profiler.py). A RuntimeError when no --profiler-config enabled it."""
        if not self.runner.config.profiler_config.enabled:
            raise not_enabled()
        self.runner.profile(is_start, prefix)

    def get_stats(self) -> SchedulerStats:
        stats = self.scheduler.make_stats()
        stats.sleep_level = self._sleep_level
        if self.speculator is not None:
            stats.spec_decode = self.speculator.stats.snapshot()
        return stats

    def reset_peak_stats(self):
        self.scheduler.kv_peak.reset()

    def shutdown(self):
        """Stops the tensor-parallel workers (none at tensor_parallel_size 1)."""
        self.runner.profiler.shutdown()   # a profile still running writes its trace
        shutdown = getattr(self.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _describe(e: Exception) -> str:
    """What a failed request's client is told: the exception, cut short (the log has the traceback)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:297] + "..."
