"""Continuous batching with a token budget: no prefill or decode phases, only computed tokens catching up.

Each step: running requests first (oldest first), then waiting ones in FCFS order, until the budget
(max_num_batched_tokens) or max_num_seqs runs out. A prompt larger than what is left of the budget runs in
chunks over several steps. When allocate_slots finds no room, the newest running request is preempted: its
blocks are freed (its full blocks stay in the prefix cache) and it goes back to the front of the waiting queue;
its KV is recomputed, or swapped / offloaded and loaded back (core/offload.py decides, by preemption_mode).
Blocks held for forks (core/kv_fork.py: beam search) are freed first, oldest hold first, before any request is
preempted or a waiting one is left waiting for room.

scheduling_policy "priority" (vLLM's): both queues are kept in (priority, arrival) order, lower first, so the
same loops admit the most urgent waiting request first and preempt the least urgent running one (the last),
which has not been scheduled in this step yet; a preempted request goes back to its place, not to the front.

Pausing (vLLM's pause states, set by EngineCore.pause): PAUSED_NEW schedules the running requests only (new and
preempted ones wait), PAUSED_ALL schedules none; added requests queue either way, and run once resumed.

Steps overlap (async scheduling): step N+1 is scheduled while step N runs, before N's sampled tokens are
known. So num_computed_tokens advances when a step is scheduled, and a token being sampled is counted in
num_output_placeholders until update_from_output appends it: a decode request's next step computes the
placeholder's position, whose input id the runner takes from the device (see runner/input_batch.py). A
request whose in-flight tokens already reach max_tokens or max_model_len is not scheduled again.
"""
import bisect
import collections
import enum
import logging
import time
from collections import deque
from dataclasses import replace

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.kv_usage import KVUsagePeak
from pagedllm.core.messages import (CachedRequestData, EngineCoreOutput, KVTransferResult, ModelRunnerOutput,
                                    NewRequestData, SchedulerOutput)
from pagedllm.core.offload import NO_HIT, KVOffloadManager
from pagedllm.core.repetition import ends_repeating
from pagedllm.metrics import PromptTokenSources, SchedulerStats, TokenHistogram
from pagedllm.request import Request, RequestStatus

logger = logging.getLogger("pagedllm")


class PauseState(enum.IntEnum):
    UNPAUSED = 0
    PAUSED_NEW = 1   # running requests go on; waiting ones (new, preempted) are not admitted
    PAUSED_ALL = 2   # nothing is scheduled



class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, offload: KVOffloadManager | None = None, max_loras: int | None = None,
                 policy: str = "fcfs"):
        self.kv = kv_cache_manager
        self.offload = offload or KVOffloadManager(kv_cache_manager.block_size)   # the tiers below the GPU
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_loras = max_loras   # LoRA on: most distinct adapters among the running requests
        self.by_priority = policy == "priority"
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.compiling: list[Request] = []   # waiting for their grammar (structured output) to compile
        self.num_preemptions = 0
        self.num_prompt_tokens = 0      # prompt tokens computed (prefix hits excluded)
        self.prompt_token_sources = PromptTokenSources()   # vLLM's prompt_tokens: each prompt, at its first token
        self.num_generation_tokens = 0
        self.iteration_tokens = TokenHistogram()
        self.kv_peak = KVUsagePeak(kv_cache_manager.block_size)
        self.pause_state = PauseState.UNPAUSED

    # ---- requests in and out -------------------------------------------------------------------------
    def add_request(self, request: Request):
        self.requests[request.request_id] = request
        self._enqueue(self.waiting, request)
        if request.kv_parent is not None:
            self.kv.forks.claim(request)
        if request.grammar is not None:
            self.compiling.append(request)

    def check_grammars(self) -> list[EngineCoreOutput]:
        """Requests whose grammar has compiled may run from now on; those whose compile failed or passed its
        time limit end with an error (a bad request: the constraint is the client's)."""
        outputs, still = [], []
        for req in self.compiling:
            if req.status.finished or req.grammar.poll():
                continue
            if req.grammar.error is None:
                still.append(req)
                continue
            self.waiting.remove(req)
            req.status = RequestStatus.FINISHED_ERROR
            self._free(req)
            outputs.append(EngineCoreOutput(req.request_id, [], finish_reason="error", error=req.grammar.error,
                                            bad_request=True))
        self.compiling = still
        return outputs

    def finish_requests(self, req_ids, status: RequestStatus):
        """End requests from outside a step (abort, stop string); frees their blocks at once."""
        for req_id in req_ids:
            req = self.requests.get(req_id)
            if req is None or req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._free(req)

    def fail_step(self, sched: SchedulerOutput, error: str) -> list[EngineCoreOutput]:
        """A launched step raised: its requests end with an error, the others carry on. Their blocks leave
        the prefix cache (the step may not have written them), its disk reads count as failed, and the
        runner is told again of the requests finished before it (it may not have dropped them)."""
        self.offload.update_from_output(sched.kv_transfers, KVTransferResult(
            failed_reads={h: "its step failed" for h, _ in sched.kv_transfers.disk_reads}))
        self.finished_req_ids |= sched.finished_req_ids
        outputs = []
        for req_id in sched.num_scheduled_tokens:
            req = self.requests.get(req_id)
            if req is None:
                continue
            (self.running if req.status == RequestStatus.RUNNING else self.waiting).remove(req)
            req.status = RequestStatus.FINISHED_ERROR
            self._free(req, uncache=True)
            outputs.append(EngineCoreOutput(req_id, [], finish_reason="error", error=error,
                                            num_cached_tokens=max(req.num_cached_tokens, 0)))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def has_schedulable_requests(self) -> bool:
        """Whether schedule() may schedule anything under the pause state (vLLM's get_num_unfinished_requests)."""
        if self.pause_state == PauseState.PAUSED_ALL:
            return False
        return bool(self.running or (self.waiting and self.pause_state == PauseState.UNPAUSED))

    # ---- one step ------------------------------------------------------------------------------------
    def schedule(self, spec: dict[str, list[int]] | None = None) -> SchedulerOutput:
        """spec: proposed tokens of running requests (speculative decoding, a synchronous step: nothing in
        flight); a request's are verified after its last token when they fit in the budget."""
        spec = spec or {}
        scheduled_spec: dict[str, list[int]] = {}
        budget = 0 if self.pause_state == PauseState.PAUSED_ALL else self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        num_preemptions_before = self.num_preemptions

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            i += 1
            if self._in_flight_reach_end(req):
                continue
            num_new = req.num_tokens + req.num_output_placeholders - req.num_computed_tokens
            proposed = spec.get(req.request_id, ())
            if num_new + len(proposed) > budget:
                proposed = ()
            num_new = min(num_new + len(proposed), budget)
            new_blocks = self._allocate_or_preempt(req, num_new)
            if new_blocks is None:        # req itself was preempted: nothing after it is left to schedule
                break
            if proposed:
                scheduled_spec[req.request_id] = proposed
            # Scheduled in an earlier step, so the runner holds it: only the diff.
            cached_reqs.append(CachedRequestData(req.request_id, [b.block_id for b in new_blocks],
                                                 req.num_computed_tokens))
            budget -= self._advance(req, num_new, num_scheduled, len(proposed))

        # Admitting new work right after preempting would only preempt again; paused, none is admitted.
        no_admit = self.num_preemptions > num_preemptions_before or self.pause_state != PauseState.UNPAUSED
        loras = None if self.max_loras is None else {r.lora_int_id for r in self.running if r.lora_int_id}
        lora_cutoff = None   # once an adapter request waits for a slot: when it began to wait
        i = 0   # the first waiting request not skipped
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not no_admit:
            req = self.waiting[i]
            if _deferred(req):
                i += 1                                  # its adapter loads or its grammar compiles: the requests
                continue                                # after it go first
            if loras is not None and req.lora_int_id and self._lora_waits(req, loras, lora_cutoff):
                if req.lora_int_id not in loras and lora_cutoff is None:
                    req.lora_waits_since = req.lora_waits_since or time.time()
                    lora_cutoff = req.lora_waits_since
                i += 1
                continue
            if req.num_output_placeholders:
                break                                   # preempted with a token in flight: resumes after it
            hold = self.kv.forks.usable_hold(req) if req.kv_parent is not None else None
            if hold is not None:                        # its parent's KV, copy-on-write: computes only its own
                num_hit, load = hold.num_tokens, NO_HIT
                num_new = min(req.num_tokens - num_hit, budget)
                if self.kv.forks.fork(req, hold, num_new) is None:
                    if self.kv.forks.drop_oldest():
                        continue                            # held blocks made room: admitted without a fork
                    break
            else:
                hit_blocks, num_hit = self.kv.get_computed_blocks(req)
                load = self.offload.lookup(req, num_hit)    # blocks after the GPU hit, loaded from a lower tier
                if load.wait:
                    break                                   # they are read from disk this step
                num_new = min(req.num_tokens - num_hit - load.num_tokens, budget)
                new_blocks = self.kv.allocate_slots(req, load.num_tokens + num_new, hit_blocks, num_hit)
                if new_blocks is None:
                    self.offload.cancel(load)
                    if self.kv.forks.drop_oldest():
                        continue                            # held blocks made room: try it again
                    break
                self.offload.commit(req, load, new_blocks)
            del self.waiting[i]
            self.kv.record_prefix_lookup(req, num_hit)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens, req.num_loaded_tokens = num_hit + load.num_tokens, load.num_tokens
            req.num_computed_tokens = num_hit + load.num_tokens
            req.status = RequestStatus.RUNNING
            self._enqueue(self.running, req)
            if loras is not None and req.lora_int_id:
                loras.add(req.lora_int_id)
            # First scheduled, or resumed after preemption: the runner gets it in full.
            new_reqs.append(NewRequestData(req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                                           req.sampling_params, self.kv.get_block_ids(req.request_id),
                                           req.num_computed_tokens))
            budget -= self._advance(req, num_new, num_scheduled)

        self.kv_peak.observe(self.kv.num_used_blocks, self.kv.num_empty_slots, len(self.running))
        ops = self.offload.take_ops()
        ops.block_copies = self.kv.forks.take_copies()
        out = SchedulerOutput(new_reqs, cached_reqs, num_scheduled, sum(num_scheduled.values()),
                              self.finished_req_ids, ops, scheduled_spec)
        self.finished_req_ids = set()
        return out

    def _lora_waits(self, req: Request, loras: set[int], cutoff: float | None) -> bool:
        """max_loras adapters run: a request of another adapter waits for a slot, and after the first such one
        no other new adapter takes a slot before it. Requests of running adapters pass (vLLM's rule), except
        those that arrived after the first one began to wait: the running adapters then drain, and it cannot
        starve. Base requests always pass."""
        if req.lora_int_id not in loras:
            return len(loras) >= self.max_loras or cutoff is not None
        return cutoff is not None and req.arrival_time >= cutoff

    def _in_flight_reach_end(self, req: Request) -> bool:
        """The tokens being sampled already end the request by length: another step would be wasted."""
        n = req.num_output_placeholders
        return n > 0 and (req.num_output_tokens + n >= req.max_tokens or req.num_tokens + n >= self.max_model_len)

    def _advance(self, req: Request, num_new: int, num_scheduled: dict[str, int], num_spec: int = 0) -> int:
        """Counts the step's tokens as computed now; a step that reaches the end samples one more token.
        Proposed tokens count too: update_from_output takes back those the verification rejects."""
        num_scheduled[req.request_id] = num_new
        if req.num_computed_tokens < req.num_prompt_tokens:
            self.num_prompt_tokens += min(num_new, req.num_prompt_tokens - req.num_computed_tokens)
        req.num_computed_tokens += num_new
        if req.num_computed_tokens == req.num_tokens + req.num_output_placeholders + num_spec:
            req.num_output_placeholders += 1
        return num_new

    def _allocate_or_preempt(self, req: Request, num_new: int):
        """allocate_slots for a running request, preempting the newest running ones until it fits.
        Returns None when `req` itself had to be preempted."""
        while True:
            new_blocks = self.kv.allocate_slots(req, num_new)
            if new_blocks is not None:
                return new_blocks
            if self.kv.forks.drop_oldest():   # held blocks go before any running request's
                continue
            victim = self.running.pop()
            self._preempt(victim)
            if victim is req:
                return None

    def _preempt(self, req: Request):
        self.offload.preempt(req, self.kv.req_to_blocks.get(req.request_id, []))
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        if self.by_priority:
            self._enqueue(self.waiting, req)
        else:
            self.waiting.appendleft(req)

    def _enqueue(self, queue, req: Request):
        """FCFS: at the end. Priority: after every request of a lower (priority, arrival), and of an equal one."""
        if not self.by_priority:
            queue.append(req)
            return
        key = (req.priority, req.arrival_time)
        queue.insert(bisect.bisect_right(queue, key, key=lambda r: (r.priority, r.arrival_time)), req)

    # ---- after the step: the only place a request changes ----------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Applies a step's sampled tokens. A request preempted by a later schedule() still gets its token
        (it is waiting, with nothing computed, and recomputes it too); one finished meanwhile is gone."""
        self.offload.update_from_output(sched.kv_transfers, out.kv_transfer)
        outputs, num_step_tokens = [], 0
        for req_id in sched.num_scheduled_tokens:
            req = self.requests.get(req_id)
            tokens = out.sampled_token_ids.get(req_id)
            prompt_logprobs = out.prompt_logprobs.get(req_id)
            if req is None or (not tokens and prompt_logprobs is None):
                continue   # finished meanwhile, or a prompt chunk that did not reach the end
            was_running, new_ids = req.status == RequestStatus.RUNNING, []
            if tokens:
                req.num_output_placeholders -= 1
                if req_id in sched.spec_token_ids:   # rejected proposals: their positions are computed again
                    req.num_computed_tokens -= len(sched.spec_token_ids[req_id]) - (len(tokens) - 1)
                if req.grammar is not None and req.grammar.dead:   # sampled with no token allowed: noise
                    self._fail_empty_constraint(req)
                    tokens = ()
                for token in tokens:   # what follows a stop is dropped
                    req.append_output_token_id(token)
                    new_ids.append(token)
                    self._check_stop(req, token)
                    if req.status.finished:
                        break
                self.num_generation_tokens += len(new_ids)
                num_step_tokens += len(new_ids)
                if new_ids and req.num_output_tokens == len(new_ids):   # its first token (not after a preemption)
                    num_step_tokens += self.prompt_token_sources.record(req.num_prompt_tokens, req.num_cached_tokens,
                                                                        req.num_loaded_tokens)
            logprobs = out.logprobs.get(req_id)
            outputs.append(EngineCoreOutput(req_id, new_ids, logprobs and logprobs[:len(new_ids)], prompt_logprobs,
                                            req.status.finish_reason, req.stop_reason,
                                            max(req.num_cached_tokens, 0), req.error, req.bad_request))
            if req.status.finished:
                (self.running if was_running else self.waiting).remove(req)
                self._free(req)
        if sched.num_scheduled_tokens:
            self.iteration_tokens.observe(num_step_tokens)
        return outputs

    def _check_stop(self, req: Request, token: int):
        params = req.sampling_params
        if req.grammar is not None and not req.grammar.accept(token):
            # Sampled under its bitmask, a token is accepted unless the row's other masks left it no token.
            conflict = _grammar_conflict(params)
            req.status = RequestStatus.FINISHED_ERROR
            req.error = conflict or f"token {token} was sampled against the request's grammar (an engine bug)"
            req.bad_request = conflict is not None
            logger.warning("request %s failed: %s", req.request_id, req.error)
        elif req.num_output_tokens >= params.min_tokens and token in params.all_stop_token_ids:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token if token in params.stop_token_ids else None
        elif req.grammar is not None and req.grammar.terminated:
            req.status = RequestStatus.FINISHED_STOPPED   # its grammar ended (ignore_eos): nothing may follow
        elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
        elif params.repetition_detection is not None and _repeats(req):
            req.status = RequestStatus.FINISHED_REPETITION
            req.stop_reason = "repetition_detected"

    def _fail_empty_constraint(self, req: Request):
        """The request's constraint allowed no next token, not even the end: it matches no text (after what it
        allowed so far). The request's fault (a 400 on the server), not the engine's."""
        req.status = RequestStatus.FINISHED_ERROR
        req.error = (f"structured_outputs.{req.grammar.kind} matches no text: after what it allowed so far it "
                     "allows no next token, not even the end")
        req.bad_request = True
        logger.warning("request %s failed: %s", req.request_id, req.error)

    def _free(self, req: Request, uncache: bool = False):
        if req.kv_parent is not None:
            self.kv.forks.unclaim(req)
        if not uncache and self.kv.forks.can_hold(req):
            self.kv.forks.hold(req)      # kept for its children (beam search), freed when they have forked
        else:
            self.kv.free(req, uncache)
        self.offload.free(req)
        self.finished_req_ids.add(req.request_id)
        del self.requests[req.request_id]

    def make_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            num_waiting_deferred=sum(map(_deferred, self.waiting)),
            num_blocks_total=self.kv.pool.num_blocks, num_blocks_free=self.kv.num_free_blocks,
            kv_cache_usage=self.kv.usage(), prefix_cache_queries=self.kv.prefix_stats.queries,
            prefix_cache_hits=self.kv.prefix_stats.hits, num_preemptions=self.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens, num_generation_tokens=self.num_generation_tokens,
            prompt_token_sources=replace(self.prompt_token_sources), iteration_tokens=self.iteration_tokens.snapshot(),
            peak_blocks=self.kv_peak.peak_blocks, peak_running=self.kv_peak.peak_running,
            kv_waste_at_peak=self.kv_peak.kv_waste_at_peak, kv_tiers=self.offload.make_stats(),
            running_lora_adapters=self._adapter_counts(self.running),
            waiting_lora_adapters=self._adapter_counts(self.waiting))

    def _adapter_counts(self, queue) -> dict[str, int] | None:
        if self.max_loras is None:
            return None
        return dict(collections.Counter(r.lora_request.lora_name for r in queue if r.lora_request is not None))


def _repeats(req: Request) -> bool:
    """repetition_detection (vLLM's, after min_tokens): the output's tail, no more than a pattern can span."""
    p = req.sampling_params.repetition_detection
    if req.num_output_tokens < req.sampling_params.min_tokens:
        return False
    n = min(req.num_output_tokens, p.max_pattern_size * p.min_count)
    return n > 0 and ends_repeating(req.all_token_ids[-n:], p)


def _deferred(req: Request) -> bool:
    """Waiting on its adapter's load or its grammar's compile, not on room: scheduling passes it over (vLLM's
    'deferred' waiting reason)."""
    return bool(req.lora_loading) or (req.grammar is not None and req.grammar.matcher is None)


def _grammar_conflict(params) -> str | None:
    """Why a token was sampled against a request's grammar, where its own fields explain it: with the stop
    tokens banned (min_tokens), or only some tokens allowed or some banned, a row can be left with no token
    its constraint allows (a `choice` shorter than min_tokens: only the end may follow it). None: none is set."""
    fields = ", ".join(name for name, on in (("min_tokens", params.min_tokens > 0),
                                             ("allowed_token_ids", params.allowed_token_ids is not None),
                                             ("bad_words", bool(params.bad_words))) if on)
    return (f"structured_outputs and {fields} left no token to sample: every token the constraint allowed next "
            f"was excluded") if fields else None
