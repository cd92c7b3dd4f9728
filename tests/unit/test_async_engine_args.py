"""AsyncEngineArgs (vLLM's, for AsyncLLM.from_engine_args): checked before any process starts."""
import pytest

from pagedllm import AsyncEngineArgs


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_a_stream_interval_that_is_no_count_of_tokens_is_refused_naming_it(value):
    """It reached the output processor as it was: 0 streamed nothing until the finish (no error)."""
    with pytest.raises(ValueError, match="stream_interval must be an integer >= 1"):
        AsyncEngineArgs(stream_interval=value).async_llm_kwargs()


def test_engine_arguments_go_to_the_config_and_the_async_llm_s_to_it():
    args = AsyncEngineArgs("m", max_model_len=64, kv_cache_memory_bytes=2**20, stream_interval=4,
                           enable_log_requests=True, disable_log_stats=True)
    config = args.create_engine_config()
    assert (config.model, config.max_model_len, config.kv_cache_memory) == ("m", 64, 2**20)
    assert config.log_stats_interval == 0
    assert args.async_llm_kwargs() == {"stream_interval": 4, "log_requests": True}


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
    assert args.create_engine_config().max_model_len == 64
    assert args.async_llm_kwargs() == {"stream_interval": 3}
    args.not_an_engine_argument = 1   # judged with the others when the engine is built, not dropped
    with pytest.raises((TypeError, ValueError), match="not_an_engine_argument"):
        args.create_engine_config()
    # an argument not given reads as its default, as vLLM's dataclass fields do (it raised AttributeError)
    unset = AsyncEngineArgs("m")
    assert (unset.enforce_eager, unset.max_model_len) == (False, None)
    assert unset.gpu_memory_utilization == unset.create_engine_config().gpu_memory_utilization
    with pytest.raises(AttributeError, match="'not_an_engine_argument': not given, and not an engine argument"):
        unset.not_an_engine_argument


def test_create_engine_config_takes_vllms_arguments():
    """vLLM's create_engine_config(usage_context, headless) was a TypeError for either."""
    assert AsyncEngineArgs("m", max_model_len=64).create_engine_config(usage_context=None).max_model_len == 64
    with pytest.raises(NotImplementedError, match="headless=True"):
        AsyncEngineArgs("m").create_engine_config(headless=True)
