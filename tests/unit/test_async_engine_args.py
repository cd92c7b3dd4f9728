"""AsyncEngineArgs (vLLM's, for AsyncLLM.from_engine_args): checked before any process starts."""
import pytest

from pagedllm import AsyncEngineArgs, EngineArgs


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_a_stream_interval_that_is_no_count_of_tokens_is_refused_naming_it(value):
    """It reached the output processor as it was: 0 streamed nothing until the finish (no error)."""
    with pytest.raises(ValueError, match="stream_interval must be an integer"):
        AsyncEngineArgs(stream_interval=value).create_engine_config()


def test_engine_arguments_go_to_the_config_and_the_async_llm_s_to_it():
    args = AsyncEngineArgs("m", max_model_len=64, kv_cache_memory_bytes=2**20, stream_interval=4,
                           enable_log_requests=True, disable_log_stats=True)
    config = args.create_engine_config()
    assert (config.model, config.max_model_len, config.kv_cache_memory) == ("m", 64, 2**20)
    assert (config.log_stats_interval, config.stream_interval) == (0, 4)   # vLLM's EngineArgs' (scheduler_config)
    assert args.async_llm_kwargs() == {"log_requests": True}


def test_vllms_async_llm_engine_name_is_the_async_llm():
    """`from vllm import AsyncLLMEngine, AsyncEngineArgs` (vLLM's alias of AsyncLLM) had no pagedllm name."""
    import pagedllm
    from pagedllm.engine.async_llm import AsyncLLM

    assert pagedllm.AsyncLLMEngine is AsyncLLM and "AsyncLLMEngine" in pagedllm.__all__


def test_an_argument_set_after_construction_is_taken_as_vllms():
    """vLLM's scripts set engine arguments on the object (`engine_args.max_model_len = 64`): the attribute was
    kept on the object and ignored, so the engine ran with the model's own max_model_len."""
    args = AsyncEngineArgs("m")
    args.max_model_len = 64
    args.stream_interval = 3
    assert args.max_model_len == 64
    assert (args.create_engine_config().max_model_len, args.create_engine_config().stream_interval) == (64, 3)
    assert args.async_llm_kwargs() == {}
    with pytest.raises(AttributeError, match="not_an_engine_argument"):   # refused, not dropped
        args.not_an_engine_argument = 1
    # an argument not given reads as its default, as vLLM's dataclass fields do (it raised AttributeError)
    unset = AsyncEngineArgs("m")
    assert (unset.enforce_eager, unset.max_model_len) == (False, None)
    assert unset.gpu_memory_utilization == unset.create_engine_config().gpu_memory_utilization
    with pytest.raises(AttributeError, match="not_an_engine_argument"):
        unset.not_an_engine_argument


def test_create_engine_config_takes_vllms_arguments():
    """vLLM's create_engine_config(usage_context, headless) was a TypeError for either."""
    assert AsyncEngineArgs("m", max_model_len=64).create_engine_config(usage_context=None).max_model_len == 64
    with pytest.raises(NotImplementedError, match="headless=True"):
        AsyncEngineArgs("m").create_engine_config(headless=True)


def test_asdict_of_engine_args_is_llm_s_keyword_arguments(monkeypatch):
    """vLLM's scripts build `LLM(**dataclasses.asdict(engine_args))`: asdict raised TypeError (EngineArgs was no
    dataclass). Every argument is there, given or at its default, and LLM takes them all: a flag that sets a field
    (disable_log_stats) is not undone by that field at its default."""
    import dataclasses

    import pagedllm.llm

    args = EngineArgs("m", max_model_len=64, disable_log_stats=True, trust_remote_code=True)
    args.enforce_eager = True
    kwargs = dataclasses.asdict(args)
    assert (kwargs["model"], kwargs["max_model_len"], kwargs["enforce_eager"]) == ("m", 64, True)
    assert kwargs["block_size"] == 16 and kwargs["pipeline_parallel_size"] is None   # defaults: vLLM's left out
    built = []
    monkeypatch.setattr(pagedllm.llm, "Engine", lambda config, **own: built.append(config))
    pagedllm.llm.LLM(**kwargs)
    config = built[0]
    assert (config.model, config.max_model_len, config.enforce_eager, config.log_stats_interval) == ("m", 64, True,
                                                                                                     0)
    assert dataclasses.asdict(AsyncEngineArgs("m", stream_interval=2))["stream_interval"] == 2
    with pytest.raises(TypeError, match="not_an_engine_argument"):   # as vLLM's dataclass: at construction
        EngineArgs("m", not_an_engine_argument=1)


def test_create_engine_configs_vllm_config_paths():
    """vLLM's scripts read create_engine_config()'s VllmConfig: `.model_config.max_model_len`,
    `.cache_config.block_size`, `.parallel_config`, `.scheduler_config`; each was an AttributeError on the
    EngineConfig returned. They say what an AsyncLLM built on it runs with: max_model_len the model's unless
    given (read from its config, as vLLM's), the KV blocks None until an engine sizes the cache (vLLM's too)."""
    from pagedllm.config import DEMO_MODEL

    config = AsyncEngineArgs(DEMO_MODEL, block_size=32, device="cpu").create_engine_config()
    assert config.model_config.max_model_len == config.scheduler_config.max_model_len == 512   # the demo's
    assert config.model_config.model == DEMO_MODEL
    assert (config.cache_config.block_size, config.cache_config.num_gpu_blocks) == (32, None)
    assert config.parallel_config.tensor_parallel_size == 1
    assert (config.scheduler_config.max_num_seqs, config.scheduler_config.max_num_batched_tokens) == (256, 8192)
    given = AsyncEngineArgs(DEMO_MODEL, max_model_len=64, max_num_seqs=4, device="cpu").create_engine_config()
    assert (given.model_config.max_model_len, given.scheduler_config.max_num_seqs) == (64, 4)


def _built_engines(monkeypatch) -> list:
    import pagedllm.llm

    built = []
    monkeypatch.setattr(pagedllm.llm, "Engine", lambda config, **own: built.append((config, own)))
    return built


def test_llm_from_engine_args_builds_the_llm_of_its_arguments(monkeypatch):
    """vLLM's benchmarks (latency.py, throughput.py) build `LLM.from_engine_args(EngineArgs.from_cli_args(args))`:
    it was an AttributeError."""
    from pagedllm import LLM

    built = _built_engines(monkeypatch)
    args = EngineArgs("m", max_model_len=64, disable_log_stats=True)
    args.enforce_eager = True
    LLM.from_engine_args(args)
    LLM.from_engine_args(AsyncEngineArgs("m", stream_interval=3, enable_log_requests=True))
    (config, own), (async_config, async_own) = built
    assert (config.model, config.max_model_len, config.enforce_eager, config.log_stats_interval) == ("m", 64, True,
                                                                                                     0)
    assert own == {} and async_own == {"log_requests": True} and async_config.stream_interval == 3
    with pytest.raises(TypeError, match="takes an EngineArgs or AsyncEngineArgs, got dict"):
        LLM.from_engine_args({"model": "m"})


def test_llm_takes_the_async_engine_args_own_arguments(monkeypatch):
    """`LLM(**dataclasses.asdict(AsyncEngineArgs(...)))` was a TypeError for stream_interval and
    enable_log_requests; LLM's engine takes both as the AsyncLLM does (stream_interval is vLLM's EngineArgs' too,
    which its LLMEngine's streamed outputs honour); a value that means neither is refused naming it."""
    import dataclasses

    from pagedllm import LLM

    built = _built_engines(monkeypatch)
    LLM(**dataclasses.asdict(AsyncEngineArgs("m")))
    LLM("m", stream_interval=2, enable_log_requests=False)
    assert [(config.stream_interval, own) for config, own in built] == [(1, {}), (2, {"log_requests": False})]
    with pytest.raises(ValueError, match="stream_interval must be an integer"):
        LLM("m", stream_interval=0)
    with pytest.raises(ValueError, match="enable_log_requests must be a bool"):
        LLM("m", enable_log_requests="yes")


def test_llm_engine_streams_every_stream_interval_tokens_and_logs_requests(tiny_model_dirs, caplog):
    """LLM(stream_interval=3): llm.llm_engine's DELTA outputs come at the first token, every 3 tokens and the
    finish, as vLLM's LLMEngine's; enable_log_requests logs each request added and aborted."""
    import logging

    from pagedllm import LLM, SamplingParams
    from pagedllm.sampling_params import RequestOutputKind

    llm = LLM(tiny_model_dirs["llama"], device="cpu", stream_interval=3, enable_log_requests=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    engine = llm.llm_engine
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        engine.add_request("a", [3, 4, 5], params)
        engine.add_request("b", [3, 4, 5], params)
        engine.abort_request("b")
        outputs = [o for _ in range(30) if engine.has_unfinished_requests() for o in engine.step()]
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 3, 3, 1]
    assert "Added request a." in caplog.text and "Aborted request b." in caplog.text


def test_beam_search_params_import_from_vllms_module():
    """vLLM's benchmarks/latency.py imports `from vllm.sampling_params import BeamSearchParams`: an ImportError
    from pagedllm.sampling_params."""
    from pagedllm import BeamSearchParams as top
    from pagedllm.sampling_params import BeamSearchParams

    assert BeamSearchParams is top
    with pytest.raises(ImportError):
        from pagedllm.sampling_params import NotAName  # noqa: F401
