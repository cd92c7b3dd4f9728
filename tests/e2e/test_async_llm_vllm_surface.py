"""AsyncLLM's vLLM 0.26 surface beyond generate and abort (vllm/v1/engine/async_llm.py, EngineClient): what a
script ported from vLLM reads and calls, each either the engine's real value or a clear error saying why not."""
import asyncio
import time

import pytest
import torch

from pagedllm import SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM


def run(model_dir: str, body, **config):
    """body(engine) on a fresh engine (the core in its own process), shut down after."""
    async def main():
        engine = AsyncLLM(EngineConfig(model_dir, **{"num_gpu_blocks_override": 64, "max_model_len": 256,
                                                     "log_stats_interval": 0, "device": "cpu", **config}))
        try:
            await body(engine)
        finally:
            engine.shutdown()
    asyncio.run(main())


def test_vllm_config_and_model_config_are_views_of_what_the_core_runs(tiny_model_dirs):
    """vLLM's AsyncLLM.vllm_config and .model_config were AttributeErrors. The KV block count is the core
    process's (reported when ready), the batch limits the ones it chose; a value not kept is an AttributeError."""
    async def body(engine):
        vc = engine.vllm_config
        assert engine.model_config is vc.model_config
        mc = vc.model_config
        assert mc.model == tiny_model_dirs["llama"] and mc.max_model_len == 256 and mc.dtype is torch.float32
        assert mc.get_vocab_size() == 512 and mc.hf_config.num_hidden_layers == 2
        assert vc.cache_config.num_gpu_blocks == 64 and vc.cache_config.block_size == 8
        assert vc.scheduler_config.max_num_seqs == engine.config.max_num_seqs
        assert vc.scheduler_config.max_num_batched_tokens == engine.config.max_num_batched_tokens
        assert vc.parallel_config.world_size == 1
        assert vc.device_config.device == torch.device("cpu") and vc.load_config.load_format == "auto"
        assert vc.lora_config is None and vc.speculative_config is None   # off, as vLLM's
        with pytest.raises(AttributeError, match="trust_remote_code"):
            mc.trust_remote_code
    run(tiny_model_dirs["llama"], body, block_size=8, dtype="float32")


def test_vllm_config_lora_speculative_and_load_views_are_the_cores(tiny_model_dirs):
    """device_config, load_config, lora_config and speculative_config were AttributeErrors ("not built")."""
    async def speculating(engine):
        vc = engine.vllm_config
        assert vc.load_config.load_format == "dummy" and vc.device_config.device_type == "cpu"
        sc = vc.speculative_config
        assert (sc.method, sc.model, sc.num_speculative_tokens, sc.prompt_lookup_min, sc.prompt_lookup_max) == (
            "ngram", "ngram", 2, 3, 3)
        assert sc.draft_model_config is engine.model_config and vc.lora_config is None

    async def lora(engine):
        lc = engine.vllm_config.lora_config
        assert (lc.max_loras, lc.max_lora_rank, lc.max_cpu_loras, lc.lora_dtype) == (2, 8, 2, torch.float32)
        assert engine.vllm_config.speculative_config is None
    run(tiny_model_dirs["llama"], speculating, load_format="dummy",
        speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3})
    run(tiny_model_dirs["llama"], lora, enable_lora=True, max_loras=2, max_lora_rank=8)


def test_health_as_vllms_is_running_errored_check_health(tiny_model_dirs):
    """vLLM's is_running, is_stopped, errored, dead_error and check_health() were AttributeErrors: a healthy
    engine runs; after shutdown it is errored and check_health raises EngineDeadError saying why."""
    from pagedllm.engine.async_llm import EngineDeadError

    async def body(engine):
        await engine.check_health()
        assert engine.is_running and not engine.errored and not engine.is_stopped
        engine.shutdown()
        assert not engine.is_running and engine.errored and engine.is_stopped
        assert isinstance(engine.dead_error, EngineDeadError) and "shut down" in str(engine.dead_error)
        with pytest.raises(EngineDeadError, match="shut down"):
            await engine.check_health()
    run(tiny_model_dirs["llama"], body)


def test_get_tokenizer_and_get_supported_tasks_as_vllms(tiny_model_dirs):
    """vLLM's get_tokenizer() and get_supported_tasks() were AttributeErrors. With skip_tokenizer_init there is
    no tokenizer: a ValueError saying so, as vLLM's, not None to fail later."""
    async def body(engine):
        assert engine.get_tokenizer() is engine.tokenizer
        assert engine.get_tokenizer().encode("Once upon a time")
        assert await engine.get_supported_tasks() == ("generate",)

    async def no_tokenizer(engine):
        assert engine.tokenizer is None
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            engine.get_tokenizer()
    run(tiny_model_dirs["llama"], body)
    run(tiny_model_dirs["llama"], no_tokenizer, skip_tokenizer_init=True)


def test_reset_prefix_cache_as_vllms(tiny_model_dirs):
    """vLLM's `await engine.reset_prefix_cache()` was an AttributeError. It forgets the cached prefixes (the same
    prompt then hits nothing); while a request holds blocks it changes nothing and returns False, and asking it to
    preempt them (reset_running_requests) is a NotImplementedError saying why."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    prompt = list(range(3, 40))   # two full blocks of 16

    async def last(engine, rid):
        return [o async for o in engine.generate(prompt, params, rid)][-1]

    async def body(engine):
        assert (await last(engine, "a")).num_cached_tokens == 0
        assert (await last(engine, "b")).num_cached_tokens == 32
        assert await engine.reset_prefix_cache() is True
        assert (await last(engine, "c")).num_cached_tokens == 0
        engine.add_request("long", prompt, SamplingParams(max_tokens=200, ignore_eos=True))
        await engine.get_stats()   # the request is in the core
        assert await engine.reset_prefix_cache() is False
        with pytest.raises(NotImplementedError, match="reset_running_requests"):
            await engine.reset_prefix_cache(reset_running_requests=True)
        await engine.abort("long")
        assert await engine.reset_prefix_cache() is True
    run(tiny_model_dirs["llama"], body)


def test_shutdown_takes_vllms_timeout_and_may_be_called_again(tiny_model_dirs):
    """vLLM's shutdown(timeout=None) (its __del__ calls it again): shutdown(timeout=...) was a TypeError. The core
    process has exited when it returns, and a second call changes nothing."""
    async def body(engine):
        engine.shutdown(timeout=10)
        assert not engine.core.process.is_alive() and engine.errored
        engine.shutdown()
    run(tiny_model_dirs["llama"], body)


def test_generate_takes_vllms_keywords(tiny_model_dirs):
    """vLLM's generate(..., *, tokenization_kwargs, prompt_text, trace_headers, data_parallel_rank,
    reasoning_ended, reasoning_parser_kwargs) were TypeErrors (unexpected keyword). tokenization_kwargs act as
    LLM.generate's; prompt_text and trace_headers change nothing (as under vLLM for these prompts, and with no
    tracing); what asks for something not built (another data-parallel rank, reasoning state) is refused."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    async def last(engine, rid, prompt="Once upon a time", **kwargs):
        return [o async for o in engine.generate(prompt, params, rid, **kwargs)][-1]

    async def body(engine):
        plain = await last(engine, "a")
        assert plain.prompt_token_ids[0] == 1   # the tokenizer's BOS
        kept = await last(engine, "b", trace_headers={"traceparent": "00-1-2-01"}, prompt_text="other",
                          data_parallel_rank=0, lora_request=None, priority=0)
        assert kept.prompt == "Once upon a time" and kept.prompt_token_ids == plain.prompt_token_ids
        assert kept.outputs[0].token_ids == plain.outputs[0].token_ids
        no_bos = await last(engine, "c", tokenization_kwargs={"add_special_tokens": False})
        assert no_bos.prompt_token_ids == plain.prompt_token_ids[1:]
        cut = await last(engine, "d", list(range(3, 20)), tokenization_kwargs={"truncate_prompt_tokens": 4})
        assert cut.prompt_token_ids == list(range(16, 20))
        limited = await last(engine, "f", list(range(3, 20)), tokenization_kwargs={"max_length": 17})
        assert limited.prompt_token_ids == list(range(3, 20))
        async def chunks():
            yield "Once upon"
        with pytest.raises(NotImplementedError, match="streaming input"):   # was a TypeError about its type
            await last(engine, "s", chunks())
        for kwargs, error, words in [({"tokenization_kwargs": {"padding": True}}, ValueError, "padding"),
                                     ({"tokenization_kwargs": {"max_length": 2}}, ValueError,
                                      r"the prompt has \d+ tokens, more than max_length \(2\)"),
                                     ({"data_parallel_rank": 1}, ValueError, "data_parallel_rank 1"),
                                     ({"reasoning_ended": True}, NotImplementedError, "reasoning"),
                                     ({"reasoning_parser_kwargs": {}}, NotImplementedError, "reasoning")]:
            with pytest.raises(error, match=words):
                await last(engine, "e", **kwargs)
        assert not engine.output_processor.parents
    run(tiny_model_dirs["llama"], body)


def test_abort_and_lora_calls_take_vllms_argument_names(tiny_model_dirs):
    """vLLM's abort(request_id, internal=False), remove_lora(lora_id) and pin_lora(lora_id) called by keyword were
    TypeErrors (pagedllm named it lora_int_id). An unknown id's abort changes nothing, as vLLM's."""
    async def body(engine):
        stream = engine.add_request("a", [1, 5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
        await engine.abort(request_id="a", internal=False)
        assert [o async for o in stream][-1].outputs[0].finish_reason == "abort"
        await engine.abort("never-added")
        with pytest.raises(ValueError, match="enable_lora"):   # LoRA off here: the core's own answer
            await engine.remove_lora(lora_id=1)
        with pytest.raises(ValueError, match="enable_lora"):
            await engine.pin_lora(lora_id=1)
    run(tiny_model_dirs["llama"], body)


def test_from_engine_args_builds_the_engine_as_vllms(tiny_model_dirs, caplog):
    """vLLM's AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., ...)) was an AttributeError (and there was no
    AsyncEngineArgs). Its arguments are LLM(...)'s, vLLM's spellings included; stream_interval and
    enable_log_requests reach the AsyncLLM; a vLLM argument asking for what is not built is refused by name."""
    from pagedllm import AsyncEngineArgs

    args = AsyncEngineArgs(model=tiny_model_dirs["llama"], device="cpu", max_model_len=128,
                           num_gpu_blocks_override=32, kv_cache_memory_bytes=None, disable_log_stats=True,
                           stream_interval=3, enable_log_requests=True, trust_remote_code=False)

    async def main():
        engine = AsyncLLM.from_engine_args(args)
        try:
            assert engine.model_config.max_model_len == 128 and engine.config.log_stats_interval == 0
            assert engine.vllm_config.cache_config.num_gpu_blocks == 32
            assert engine.output_processor.stream_interval == 3
            params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
            with caplog.at_level("INFO", logger="pagedllm"):
                outs = [o async for o in engine.generate([1, 5, 6, 7], params, "r")]
            assert [len(o.outputs[0].token_ids) for o in outs] == [1, 4, 7]   # every 3 tokens, the first at once
            assert "Added request r." in caplog.text
        finally:
            engine.shutdown()
    asyncio.run(main())
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        AsyncLLM.from_engine_args(AsyncEngineArgs(tiny_model_dirs["llama"], pipeline_parallel_size=2))
    with pytest.raises(NotImplementedError, match="stat_loggers"):
        AsyncLLM.from_engine_args(args, stat_loggers=[object])


VLLM_NOT_BUILT = ["collective_rpc", "scale_elastic_ep", "wait_for_requests_to_drain",
                  "notify_kv_transfer_request_rejected", "init_weight_transfer_engine", "update_weights"]


def test_vllms_other_engine_client_methods_answer_or_say_why_not(tiny_model_dirs, caplog):
    """vLLM's other EngineClient methods were AttributeErrors. The ones with a true answer here give it (never
    asleep or paused, no tracing, no multimodal cache to reset, a statistics line now); encode() is a ValueError
    (no pooling model), as under vLLM for a generative one; the rest are NotImplementedErrors saying why."""
    async def body(engine):
        assert await engine.is_sleeping() is False and await engine.is_paused() is False
        assert await engine.is_tracing_enabled() is False
        await engine.reset_mm_cache()
        await engine.reset_encoder_cache()
        with caplog.at_level("INFO", logger="pagedllm"):
            await engine.do_log_stats()
        assert "KV blocks used 0/64" in caplog.text
        with pytest.raises(ValueError, match="pooling model"):
            engine.encode("a", None, "r")
        for name in VLLM_NOT_BUILT:
            with pytest.raises(NotImplementedError, match=rf"AsyncLLM\.{name}\(\), vLLM's: .* not built"):
                await getattr(engine, name)()
    run(tiny_model_dirs["llama"], body)


def test_delta_outputs_carry_the_prompt_logprobs_once_as_vllms(tiny_model_dirs):
    """vLLM's DELTA: the prompt logprobs come in the first output and later ones carry none ([]), so the deltas
    add up to the whole, as their token ids do. Every delta repeated them (a caller joining them got them n
    times); CUMULATIVE and FINAL_ONLY still carry them in each output."""
    from pagedllm.sampling_params import RequestOutputKind

    async def outputs(engine, rid, kind):
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=1, output_kind=kind)
        return [o async for o in engine.generate([1, 5, 6, 7, 8], params, rid)]

    async def body(engine):
        delta = await outputs(engine, "d", RequestOutputKind.DELTA)
        cumulative = await outputs(engine, "c", RequestOutputKind.CUMULATIVE)
        assert len(delta) == 4 and len(delta[0].prompt_logprobs) == 5
        assert [o.prompt_logprobs for o in delta[1:]] == [[], [], []]
        assert [p for o in delta for p in o.prompt_logprobs] == cumulative[-1].prompt_logprobs
        assert all(o.prompt_logprobs == cumulative[0].prompt_logprobs for o in cumulative)
        final = await outputs(engine, "f", RequestOutputKind.FINAL_ONLY)
        assert final[0].prompt_logprobs == cumulative[-1].prompt_logprobs
    run(tiny_model_dirs["llama"], body)


def test_generate_takes_a_request_id_in_use_as_vllm_026(tiny_model_dirs):
    """vLLM 0.26 makes every request id unique inside (external ids may repeat): two generate() calls of one id
    both run, each stream gets its own outputs under that id, abort(id) ends them all, and closing one stream
    ends that one alone. Here the second was a ValueError ("already in use")."""
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    async def body(engine):
        a, b = engine.generate([1, 5, 6, 7], long, "x"), engine.generate([1, 8, 9], short, "x")
        first_a = await a.__anext__()
        outs_b = [o async for o in b]
        assert {o.request_id for o in outs_b} == {first_a.request_id} == {"x"}
        assert outs_b[-1].finished and len(outs_b[-1].outputs[0].token_ids) == 3
        assert outs_b[-1].prompt_token_ids == [1, 8, 9] and first_a.prompt_token_ids == [1, 5, 6, 7]
        c = engine.generate([1, 5, 6, 7], long, "x")
        await c.__anext__()
        await c.aclose()   # ends c alone
        assert not (await a.__anext__()).finished
        d = engine.generate([1, 5, 6, 7], long, "x")
        await d.__anext__()
        await engine.abort("x")   # ends a and d
        for stream in (a, d):
            assert [o async for o in stream][-1].outputs[0].finish_reason == "abort"
        assert not engine.output_processor.parents and not engine._aliases
        with pytest.raises(ValueError, match="already in use"):   # the lower-level add_request still refuses
            engine.add_request("y", [1, 5], long)
            engine.add_request("y", [1, 5], long)
        engine.abort("y")
    run(tiny_model_dirs["llama"], body)


def test_from_vllm_config_takes_the_config_that_create_engine_config_returns(tiny_model_dirs):
    """vLLM's `AsyncLLM.from_vllm_config(engine_args.create_engine_config(), ...)` was an AttributeError; here
    that config is an EngineConfig. disable_log_stats and enable_log_requests act; a vLLM-shaped view is not a
    config to build on (a TypeError saying so), and the multi-API-process arguments are the server's."""
    from pagedllm import AsyncEngineArgs

    config = AsyncEngineArgs(tiny_model_dirs["llama"], device="cpu", max_model_len=128,
                             num_gpu_blocks_override=32).create_engine_config()
    assert isinstance(config, EngineConfig) and config.max_model_len == 128

    async def main():
        engine = AsyncLLM.from_vllm_config(config, enable_log_requests=True, disable_log_stats=True)
        try:
            assert engine.log_requests and engine.config.log_stats_interval == 0
            assert engine.vllm_config.cache_config.num_gpu_blocks == 32
            with pytest.raises(TypeError, match="create_engine_config"):
                AsyncLLM.from_vllm_config(engine.vllm_config)
        finally:
            engine.shutdown()
    asyncio.run(main())
    with pytest.raises(NotImplementedError, match="api-server-count"):
        AsyncLLM.from_vllm_config(config, client_count=2)


def test_from_vllm_config_streams_at_the_engine_args_stream_interval(tiny_model_dirs):
    """vLLM's EngineArgs carries stream_interval onto its scheduler_config, so
    `AsyncLLM.from_vllm_config(EngineArgs(..., stream_interval=3).create_engine_config())` streams every 3 tokens.
    Here it was the AsyncLLM's own argument, which create_engine_config() dropped: one output per token."""
    from pagedllm import EngineArgs

    config = EngineArgs(tiny_model_dirs["llama"], device="cpu", max_model_len=128, num_gpu_blocks_override=32,
                        stream_interval=3).create_engine_config()

    async def main():
        engine = AsyncLLM.from_vllm_config(config, disable_log_stats=True)
        try:
            assert engine.vllm_config.scheduler_config.stream_interval == 3
            params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
            outs = [o async for o in engine.generate([1, 5, 6, 7], params, "r")]
            assert [len(o.outputs[0].token_ids) for o in outs] == [1, 4, 7]   # every 3 tokens, the first at once
        finally:
            engine.shutdown()
    asyncio.run(main())


def test_an_engine_built_before_its_event_loop_is_healthy_when_first_asked(tiny_model_dirs):
    """vLLM's pattern: the engine built outside any event loop, then used in asyncio.run(). Its heartbeats wait in
    the pipe until a loop reads them: errored and check_health() called first, after heartbeat_timeout, said
    "has not responded" of a live core."""
    engine = AsyncLLM(EngineConfig(tiny_model_dirs["llama"], num_gpu_blocks_override=64, max_model_len=256,
                                   log_stats_interval=0, device="cpu"), heartbeat_timeout=1.0)

    async def main():
        assert not engine.errored
        await engine.check_health()
        outs = [o async for o in engine.generate([1, 5, 6], SamplingParams(max_tokens=2), "a")]
        assert outs[-1].finished
    try:
        time.sleep(2.5)
        assert not engine.errored and engine.is_running
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_add_request_may_be_awaited_and_read_with_get_as_vllms(tiny_model_dirs):
    """vLLM 0.26's add_request is a coroutine that gives a collector read with get(): `await add_request(...)` was
    a TypeError (an async generator is not awaitable). Awaited and read so, a request gives generate()'s outputs;
    iterated as before, the same."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = list(range(3, 20))

    async def body(engine):
        want = [o.outputs[0].token_ids for o in [o async for o in engine.generate(prompt, params, "g")]]
        collector = await engine.add_request("a", prompt, params)
        got = [await collector.get()]
        while not got[-1].finished:
            got.append(await collector.get())
        assert [o.outputs[0].token_ids for o in got] == want
        with pytest.raises(StopAsyncIteration):
            await collector.get()
        assert [o.outputs[0].token_ids async for o in engine.add_request("b", prompt, params)] == want
        # vLLM's parameters in its order: arrival_time 4th (it was the output kind here), tokenization_kwargs
        arrival = time.time() - 100
        outs = [o async for o in engine.add_request("c", prompt, params, arrival, None, {"truncate_prompt_tokens": 4})]
        assert outs[-1].metrics.arrival_time == arrival and len(outs[-1].prompt_token_ids) == 4
        with pytest.raises(TypeError, match="arrival_time must be a time.time"):
            engine.add_request("d", prompt, params, "final")
    run(tiny_model_dirs["llama"], body)
