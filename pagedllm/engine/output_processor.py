"""OutputProcessor: the one per-step loop over outputs: detokenize, stop strings, RequestOutput.

A user request with n > 1 runs as n child requests in the scheduler (ids "<request_id>#<i>"); their
outputs are gathered back into one RequestOutput here.
"""
import enum
import time
from dataclasses import dataclass, field

from pagedllm.core.messages import EngineCoreOutput, TokenLogprobs
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.decode_after import decode_after, partial_char_text
from pagedllm.engine.tokenizer import raw_decoder
from pagedllm.lora.request import LoRARequest
from pagedllm.metrics import FinishedRequestStats, StepStats
from pagedllm.outputs import (CompletionOutput, FlatLogprobs, Logprob, PositionLogprobs, RequestMetrics,
                              RequestOutput)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class OutputKind(enum.Enum):
    FINAL = enum.auto()        # one RequestOutput when every sequence has finished (LLM.generate)
    CUMULATIVE = enum.auto()   # every step: the full text so far
    DELTA = enum.auto()        # every step: only what is new (streaming)

    @classmethod
    def of(cls, params: SamplingParams) -> "OutputKind":
        """What params.output_kind asks (vLLM's way to ask for deltas or only the final output)."""
        return _KINDS[params.output_kind]


_KINDS = {RequestOutputKind.CUMULATIVE: OutputKind.CUMULATIVE, RequestOutputKind.DELTA: OutputKind.DELTA,
          RequestOutputKind.FINAL_ONLY: OutputKind.FINAL}


@dataclass
class _Sequence:
    """One child request: one CompletionOutput."""
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | FlatLogprobs | None = None   # flat_logprobs: flat from the start
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    finish_sent: bool = False
    num_cached_tokens: int = 0
    # vLLM runs each of a request's n as its own request, so its latency and length series count each sequence:
    # their times are kept here (seconds; None until known)
    queue_time: float | None = None   # arrival to first scheduled
    first_token_time: float | None = None
    last_token_time: float | None = None
    stats_recorded: bool = False      # its FinishedRequestStats went into a StepStats


@dataclass
class _ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: OutputKind
    metrics: RequestMetrics
    seqs: list[_Sequence]
    params: SamplingParams            # as sent (the finished stats' n and max_tokens)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    num_returned: int | None = None   # best_of: return this many (n) of seqs, the highest cumulative logprob
    lora_request: LoRARequest | None = None
    named_logprobs: bool = False      # logprob_token_ids: a position's other ids are those, unranked
    prompt_logprobs_sent: bool = False   # DELTA: its prompt logprobs went out, in its first output

    @property
    def finished(self) -> bool:
        for s in self.seqs:   # a loop, not all(<genexpr>): this runs for every request every step
            if s.finish_reason is None:
                return False
        return True


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


def token_texts(tokenizer, decode):
    """[id] -> the token's text as it reads inside a text, for logprobs: decoded after an anchor token ("a")
    (decode_after). Alone, a SentencePiece token loses its leading space: the tokens no longer rebuild the text,
    their text offsets drift, and top-N entries of " loved" and "loved" collide into one key (a fuzz of the
    server found 19 of 20). Cached by id: a token's text in this sense does not depend on its neighbours."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    anchor_text = decode(anchor)
    texts: dict[int, str] = {}

    def text(ids: list[int]) -> str:
        t = texts.get(ids[0])
        if t is None:
            t = texts[ids[0]] = decode_after(decode, anchor, ids, anchor_text)
        return t
    return text


class OutputProcessor:
    def __init__(self, tokenizer, stream_interval: int = 1):
        """stream_interval: a DELTA or CUMULATIVE request's output comes once this many new tokens have
        gathered (vLLM's --stream-interval), the first token and the finish at once; 1 = every step."""
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        # A logprob's token text (decoded as it reads inside a text: token_texts), cleaning up spaces where the
        # tokenizer says so; None without a tokenizer (skip_tokenizer_init).
        self._decode_token = (
            (lambda ids: None) if tokenizer is None
            else token_texts(tokenizer, tokenizer.decode if getattr(tokenizer, "clean_up_tokenization_spaces", False)
                             else raw_decoder(tokenizer, skip_special_tokens=False)))
        self._single_texts = {True: {}, False: {}}   # by skip_special_tokens: see IncrementalDetokenizer
        self.parents: dict[str, _ParentRequest] = {}
        self.child_to_parent: dict[str, tuple[_ParentRequest, _Sequence]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, kind: OutputKind, arrival_time: float,
                    lora_request: LoRARequest | None = None):
        num_seqs = params.num_sequences
        ranked = num_seqs > params.n
        singles = self._single_texts[params.skip_special_tokens]
        # FINAL: the text is read once, at the end, so it is decoded then, in one call (detokenizer.py)
        seqs = [_Sequence(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params, singles,
                                                    deferred=kind is OutputKind.FINAL),
                          logprobs=None if params.logprobs is None
                          else FlatLogprobs() if params.flat_logprobs else [],
                          cumulative_logprob=0.0 if params.logprobs is not None or ranked else None)
                for i in range(num_seqs)]
        parent = _ParentRequest(request_id, prompt, prompt_token_ids, kind, RequestMetrics(arrival_time), seqs,
                                params, num_returned=params.n if ranked else None,
                                named_logprobs=params.logprob_token_ids is not None, lora_request=lora_request)
        self.parents[request_id] = parent
        for s in seqs:
            self.child_to_parent[child_request_id(request_id, s.index, num_seqs)] = (parent, s)

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return [] if parent is None else [child_request_id(request_id, s.index, len(parent.seqs))
                                          for s in parent.seqs]

    def aborted_output(self, request_id: str) -> RequestOutput | None:
        """The last output of a request aborted while it runs: its unfinished sequences end with "abort" (vLLM's),
        so that a stream still read ends. None for a request not running."""
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        for s in parent.seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        return self._make_output(parent, True)

    def abort(self, request_id: str):
        for child in self.child_ids(request_id):
            self.child_to_parent.pop(child, None)
        self.parents.pop(request_id, None)

    def process(self, outputs: list[EngineCoreOutput], stats: StepStats | None = None
                ) -> tuple[list[RequestOutput], list[str], dict[str, EngineCoreOutput]]:
        """Returns the RequestOutputs to deliver; the child ids the scheduler must free (a stop string
        finished them; every sequence of a failed request); and {request_id: the failed sequence's output}
        of the requests the engine core failed. A failed sequence fails its whole request: its unfinished
        siblings end with "error" too.
        Request latencies go into `stats` when one is given (the server's metrics)."""
        now = time.time()
        if stats is not None:
            self._record_first_scheduled(stats)
        updated: dict[str, _ParentRequest] = {}
        stopped: list[str] = []
        errors: dict[str, EngineCoreOutput] = {}
        for out in outputs:
            entry = self.child_to_parent.get(out.req_id)
            if entry is None:
                continue
            parent, seq = entry
            if seq.finish_reason is not None:
                continue   # ended earlier in this batch (a sibling failed, or a stop string): nothing may follow
            if stats is not None:
                _record_latencies(parent.metrics.arrival_time, seq, out, now, stats)
            if self._update_sequence(parent, seq, out, now):
                stopped.append(out.req_id)
            if out.error is not None:
                errors[parent.request_id] = out
                stopped += self._fail_siblings(parent)
            updated[parent.request_id] = parent
        results = []
        for parent in updated.values():
            finished = parent.finished
            ro = self._make_output(parent, finished)
            if ro is not None:
                results.append(ro)
            if stats is not None:
                _record_finished(parent, finished, now, stats)
            if finished:
                parent.metrics.finished_time = now
                self.abort(parent.request_id)
        return results, stopped, errors

    def _record_first_scheduled(self, stats: StepStats):
        """The start of a sequence's prefill (vLLM's prefill, decode and inference times count from it)."""
        for rid, queue_time in zip(stats.first_scheduled_ids, stats.queue_times):
            entry = self.child_to_parent.get(rid)
            if entry is not None:
                metrics, seq = entry[0].metrics, entry[1]
                seq.queue_time = queue_time
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = metrics.arrival_time + queue_time

    def _fail_siblings(self, parent: _ParentRequest) -> list[str]:
        for s in parent.seqs:
            if s.finish_reason is None:
                s.finish_reason = "error"
        return self.child_ids(parent.request_id)

    def _update_sequence(self, parent: _ParentRequest, seq: _Sequence, out: EngineCoreOutput,
                         now: float) -> bool:
        """Returns True when a stop string ended the sequence."""
        if out.prompt_logprobs is not None:   # position i + 1's logprobs: context, the prompt before it
            ids = parent.prompt_token_ids
            parent.prompt_logprobs = [None] + [self._position(p, context=ids[max(i - 3, 0):i + 1],
                                                              decode=parent.params.detokenize)
                                               for i, p in enumerate(out.prompt_logprobs)]
            if parent.params.flat_logprobs:   # once here, not again in each output that carries them
                parent.prompt_logprobs = FlatLogprobs.from_positions(parent.prompt_logprobs)
        seq.num_cached_tokens = max(seq.num_cached_tokens, out.num_cached_tokens)
        parent.num_cached_tokens = max(parent.num_cached_tokens, seq.num_cached_tokens)
        new, logprobs = out.new_token_ids, out.logprobs
        # An EOS or stop token id that ended the sequence is not part of its text.
        stop_str = (seq.detokenizer.update(new, len(seq.token_ids) + len(new), out.finish_reason == "stop")
                    if new else None)
        if stop_str is not None:   # the ids after the one that completed it are not output (speculation)
            keep = seq.detokenizer.tokens_to_stop
            new, logprobs = new[:keep], logprobs and logprobs[:keep]
        if new:
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            if seq.first_token_time is None:
                seq.first_token_time = now
            parent.metrics.last_token_time = seq.last_token_time = now
            seq.token_ids.extend(new)
            if logprobs is not None and seq.cumulative_logprob is not None:
                for i, position in enumerate(logprobs, len(seq.token_ids) - len(new)):
                    seq.cumulative_logprob += position.logprobs[0]
                    if seq.logprobs is not None:   # context: the output before it, as vLLM's (not the prompt)
                        context = seq.token_ids[max(i - 4, 0):i]
                        seq.logprobs.append(self._position(position, parent.named_logprobs, context,
                                                           parent.params.detokenize))
        seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        if stop_str is not None:   # as vLLM: also where the core ended it by length in the same step
            seq.finish_reason, seq.stop_reason = "stop", stop_str
            return out.finish_reason is None
        return False

    def _position(self, lp: TokenLogprobs, named: bool = False, context: list[int] = (),
                  decode: bool = True) -> PositionLogprobs:
        """named: the ids after the chosen token are logprob_token_ids, whose ranks are unknown (None).
        context: the sequence's tokens before this position (partial UTF-8 characters: partial_char_text).
        decode: False with detokenize=False, whose tokens' texts are None (vLLM's: no tokenizer then)."""
        entry = {}
        for rank, (tid, value) in enumerate(zip(lp.token_ids, lp.logprobs)):
            if tid not in entry:   # the chosen token comes first; it may also be among the top-N
                text = self._decode_token([tid]) if decode else None
                if text is not None and text.endswith("\ufffd"):
                    text = partial_char_text(self.tokenizer.decode, tid, list(context))
                entry[tid] = Logprob(value, lp.rank if rank == 0 else None if named else rank, text)
        return entry

    def _make_output(self, parent: _ParentRequest, finished: bool) -> RequestOutput | None:
        if parent.num_returned is not None:
            return self._best_of_output(parent, finished)
        kind = parent.kind
        if kind is OutputKind.FINAL and not finished:
            return None
        seqs = parent.seqs
        if self.stream_interval > 1 and not any(self._due(s) for s in seqs):
            return None
        if kind is OutputKind.FINAL:
            completions = [self._completion(s, False, parent.lora_request) for s in seqs]
        else:
            # streamed (DELTA, CUMULATIVE): a sequence whose finish went out is in no later output, as vLLM's
            # ParentRequest.get_outputs; DELTA also leaves out those with nothing new
            delta, completions = kind is OutputKind.DELTA, []
            for s in seqs:
                if s.finish_sent or (self.stream_interval > 1 and not self._due(s)):
                    continue
                c = self._completion(s, delta, parent.lora_request)
                if not delta or c.token_ids or c.text or c.finish_reason:
                    completions.append(c)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, self._prompt_logprobs(parent),
                             completions, finished, parent.metrics, parent.num_cached_tokens, parent.lora_request)

    @staticmethod
    def _prompt_logprobs(parent: _ParentRequest) -> list | None:
        """vLLM's: a DELTA request's prompt logprobs come once, in its first output, and the later outputs carry
        none ([]), so that the deltas add up to the whole; the other kinds carry them in every output."""
        if parent.kind is not OutputKind.DELTA or parent.prompt_logprobs is None:
            return parent.prompt_logprobs
        if parent.prompt_logprobs_sent:
            return parent.prompt_logprobs[:0]   # [] or an empty FlatLogprobs
        parent.prompt_logprobs_sent = True
        return parent.prompt_logprobs

    def _due(self, seq: _Sequence) -> bool:
        """Whether the sequence's new tokens go out now: always with stream_interval 1; else its first token
        (time to first token is not delayed), every stream_interval tokens, and its finish."""
        return not seq.finish_sent and (seq.finish_reason is not None or seq.num_sent_tokens == 0
                                         or len(seq.token_ids) - seq.num_sent_tokens >= self.stream_interval)

    def _best_of_output(self, parent: _ParentRequest, finished: bool) -> RequestOutput | None:
        """best_of > n: once all have finished, the n of highest cumulative logprob, best first, as indexes
        0..n-1 (which are best is known only at the end, so this comes once, whatever the output kind).
        A failed request returns its first n: every one ends with "error"."""
        if not finished:
            return None
        seqs = parent.seqs
        if not any(s.finish_reason == "error" for s in seqs):
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)
        seqs = seqs[:parent.num_returned]
        completions = [self._completion(s, False, parent.lora_request) for s in seqs]
        for i, c in enumerate(completions):
            c.index = i
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, parent.prompt_logprobs,
                             completions, True, parent.metrics, parent.num_cached_tokens, parent.lora_request)

    def _completion(self, seq: _Sequence, delta: bool, lora_request: LoRARequest | None) -> CompletionOutput:
        finished = seq.finish_reason is not None
        text = seq.detokenizer.get_next_output_text(finished, delta)
        start = seq.num_sent_tokens if delta else 0
        seq.num_sent_tokens = len(seq.token_ids)
        seq.finish_sent = finished
        # a copy (FlatLogprobs: of its flat lists), so that an output handed out does not grow with later tokens
        logprobs = seq.logprobs[start:] if seq.logprobs is not None else None
        return CompletionOutput(seq.index, text, seq.token_ids[start:], seq.cumulative_logprob, logprobs,
                                seq.finish_reason, seq.stop_reason, lora_request=lora_request)


def _record_latencies(arrival_time: float, seq: _Sequence, out: EngineCoreOutput, now: float, stats: StepStats):
    """Before the sequence is updated: its time to first token, or the gap since its last token (each of n
    sequences counts, as vLLM's child requests do)."""
    if not out.new_token_ids:
        return
    if seq.first_token_time is None:
        stats.time_to_first_tokens.append(now - arrival_time)
    else:
        stats.inter_token_latencies.append(now - seq.last_token_time)


def _record_finished(parent: _ParentRequest, finished: bool, now: float, stats: StepStats):
    """A FinishedRequestStats for each sequence that ended in this step; the request's n and its longest
    sequence's tokens once it has all ended (vLLM's request_params_n, request_max_num_generation_tokens)."""
    for s in parent.seqs:
        if s.finish_reason is not None and not s.stats_recorded:
            s.stats_recorded = True
            stats.finished.append(_sequence_stats(parent, s, now))
    if finished:
        stats.params_n.append(parent.params.n)
        stats.max_num_generation_tokens.append(max(len(s.token_ids) for s in parent.seqs))


def _sequence_stats(parent: _ParentRequest, seq: _Sequence, now: float) -> FinishedRequestStats:
    num_tokens = len(seq.token_ids)
    stats = FinishedRequestStats(seq.finish_reason, now - parent.metrics.arrival_time, len(parent.prompt_token_ids),
                                 num_tokens, max_tokens=parent.params.max_tokens,
                                 num_cached_tokens=seq.num_cached_tokens)
    if seq.queue_time is None:   # never scheduled: every phase 0 (FinishedRequestStats)
        return stats
    scheduled = parent.metrics.arrival_time + seq.queue_time
    # no token (it failed in its prefill): its end is its first and last output, as vLLM's first output is
    first = seq.first_token_time if seq.first_token_time is not None else now
    last = seq.last_token_time if seq.last_token_time is not None else now
    stats.queued_time = seq.queue_time
    stats.prefill_time, stats.decode_time, stats.inference_time = first - scheduled, last - first, last - scheduled
    if num_tokens > 1:   # vLLM's: the first token is the prefill's; 0 below 2 tokens
        stats.mean_time_per_output_token = stats.decode_time / (num_tokens - 1)
    return stats
