"""A differential fuzz of the engine: random engine configurations (small KV caches that preempt, chunked prefill,
prefix caching, swap and offload, CPU tier, speculative decoding, LoRA, fp8 KV and weights, two tensor-parallel
ranks) run random request mixes (shared prefixes, n > 1, best_of, seeds, top-k / top-p / min-p, stop ids and
strings, logprobs (top-N or named ids) and prompt logprobs, min_tokens, truncated prompts, penalties, logit bias,
bad words, allowed ids, choice / regex / JSON constraints; or a beam search), added at once or step by step with
some aborted, and every request's output must equal that of a plain engine (a cache that never preempts, no
chunking, no prefix cache, no speculation, one rank; the same LoRA and fp8 settings) on the same requests.
Float32 on CPU, tiny random models whose logits have clear margins.

    python tests/e2e/engine_fuzz.py --trials 200 [--seed 0]       (a long run; tests/e2e/test_engine_fuzz.py
                                                                   runs a few trials in the suite)
"""
import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.beam_search import BeamSearchParams
from pagedllm.engine.output_processor import OutputKind

LOGPROB_TOL = 1e-4
MAX_LEN = 512


@dataclasses.dataclass
class Trial:
    config: dict
    prompts: list[list[int]]
    params: list[SamplingParams]
    loras: list[str | None]       # adapter name a request, or None (the base)
    arrivals: list[int] | None = None   # the step each request is added at (None: all at once, LLM.generate)
    aborts: dict[int, int] = dataclasses.field(default_factory=dict)   # request -> the step it is aborted at
    beam: BeamSearchParams | None = None   # LLM.beam_search of the prompts instead of generate
    stream_interval: int = 1   # --async: its config's (the server's --stream-interval)
    priorities: list[int] | None = None   # scheduling_policy priority: each request's (the reference: fcfs)


def random_trial(rng: np.random.Generator, models: dict) -> Trial:
    """One configuration and a request mix. models: {"base", "other" (a draft of another model), "loras":
    {name: LoRARequest}} for the base model."""
    spec = rng.choice(["none", "none", "ngram", "draft_self", "draft_other"])
    lora = bool(models.get("loras")) and spec == "none" and rng.random() < 0.35
    block_size = int(rng.choice([4, 8, 16]))
    mode = str(rng.choice(["recompute", "recompute", "swap", "offload"]))
    config = dict(block_size=block_size, max_num_seqs=int(rng.choice([2, 3, 8, 32])),
                  enable_prefix_caching=bool(rng.random() < 0.7), preemption_mode=mode)
    if rng.random() < 0.6:
        config["max_num_batched_tokens"] = int(rng.choice([16, 24, 48, 100]))
    if rng.random() < 0.25:   # the queues in (priority, arrival) order: other admissions and victims
        config["scheduling_policy"] = "priority"
    if mode == "offload":   # the disk tier is written through the CPU tier
        config["kv_disk_dir"] = "<tmp>"
    if mode == "offload" or rng.random() < 0.3:
        config["kv_offloading_size"] = 0.01
    if spec == "ngram":
        config["speculative_config"] = {"method": "ngram", "num_speculative_tokens": int(rng.integers(1, 5)),
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    elif spec.startswith("draft"):
        config["speculative_config"] = {"method": "draft_model", "num_speculative_tokens": int(rng.integers(1, 5)),
                                        "model": models["base"] if spec == "draft_self" else models["other"]}
    if lora:
        config.update(enable_lora=True, max_loras=int(rng.integers(1, 3)), max_lora_rank=16)
    if rng.random() < 0.2:
        config["kv_cache_dtype"] = "fp8"
    if not lora and rng.random() < 0.15:
        config["quantization"] = "fp8"
    if (spec == "none" and not lora and "quantization" not in config and "kv_offloading_size" not in config
            and mode == "recompute" and rng.random() < 0.6):
        config["tensor_parallel_size"] = 2   # two worker processes (gloo); the plain engine is unsplit

    num = int(rng.integers(1, 13))
    shared = [rng.integers(3, 512, size=int(rng.integers(8, 60))).tolist() for _ in range(2)]
    prompts, params, loras = [], [], []
    for _ in range(num):
        tail = rng.integers(3, 512, size=int(rng.integers(1, 40))).tolist()
        prompt = (shared[int(rng.integers(2))] + tail) if rng.random() < 0.5 else \
            rng.integers(3, 512, size=int(rng.integers(1, 150))).tolist()
        prompts.append(prompt)
        kw = dict(max_tokens=int(rng.integers(1, 40)), logprobs=int(rng.choice([0, 0, 2, 20])))
        if rng.random() < 0.3:
            kw["ignore_eos"] = True
        if rng.random() < 0.2:
            kw["stop_token_ids"] = rng.integers(3, 512, size=3).tolist()
        if rng.random() < 0.15:
            kw["min_tokens"] = min(kw["max_tokens"], int(rng.integers(1, 10)))
        if rng.random() < 0.15:
            kw["prompt_logprobs"] = int(rng.choice([0, 3]))
        if rng.random() < 0.1:   # named ids' logprobs instead of the top-N
            kw["logprobs"], kw["logprob_token_ids"] = None, rng.integers(0, 512, size=int(rng.integers(1, 40))).tolist()
        if rng.random() < 0.3:   # the fields that make a row's own logits processors
            extra = rng.choice(["presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                                "bad_words", "allowed_token_ids", "stop", "structured"])
            if extra in ("presence_penalty", "frequency_penalty"):
                kw[extra] = float(rng.choice([-1.0, 0.5, 1.5]))
            elif extra == "repetition_penalty":
                kw[extra] = float(rng.choice([0.7, 1.3]))
            elif extra == "logit_bias":
                kw[extra] = {int(t): float(rng.choice([-5.0, 3.0])) for t in rng.integers(3, 512, size=4)}
            elif extra == "bad_words":
                kw[extra] = ["the", "and a"]
            elif extra == "allowed_token_ids":
                kw[extra] = rng.integers(3, 512, size=30).tolist()
            elif extra == "stop":
                kw[extra] = ["e", " the"]
                kw["include_stop_str_in_output"] = bool(rng.random() < 0.5)
            else:
                kw["structured_outputs"] = [
                    {"choice": ["yes", "no", "maybe so"]}, {"regex": "[a-z]{2,8}( [a-z]{1,6}){0,3}"},
                    {"json": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
                              "required": ["a", "b"]}, "disable_any_whitespace": True}][int(rng.integers(3))]
                if rng.random() < 0.3:   # free text until this token (a reasoning parser's </think>)
                    kw["reasoning_end_token_id"] = int(rng.integers(259, 512))
                    if rng.random() < 0.5:   # forced after this many tokens
                        kw["thinking_token_budget"] = int(rng.integers(0, 8))
                        if rng.random() < 0.5:   # of the block this token opens (in the prompt or the output)
                            kw["reasoning_start_token_id"] = int(rng.integers(259, 512))
        if rng.random() < 0.1:
            kw["truncate_prompt_tokens"] = int(rng.integers(1, 30))
            kw["truncation_side"] = str(rng.choice(["left", "right"]))
        if rng.random() < 0.1:   # ends the request where its output repeats (tiny random models often do)
            kw["repetition_detection"] = {"max_pattern_size": int(rng.integers(1, 4)),
                                          "min_count": int(rng.integers(2, 4))}
        if rng.random() < 0.1:
            kw["skip_special_tokens"] = False
        elif "stop" not in kw and rng.random() < 0.05:
            kw["detokenize"] = False
        if rng.random() < 0.35:   # seeded sampling: the same tokens with speculation or without, in any batch
            kw.update(temperature=0.8, top_p=float(rng.choice([1.0, 0.9])), seed=int(rng.integers(1 << 30)),
                      top_k=int(rng.choice([0, 0, 5, 50])), min_p=float(rng.choice([0.0, 0.0, 0.05])),
                      n=min(int(rng.choice([1, 2, 3])), config["max_num_seqs"]))
            if kw["n"] < config["max_num_seqs"] and rng.random() < 0.2:
                kw["best_of"] = kw["n"] + 1
        else:
            kw.update(temperature=0.0, n=min(int(rng.choice([1, 1, 1, 2])), config["max_num_seqs"]))
        params.append(SamplingParams(**kw))
        names = [None, *models["loras"]]
        loras.append(names[int(rng.integers(len(names)))] if lora else None)
    config["max_model_len"] = MAX_LEN
    if rng.random() < 0.25:   # requests end at the model's length, speculation's lookahead runs into it
        config["max_model_len"] = int(rng.choice([48, 80, 128]))
        prompts = [p[:config["max_model_len"] - 1 - int(rng.integers(0, 8))] for p in prompts]
        for i, (p, sp) in enumerate(zip(prompts, params)):   # prompt + max_tokens past the limit is refused
            room = config["max_model_len"] - len(p)
            if sp.max_tokens > room:   # unset: up to the limit
                cut = None if rng.random() < 0.5 else room
                params[i] = dataclasses.replace(sp, max_tokens=cut, min_tokens=min(sp.min_tokens, room))
    # the cache: 1-3 of the longest request's blocks beyond its need (preempts), or plenty
    need = max(-(-(min(len(p) + (s.max_tokens or MAX_LEN), config["max_model_len"]) + 8) // block_size)
               for p, s in zip(prompts, params))
    n_max = max(s.n for s in params)
    if rng.random() < 0.6:
        config["num_gpu_blocks_override"] = need * n_max + int(rng.integers(1, 4))
    trial = Trial(config, prompts, params, loras)
    if spec == "none" and not lora and rng.random() < 0.3:   # beams fork blocks (copy-on-write) every step
        width = int(rng.integers(1, 5))
        room = config["max_model_len"] - max(len(p) for p in prompts)
        trial.beam = BeamSearchParams(beam_width=width, max_tokens=min(int(rng.integers(1, 20)), room),
                                      ignore_eos=bool(rng.random() < 0.3),
                                      length_penalty=float(rng.choice([1.0, 0.0, 2.0])))
        if "num_gpu_blocks_override" in config:   # room for every beam's own last block, and forks
            need = max(-(-(len(p) + trial.beam.max_tokens + 8) // block_size) for p in prompts)
            config["num_gpu_blocks_override"] = need * (width + 1) + int(rng.integers(1, 4))
        return trial
    if config.get("scheduling_policy") == "priority":
        trial.priorities = rng.integers(-2, 3, size=num).tolist()
    if rng.random() < 0.5:   # requests come while others run, and some leave early
        trial.arrivals = [int(rng.integers(0, 12)) for _ in prompts]
        trial.aborts = {i: trial.arrivals[i] + int(rng.integers(0, 10)) for i in range(num) if rng.random() < 0.2}
        trial.stream_interval = int(rng.choice([1, 1, 3]))
    return trial


def run(model: str, trial: Trial, config: dict, models: dict, staggered: bool = False):
    """Each request's output (None: aborted before it finished) and the engine's stats at the end."""
    llm = LLM(model, dtype="float32", log_stats_interval=0, **config)
    lora = [models["loras"][n] if n else None for n in trial.loras] if config.get("enable_lora") else None
    priority = _priorities(trial, config)
    try:
        if trial.beam is not None:
            return llm.beam_search(trial.prompts, trial.beam), llm.engine.get_stats()
        if staggered and trial.arrivals is not None:
            outs = _run_staggered(llm.engine, trial, lora or [None] * len(trial.prompts), priority)
        else:
            outs = llm.generate(trial.prompts, trial.params, use_tqdm=False, lora_request=lora, priority=priority)
        return outs, llm.engine.get_stats()
    finally:
        llm.engine.shutdown()   # a GPU's memory goes back before the next engine sizes its cache


def _priorities(trial: Trial, config: dict) -> list[int] | None:
    return trial.priorities if config.get("scheduling_policy") == "priority" else None


def _run_staggered(engine, trial: Trial, loras: list, priority: list[int] | None) -> list:
    """Requests added at their arrival steps, each streamed in one of the output kinds (DELTA: the pieces
    joined must be the whole), some aborted."""
    kinds = [_kind(i) for i in range(len(trial.prompts))]
    finished, joined, step = {}, {}, 0
    while step <= max(trial.arrivals) or engine.has_unfinished_requests():
        for i, at in enumerate(trial.arrivals):
            if at == step:
                engine.add_request(str(i), trial.prompts[i], trial.params[i], output_kind=kinds[i],
                                   lora_request=loras[i], priority=priority[i] if priority else 0)
        aborted = [str(i) for i, at in trial.aborts.items() if at == step and str(i) not in finished]
        if aborted:
            engine.abort_request(aborted)
        for out in engine.step():
            rid = out.request_id
            out = joined[rid] = _merge(joined.get(rid, out), out, kinds[int(rid)])
            if out.finished:
                finished[out.request_id] = out
        step += 1
    return [finished.get(str(i)) for i in range(len(trial.prompts))]


def run_async(model: str, trial: Trial, config: dict, models: dict):
    """The server's engine (AsyncLLM and its core process): each request a task that starts at its arrival
    (x 5 ms), streams in its output kind (every stream_interval tokens), and leaves (an abort) at its abort step
    (x 5 ms) if still running.
    A request the engine fails (an EngineGenerateError) counts as finish "error" on every sequence."""
    import asyncio

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM, EngineGenerateError
    from pagedllm.outputs import CompletionOutput, RequestOutput
    arrivals = trial.arrivals or [0] * len(trial.prompts)
    loras = [models["loras"][n] if n else None for n in trial.loras]
    priority = _priorities(trial, config) or [0] * len(trial.prompts)

    async def one(engine, i):
        await asyncio.sleep(arrivals[i] * 0.005)
        whole = None
        try:
            async for out in engine.generate(trial.prompts[i], trial.params[i], str(i), _kind(i),
                                             lora_request=loras[i], priority=priority[i]):
                whole = _merge(whole or out, out, _kind(i))
        except EngineGenerateError:
            n = trial.params[i].n
            return RequestOutput(str(i), None, trial.prompts[i], None,
                                 [CompletionOutput(j, "", [], finish_reason="error") for j in range(n)], True, None)
        return whole

    async def leave(task, i):
        await asyncio.sleep(trial.aborts[i] * 0.005)
        task.cancel()

    async def main():
        engine = AsyncLLM(EngineConfig(model, dtype="float32", log_stats_interval=0,
                                       stream_interval=trial.stream_interval, **config))
        try:
            tasks = [asyncio.ensure_future(one(engine, i)) for i in range(len(trial.prompts))]
            leaving = [asyncio.ensure_future(leave(tasks[i], i)) for i in trial.aborts]
            outs = [None if isinstance(r, BaseException) else r
                    for r in await asyncio.gather(*tasks, return_exceptions=True)]
            await asyncio.gather(*leaving)
            for _ in range(100):   # an abort reaches the core a moment after the task ends
                stats = await engine.get_stats()
                if stats.num_running == stats.num_waiting == 0:
                    break
                await asyncio.sleep(0.02)
            return outs, stats
        finally:
            engine.shutdown()
    return asyncio.run(main())


def _kind(i: int):
    """Request i's output kind in the step-by-step and async runs: FINAL, DELTA, CUMULATIVE in turn."""
    return (OutputKind.FINAL, OutputKind.DELTA, OutputKind.CUMULATIVE)[i % 3]


def _merge(whole, out, kind):
    """A streamed output onto the request's whole so far: DELTA's pieces joined; CUMULATIVE's sequences replaced
    by index (a sequence whose finish went out is in no later output, as vLLM's); FINAL's is the whole."""
    if kind is OutputKind.DELTA:
        return _join(whole, out)
    if kind is OutputKind.FINAL or whole is out:
        return out
    seqs = {c.index: c for c in whole.outputs} | {c.index: c for c in out.outputs}
    out.outputs = [seqs[i] for i in sorted(seqs)]
    return out


def _join(whole, delta):
    """Adds a DELTA output's pieces to the first output of its request (kept as the whole)."""
    if whole is delta:
        whole.outputs = [dataclasses.replace(c, token_ids=list(c.token_ids), logprobs=c.logprobs and list(c.logprobs))
                         for c in delta.outputs]
        return whole
    seqs = {c.index: c for c in whole.outputs}
    for c in delta.outputs:
        if c.index not in seqs:   # a sequence with nothing in the first output
            seqs[c.index] = dataclasses.replace(c, token_ids=[], text="", logprobs=None if c.logprobs is None else [])
            whole.outputs.append(seqs[c.index])
        w = seqs[c.index]
        w.text += c.text
        w.token_ids += c.token_ids
        if c.logprobs is not None:
            w.logprobs = (w.logprobs or []) + list(c.logprobs)
        w.finish_reason, w.stop_reason, w.cumulative_logprob = c.finish_reason, c.stop_reason, c.cumulative_logprob
    whole.outputs.sort(key=lambda c: c.index)
    whole.finished = delta.finished
    return whole


def compare(trial: Trial, got, ref) -> list[str]:
    """The differences, as text (empty: equal)."""
    if trial.beam is not None:
        return _compare_beams(got, ref)
    errors = []
    for i, (g, r) in enumerate(zip(got, ref)):
        if g is None:
            if i not in trial.aborts:
                errors.append(f"request {i}: no output")
            continue
        if len(g.outputs) != len(r.outputs):
            errors.append(f"request {i}: {len(g.outputs)} sequences, reference {len(r.outputs)}")
            continue
        if g.outputs[0].finish_reason == r.outputs[0].finish_reason == "error":
            continue   # failed in both (how far its siblings got before may differ)
        if g.prompt_token_ids != r.prompt_token_ids:   # truncate_prompt_tokens
            errors.append(f"request {i}: prompt ids {g.prompt_token_ids} != reference {r.prompt_token_ids}")
        if not 0 <= g.num_cached_tokens <= len(g.prompt_token_ids):
            errors.append(f"request {i}: {g.num_cached_tokens} cached tokens of a {len(g.prompt_token_ids)}-token "
                          f"prompt")
        # parallel greedy samples are identical; sampled ones come in order of their index
        for j, (a, b) in enumerate(zip(g.outputs, r.outputs)):
            where = f"request {i} seq {j} (lora {trial.loras[i]})"
            if a.token_ids != b.token_ids or a.text != b.text:
                errors.append(f"{where}: tokens {a.token_ids} != reference {b.token_ids}")
            elif a.finish_reason != b.finish_reason:
                errors.append(f"{where}: finish {a.finish_reason} != reference {b.finish_reason}")
            elif trial.params[i].logprobs is not None:
                for k, (pa, pb) in enumerate(zip(a.logprobs, b.logprobs)):
                    if not _same_position(pa, pb):
                        errors.append(f"{where}: logprobs differ at {k}: {pa} vs {pb}")
                        break
        if not _same_prompt_logprobs(g.prompt_logprobs, r.prompt_logprobs):
            errors.append(f"request {i}: prompt logprobs differ")
    return errors


def _sound(trial: Trial, got, ref) -> list[str]:
    """An fp8 run's check: every request not aborted answered, with as many sequences as the reference."""
    if trial.beam is not None:
        return []
    return [f"request {i}: {'no output' if g is None else 'sequences missing'}"
            for i, (g, r) in enumerate(zip(got, ref))
            if (g is None and i not in trial.aborts) or (g is not None and len(g.outputs) != len(r.outputs))]


def _compare_beams(got, ref) -> list[str]:
    errors = []
    for i, (g, r) in enumerate(zip(got, ref)):
        a = [(s.tokens, s.finish_reason, s.text) for s in g.sequences]
        b = [(s.tokens, s.finish_reason, s.text) for s in r.sequences]
        if a != b:
            errors.append(f"prompt {i}: beams {a} != reference {b}")
        elif any(abs(x.cum_logprob - y.cum_logprob) > LOGPROB_TOL for x, y in zip(g.sequences, r.sequences)):
            errors.append(f"prompt {i}: beam logprobs differ")
    return errors


def _same_position(x: dict, y: dict) -> bool:
    """One position's {token: Logprob}: the same tokens with finite logprobs, within the tolerance, and as many
    entries. Tokens at -inf (masked by a constraint) tie: which of them fill the top-N is arbitrary."""
    finite = {t for t, lp in x.items() if lp.logprob > float("-inf")}
    return (len(x) == len(y) and finite == {t for t, lp in y.items() if lp.logprob > float("-inf")}
            and all(abs(x[t].logprob - y[t].logprob) <= LOGPROB_TOL for t in finite))


def _same_prompt_logprobs(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and _same_position(x, y)) for x, y in zip(a, b))


def check_trial(trial: Trial, models: dict, tmp: Path, device: str = "cpu", use_async: bool = False
                ) -> tuple[list[str], dict]:
    """device cuda: both engines there, each with a small fixed KV cache (the GPU is shared); the one under test
    with CUDA graphs and cascade attention, the plain one eager and without.
    use_async: the engine under test is the server's (run_async)."""
    config = dict(trial.config, device=device)
    if device != "cpu" and "num_gpu_blocks_override" not in config:
        config["kv_cache_memory"] = 64 << 20
    if device != "cpu" and config.get("tensor_parallel_size", 1) > torch.cuda.device_count():
        del config["tensor_parallel_size"]   # one GPU: the trial runs unsplit
    if config.get("kv_disk_dir") == "<tmp>":
        config["kv_disk_dir"] = str(tmp / f"disk{time.monotonic_ns()}")
    if use_async and trial.beam is None:
        got, stats = run_async(models["base"], trial, config, models)
    else:
        got, stats = run(models["base"], trial, config, models, staggered=True)
    plain = {k: v for k, v in config.items()   # what changes the numbers stays
             if k in ("enable_lora", "max_loras", "max_lora_rank", "kv_cache_dtype", "quantization", "device",
                      "max_model_len")}
    if device != "cpu":   # the plain engine also runs eager and reads each row's whole context itself
        plain.update(kv_cache_memory=64 << 20, enforce_eager=True, disable_cascade_attn=True)
    ref, _ = run(models["base"], trial, {**plain, "enable_prefix_caching": False, "max_num_seqs": 64}, models)
    # fp8 (weights or KV) quantizes values that differ by a float32 ulp between batchings (MKL's GEMMs round
    # by M): a flipped fp8 rounding moves logprobs by ~1e-3 and can change a token. There only the run's
    # soundness is checked: every request answered, n sequences each, no block left.
    fp8 = config.get("quantization") == "fp8" or config.get("kv_cache_dtype", "auto") != "auto"
    errors = _sound(trial, got, ref) if fp8 else compare(trial, got, ref)
    if stats.num_blocks_free != stats.num_blocks_total:
        errors.append(f"blocks leaked: {stats.num_blocks_total - stats.num_blocks_free}")
    info = {"preemptions": stats.num_preemptions, "prefix_hits": stats.prefix_cache_hits,
            "staggered": trial.arrivals is not None, "aborted": len(trial.aborts), "beam": trial.beam is not None}
    return errors, info


def make_models(root: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import make_tiny_model
    from test_lora import make_adapter

    from pagedllm.lora.request import LoRARequest
    base = make_tiny_model(root / "base", arch="qwen3", seed=3)
    other = make_tiny_model(root / "other", arch="llama", seed=0)
    loras = {"a": LoRARequest("a", 1, make_adapter(base, root / "a", 0, r=8, lora_alpha=16,
                                                   target_modules=["q_proj", "v_proj", "down_proj"])),
             "b": LoRARequest("b", 2, make_adapter(base, root / "b", 1, r=4, lora_alpha=8,
                                                   target_modules=["o_proj", "gate_proj", "up_proj", "k_proj"]))}
    return {"base": base, "other": other, "loras": loras}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="each failing request's params in full")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--async", dest="use_async", action="store_true",
                        help="the engine under test is the server's AsyncLLM with its core process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        models = make_models(Path(d))
        failed = 0
        for t in range(args.seed, args.seed + args.trials):
            trial = random_trial(np.random.default_rng(t), models)
            start = time.perf_counter()
            errors, info = check_trial(trial, models, Path(d), args.device, args.use_async)
            print(f"trial {t}: {'FAIL' if errors else 'ok'} {time.perf_counter() - start:.1f} s {info} "
                  f"{trial.config}", flush=True)
            for e in errors[:5]:
                print("   ", e if args.verbose else e[:400], flush=True)
            if errors and args.verbose:
                for i, (p, s) in enumerate(zip(trial.prompts, trial.params)):
                    print(f"    request {i}: prompt of {len(p)}, {s}", flush=True)
            failed += bool(errors)
        print(f"{failed} of {args.trials} trials failed")


if __name__ == "__main__":
    main()
