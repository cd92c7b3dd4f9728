"""LLM: the offline, batch entry point."""
import contextlib
import dataclasses
import functools
import gc
import itertools
import numbers
import time

from tqdm.auto import tqdm

from pagedllm.beam_search import (BeamSearchInstance, BeamSearchOutput, BeamSearchParams, beam_cache_salt,
                                  check_length, finish_text, run_beam_search, step_sampling_params, tokens_input,
                                  unshared_blocks)
from pagedllm.chat_template import render_chat
from pagedllm.chat_template_arg import read_chat_template
from pagedllm.config import DEMO_MODEL
from pagedllm.engine.engine import Engine, reset_answer
from pagedllm.engine.engine_args import ASYNC_LLM_ARGS, EngineArgs, async_llm_kwargs, engine_config
from pagedllm.engine.input_processor import check_prompt_type, prompt_cache_salt, prompt_value
from pagedllm.engine.output_processor import OutputKind
from pagedllm.engine.tokenization_kwargs import apply_tokenization_kwargs, check_tokenization_kwargs, encoded
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.vllm_names import LLM_NAMES, not_built, refusing

# A prompt: text, token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str = DEMO_MODEL, *, chat_template: str | None = None, **engine_args):
        """engine_args: EngineConfig's fields, or vLLM's LLM arguments (vllm_flags.py: each is taken with vLLM's
        meaning or refused naming it and why). No statistics log lines unless asked for, as vLLM's LLM
        (disable_log_stats=True). chat_template (a file or the text, as --chat-template): chat()'s template
        where a call gives none, over the tokenizer's. stream_interval (a field, as vLLM's EngineArgs'): llm_engine's
        streamed (DELTA, CUMULATIVE) outputs every this many tokens. enable_log_requests (AsyncEngineArgs', so
        `LLM(**dataclasses.asdict(AsyncEngineArgs(...)))` works): an info line per request added and aborted."""
        self.chat_template = read_chat_template(chat_template, "chat_template")
        own = async_llm_kwargs({k: engine_args.pop(k, None) for k in ASYNC_LLM_ARGS})
        self.engine = Engine(engine_config(model, {"disable_log_stats": True, **engine_args}), **own)
        self._ids = itertools.count()
        self._queued: dict[str, None] = {}             # enqueue()'s requests (ordered), until wait_for_completion()
        self._done: dict[str, RequestOutput] = {}      # those of them that finished in another call's run

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLM":
        """vLLM's: the LLM of an EngineArgs (or AsyncEngineArgs), every argument as LLM(...) takes it (so
        `LLM(**dataclasses.asdict(engine_args))`)."""
        if not isinstance(engine_args, EngineArgs):
            raise TypeError(f"LLM.from_engine_args() takes an EngineArgs or AsyncEngineArgs, got "
                            f"{type(engine_args).__name__}")
        return cls(**{f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)})

    def shutdown(self):
        """Stops the tensor-parallel worker processes (they also end with this process)."""
        self.engine.shutdown()

    @property
    def llm_engine(self):
        """vLLM's name of the engine: llm.llm_engine.get_tokenizer(), add_request(), step(), ...; one vLLM's
        LLMEngine has and pagedllm's lacks is an AttributeError saying what instead (vllm_names.py)."""
        return self.engine

    @property
    def model_config(self):
        """vLLM's LLM.model_config, its engine's (engine/vllm_config.py)."""
        return self.engine.model_config

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_world_size(self, include_dp: bool = True) -> int:
        """vLLM's: the ranks the model runs on. No pipeline or data parallelism is built, so tensor_parallel_size
        with include_dp or without."""
        return self.engine.config.tensor_parallel_size

    def reset_mm_cache(self) -> None:
        """vLLM's: clears the multimodal processor cache. Multimodal inputs are not built: there is none to clear."""

    def apply_model(self, func):
        """vLLM's: func(model) on each rank's model, their results in a list. At tensor_parallel_size 1 the one
        model is this process's; ranks in other processes are not reached (a NotImplementedError saying so)."""
        if self.engine.config.tensor_parallel_size != 1:
            raise not_built("LLM", "apply_model")
        return [func(self.engine.runner.model)]

    def get_default_sampling_params(self) -> SamplingParams:
        """What sampling_params=None means: SamplingParams' defaults, overridden by the generation config's
        (engine argument generation_config)."""
        return SamplingParams(**self.engine.default_sampling_params)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None, priority: list[int] | None = None,
                 tokenization_kwargs: dict | None = None,
                 mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """lora_request: a LoRARequest for every prompt, or a list of one (or None: the base) per prompt.
        priority: one per prompt, lower first (needs scheduling_policy="priority"; vLLM's).
        use_tqdm: a progress bar, or a tqdm factory that makes it (vLLM's: functools.partial(tqdm, leave=False)).
        tokenization_kwargs: vLLM's overrides of tokenizer.encode: add_special_tokens, truncate_prompt_tokens,
        truncation_side, truncation and max_length (other keys are refused). mm_processor_kwargs, the multimodal
        processor's: None or {}.
        Runs every prompt to completion; outputs come back in input order. A request the engine core
        fails (its own data raised there, or its step did; the log says why) comes back with
        finish_reason "error" on its sequences, and the others as if it had not been there."""
        _check_overrides(tokenization_kwargs, mm_processor_kwargs)
        ids = self._add(prompts, sampling_params, lora_request, priority, tokenization_kwargs=tokenization_kwargs)
        try:
            finished = self._run(len(ids) + self._num_queued_running(), use_tqdm)
        except BaseException:   # e.g. Ctrl-C: leave no request of this batch running in the engine
            self.engine.abort_request(ids)
            raise
        return [finished[i] for i in ids]

    def enqueue(self, prompts: Prompt | list[Prompt],
                sampling_params: SamplingParams | list[SamplingParams] | None = None, lora_request=None,
                priority: list[int] | None = None, use_tqdm: bool = True, tokenization_kwargs: dict | None = None,
                mm_processor_kwargs: dict | None = None) -> list[str]:
        """vLLM's: adds the prompts (as generate() takes them) to the engine without running it; returns their
        request ids. wait_for_completion() runs them; a generate() before that runs them too (their outputs
        wait). use_tqdm: a bar of the requests added (vLLM's); the overrides as generate()'s."""
        _check_overrides(tokenization_kwargs, mm_processor_kwargs)
        ids = self._add(prompts, sampling_params, lora_request, priority, use_tqdm, tokenization_kwargs)
        self._queued.update(dict.fromkeys(ids))
        return ids

    def wait_for_completion(self, output_type: type | tuple[type, ...] | None = None, *,
                            use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every enqueued request to completion; their outputs in the order they were enqueued.
        output_type: vLLM's check of the outputs' class; every output here is a RequestOutput (no pooling
        models), so one it is not refuses the call."""
        types = output_type if isinstance(output_type, tuple) else (output_type,)
        if output_type is not None and not (all(isinstance(t, type) for t in types)
                                            and issubclass(RequestOutput, types)):
            raise TypeError(f"output_type must be RequestOutput (or a tuple holding it): every output here is one, "
                            f"got {output_type!r} (use_tqdm is keyword-only, as vLLM's)")
        running = self._num_queued_running()
        if running:
            self._run(running, use_tqdm)
        queued, self._queued = self._queued, {}
        return [self._done.pop(i) for i in queued]   # _run put each there

    def _num_queued_running(self) -> int:
        return sum(i not in self._done for i in self._queued)

    def _add(self, prompts, sampling_params, lora_request, priority, use_tqdm=False,
             tokenization_kwargs: dict | None = None) -> list[str]:
        """Adds requests to the engine, all or none; their ids. use_tqdm: a bar of the requests added."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = _params_per_prompt(sampling_params, len(prompts))
        prompts, params = apply_tokenization_kwargs(tokenization_kwargs, prompts, params, self.engine.tokenizer)
        loras = _loras_per_prompt(lora_request, len(prompts))
        if priority is not None and not isinstance(priority, (list, tuple)):
            raise TypeError(f"priority must be a list of integers, one per prompt, got {type(priority).__name__}")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts: give one per prompt")
        priorities = priority or [0] * len(prompts)
        _add_loras(self.engine, loras)   # a bad adapter is a ValueError before anything is queued
        ids = []
        bar = _progress_bar(use_tqdm, len(prompts), "Adding requests")
        try:
            for prompt, p, lora, prio in zip(prompts, params, loras, priorities):
                ids.append(str(next(self._ids)))
                self.engine.add_request(ids[-1], prompt, p, output_kind=OutputKind.FINAL, lora_request=lora,
                                        priority=prio)
                bar.update(1)
        except BaseException:   # all or nothing, a Ctrl-C too: no half-added batch left in the engine
            self.engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return ids

    def beam_search(self, prompts: Prompt | list[Prompt], params: BeamSearchParams, lora_request=None,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search, with transformers' selection rules (pagedllm/beam_search.py). Each step
        runs every live beam of every prompt as one batch of 1-token requests; each forks the request of the
        beam it extends copy-on-write (held until the step's requests are added), so nothing is recomputed.
        lora_request: as generate()'s, one or one per prompt; use_tqdm: a bar of the steps (vLLM's).
        concurrency_limit: the most prompts searched at once (vLLM's): the prompts go in groups of that many, one
        group after the other; None: all at once.
        `self.last_beam_search_blocks`: (peak KV blocks in use, peak blocks without sharing); the
        engine's peak KV figures (get_stats) restart at each call."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if concurrency_limit is not None and (type(concurrency_limit) is not int or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be an integer >= 1 or None, got {concurrency_limit!r}")
        engine = self.engine
        loras = _loras_per_prompt(lora_request, len(_as_prompt_list(prompts)))
        _add_loras(engine, loras)   # a bad adapter is a ValueError before anything runs
        eos = engine.input_processor.eos_token_ids
        step_params = step_sampling_params(params, len(eos), engine.input_processor.max_logprobs)
        instances, user_salts = [], []
        for prompt in _as_prompt_list(prompts):
            check_prompt_type(prompt)
            value = prompt_value(prompt)
            if isinstance(value, str) and engine.tokenizer is None:
                raise ValueError("prompt must be token ids when skip_tokenizer_init is set, got text")
            ids = engine.tokenizer.encode(value) if isinstance(value, str) else list(value)
            check_length(len(ids), params, engine.max_model_len, engine.input_processor.max_kv_tokens)
            text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
            salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
            instances.append(BeamSearchInstance(ids, params, eos, tokens_input(ids, text, salt)))
            user_salts.append(prompt_cache_salt(prompt))
        search_id = f"beam-{next(self._ids)}"
        # each prompt's beams: the search's own salt (prefix caching off), else the prompt's cache_salt (vLLM's)
        salt = beam_cache_salt(search_id, engine.config.enable_prefix_caching)
        salts = [salt or s for s in user_salts]
        engine.reset_peak_stats()
        unshared, held = 0, []

        limit = concurrency_limit or max(len(instances), 1)
        groups = [(start, instances[start:start + limit]) for start in range(0, len(instances), limit)]
        bar = _progress_bar(use_tqdm, params.max_tokens * len(groups), "Beam search")

        def expand(start: int, group: list[BeamSearchInstance], beam_prompts: list[list[int]],
                   parents: list[str | None], owners: list[int]):
            nonlocal unshared, held
            unshared = max(unshared, unshared_blocks(group, engine.config.block_size))
            positions, held = self._expand(beam_prompts, parents, [loras[start + i] for i in owners],
                                           [salts[start + i] for i in owners], step_params, search_id, held)
            bar.update(1)
            return positions, held
        try:
            for start, group in groups:
                run_beam_search(group, functools.partial(expand, start, group))
        finally:
            bar.close()
            engine.release_kv_holds(held)   # the last step's requests: no beam forks them
        self.last_beam_search_blocks = (engine.get_stats().peak_blocks, unshared)
        decode = engine.tokenizer.decode if engine.tokenizer is not None else (lambda ids: "")
        outputs = []
        for inst, lora in zip(instances, loras):
            seqs = inst.results()
            for s in seqs:
                s.text = finish_text(s, len(inst.prompt_token_ids), params, decode, with_prompt=True)
                s.lora_request = lora
            outputs.append(BeamSearchOutput(seqs))
        return outputs

    def _expand(self, beam_prompts: list[list[int]], parents: list[str | None], loras: list, salts: list,
                params: SamplingParams, search_id: str, held: list[str]):
        """One engine batch of 1-token requests, each held for the next step's forks: each beam prompt's top
        logprobs, and the request ids. `held`: the previous step's requests, released once their children
        (by `parents`) are added. loras, salts: each beam prompt's adapter and cache salt (its prompt's)."""
        ids = [f"{search_id}-{next(self._ids)}" for _ in beam_prompts]
        try:
            for rid, prompt, parent, lora, salt in zip(ids, beam_prompts, parents, loras, salts):
                self.engine.add_request(rid, prompt, params, output_kind=OutputKind.FINAL, cache_salt=salt,
                                        kv_parent=parent, hold_kv=True, lora_request=lora)
            self.engine.release_kv_holds(held)
            finished = self._run(len(ids), use_tqdm=False)
        except BaseException:
            self.engine.abort_request(ids)
            self.engine.release_kv_holds(held + ids)
            raise
        outs = [finished[i].outputs[0] for i in ids]
        bad = [o for o in outs if o.finish_reason == "error" or not o.logprobs]
        if bad:
            self.engine.release_kv_holds(ids)
            raise RuntimeError(f"beam search: an engine request failed ({bad[0].finish_reason})")
        return [o.logprobs[0] for o in outs], ids

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forget every cached prefix, in the GPU, CPU and disk tiers (False while requests hold blocks).
        vLLM's arguments: no request runs between this class's calls, so reset_running_requests (preempt the
        running ones first) has nothing to preempt, and one that does run (added through llm.engine) is refused
        rather than preempted; reset_connector: the CPU and disk tiers, this project's counterpart of vLLM's
        offloading connector, are always reset."""
        return reset_answer(self.engine.reset_prefix_cache(), reset_running_requests)

    def start_profile(self, profile_prefix: str | None = None) -> None:
        """vLLM's: the torch profiler of profiler_config (--profiler-config) starts, in this process (the model
        runs here) and in each tensor-parallel worker; without one, a RuntimeError naming --profiler-config.
        profile_prefix: the trace files' names start with it."""
        self.engine.start_profile(profile_prefix)

    def stop_profile(self) -> None:
        """The profiler stops: each rank's trace goes into torch_profiler_dir."""
        self.engine.stop_profile()

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request=None, chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             tokenization_kwargs: dict | None = None, mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of OpenAI messages: {"role", "content"}, tool_calls, tool_call_id) or a list of
        them, through the chat template (vLLM's options: continue_final_message continues the last message;
        chat_template_kwargs are extra template variables; tools are described to the model by the template;
        chat_template_content_format: a message's content as text, as a list of parts, or auto: chat_template.py).
        lora_request: as generate()'s, one or one per conversation (vLLM's, in the same place). The parameters
        are in vLLM 0.26's order, so a call passing them by position means the same as there."""
        prompts = self._chat_prompts(messages, chat_template, chat_template_content_format, add_generation_prompt,
                                     continue_final_message, tools, chat_template_kwargs, tokenization_kwargs,
                                     mm_processor_kwargs)
        return self.generate(prompts, sampling_params, use_tqdm, lora_request,
                             tokenization_kwargs=tokenization_kwargs)

    def enqueue_chat(self, messages: list[dict] | list[list[dict]],
                     sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
                     lora_request=None, priority: list[int] | None = None, chat_template: str | None = None,
                     chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
                     continue_final_message: bool = False, tools: list[dict] | None = None,
                     chat_template_kwargs: dict | None = None, tokenization_kwargs: dict | None = None,
                     mm_processor_kwargs: dict | None = None) -> list[str]:
        """vLLM's: chat()'s conversations added as enqueue() adds prompts (priority: one per conversation);
        their request ids, for wait_for_completion()."""
        prompts = self._chat_prompts(messages, chat_template, chat_template_content_format, add_generation_prompt,
                                     continue_final_message, tools, chat_template_kwargs, tokenization_kwargs,
                                     mm_processor_kwargs)
        return self.enqueue(prompts, sampling_params, lora_request, priority, use_tqdm, tokenization_kwargs)

    def _chat_prompts(self, messages, chat_template, content_format, add_generation_prompt, continue_final_message,
                      tools, chat_template_kwargs, tokenization_kwargs, mm_processor_kwargs) -> list[dict]:
        """Each conversation rendered: a TokensPrompt of its token ids and its text (a TextPrompt with
        tokenization_kwargs' add_special_tokens true)."""
        _check_overrides(tokenization_kwargs, mm_processor_kwargs)
        conversations = _conversations(messages)
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer: skip_tokenizer_init is set (use generate() on token ids)")
        chat_template = self.chat_template if chat_template is None else chat_template
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: pass chat_template=... (here or to LLM()) or "
                             "use generate()")
        prompts = [render_chat(tokenizer, c, chat_template, add_generation_prompt, continue_final_message,
                               chat_template_kwargs, tools, content_format=content_format)
                   for c in conversations]
        # The template already holds any BOS token: encoded without adding special tokens again, unless asked
        # (vLLM's; then as any text prompt). The rendered text is the outputs' prompt (vLLM's).
        if (tokenization_kwargs or {}).get("add_special_tokens"):
            return [{"prompt": p} for p in prompts]
        return [encoded(p, tokenizer, add_special_tokens=False) for p in prompts]

    def sleep(self, level: int = 1, mode: str = "abort"):
        """vLLM's; level 0 only: scheduling pauses until wake_up(). Requests enqueue()d meanwhile wait; mode says
        what becomes of those already enqueued: abort (they end, finish_reason "abort"), wait (those running run
        to their end now), keep (they stay, and go on once woken). Their outputs come from wait_for_completion().
        Levels 1 and 2 (the weights offloaded or discarded) are not built: refused naming the level."""
        self.engine.sleep(level, mode)

    def wake_up(self, tags: list[str] | None = None):
        """vLLM's: resumes scheduling (tags ["scheduling"], vLLM's for level 0, or any of its tags, or None)."""
        self.engine.wake_up(tags)

    def _run(self, total: int, use_tqdm) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = _progress_bar(use_tqdm, total, "Processed prompts")
        start, num_in, num_out = time.perf_counter(), 0, 0
        with _frozen_gc():
            while self.engine.has_unfinished_requests():
                if self.engine.held_by_pause():
                    # vLLM's LLM would step forever here: nothing runs until wake_up(), which this thread makes
                    raise RuntimeError("the engine is asleep (sleep(level=0)): its requests are not scheduled "
                                       "until wake_up(); call it first")
                for out in self.engine.step():
                    if not out.finished:
                        continue
                    finished[out.request_id] = out
                    if out.request_id in self._queued:   # enqueued: wait_for_completion() hands it out
                        self._done[out.request_id] = out
                    num_in += len(out.prompt_token_ids)
                    num_out += sum(len(c.token_ids) for c in out.outputs)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"input: {num_in / elapsed:.1f} toks/s, "
                                        f"output: {num_out / elapsed:.1f} toks/s")
                    bar.update(1)
        bar.close()
        return finished


@contextlib.contextmanager
def _frozen_gc():
    """The objects alive before a run (model, graphs, tokenizer, the caller's: ~220k for Qwen3-0.6B) out of
    the collector's view while it runs, back after it. A full collection walks them all (130-190 ms on this
    project's CPU machine); the likely cause of the one 325 ms step of a first W1 run on the H200, in which no
    kernel was built (the first full collection comes soon after start-up; the next waits for 25% more
    long-lived objects). Not for the whole process's life, as the server's engine core does: an engine deleted
    later must still be collected. Left alone when the caller has frozen objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_overrides(tokenization_kwargs: dict | None, mm_processor_kwargs: dict | None):
    """vLLM's tokenizer / processor overrides: tokenization_kwargs as tokenization_kwargs.py takes them;
    mm_processor_kwargs None or {} (its default), anything else refused."""
    check_tokenization_kwargs(tokenization_kwargs)
    if mm_processor_kwargs:
        raise ValueError(f"mm_processor_kwargs {sorted(mm_processor_kwargs)!r:.200} is not built here: multimodal "
                         f"inputs are not built")


def _no_pooling(name: str) -> ValueError:
    return ValueError(f"LLM.{name}() needs a pooling model (embedding, classification, scoring, reward), which "
                      f"pagedllm does not build: it runs generative models only (generate, chat, beam_search)")


# vLLM's pooling entry points: a generative model here has none of their tasks, as under vLLM (a ValueError)
for _name in ("encode", "embed", "classify", "score", "reward"):
    setattr(LLM, _name, refusing(_name, _no_pooling))
# vLLM's other LLM methods not built here: a NotImplementedError saying why and what instead
for _name in ("get_metrics", "collective_rpc", *LLM_NAMES):
    setattr(LLM, _name, refusing(_name, functools.partial(not_built, "LLM")))


def _conversations(messages) -> list[list[dict]]:
    """chat()'s messages as a list of conversations: one (a list of message dicts) or several; each message a
    dict with a string role."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of message dicts (one conversation) or a list of such lists, "
                        f"got {type(messages).__name__}")
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"messages: conversation {i} must be a non-empty list of message dicts, got "
                             f"{type(conversation).__name__ if conversation else 'an empty one'}")
        for j, m in enumerate(conversation):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages: message {j} of conversation {i} must be a dict with a string 'role', "
                                 f"got {m!r:.100}")
    return conversations


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, numbers.Integral) for t in prompts):
        return [prompts]   # one prompt of token ids
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, token ids, a dict or a list of those, got {type(prompts)}")
    return list(prompts)


def _params_per_prompt(params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
        got = type(params).__name__
        if isinstance(params, (list, tuple)):
            got += " holding " + ", ".join(sorted({type(p).__name__ for p in params}))
        raise TypeError(f"sampling_params must be a SamplingParams, a list of them (one per prompt) or None, "
                        f"got {got}")
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts: give one, or one per prompt")
    return list(params)


def _add_loras(engine, loras: list):
    """Loads each distinct adapter of a call once. Distinct by id, name and path, not by LoRARequest's equality
    (vLLM's, by name alone): two requests of one name under other ids or paths are each loaded and checked here,
    so a bad one is the caller's ValueError, not a request ending empty with finish_reason "error"."""
    distinct = {}
    for lora in loras:
        if lora is not None and not isinstance(lora, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest or None, got {type(lora).__name__}")
        if lora is not None:
            distinct.setdefault((lora.lora_int_id, lora.identity), lora)
    for lora in distinct.values():
        engine.add_lora(lora)


def _loras_per_prompt(lora_request, n: int) -> list:
    if not isinstance(lora_request, (list, tuple)):
        return [lora_request] * n
    if len(lora_request) != n:
        raise ValueError(f"lora_request has {len(lora_request)} entries for {n} prompts: give one, or one per prompt")
    return list(lora_request)


def _progress_bar(use_tqdm, total: int, desc: str):
    """use_tqdm: true / false, or a tqdm factory that makes the bar (vLLM's: functools.partial(tqdm, leave=False))."""
    return (use_tqdm if callable(use_tqdm) else tqdm)(total=total, desc=desc, disable=not use_tqdm,
                                                      dynamic_ncols=True)
