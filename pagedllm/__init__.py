"""pagedllm: a high-throughput LLM inference engine with a paged KV cache."""
from pagedllm.beam_search import BeamSearchParams
from pagedllm.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncLLM", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs", "FlexibleArgumentParser",
           "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "EngineConfig", "LoRARequest",
           "TextPrompt", "TokensPrompt"]


def __getattr__(name):  # lazy, so that `import pagedllm` stays light and free of import cycles
    if name == "LLM":
        from pagedllm.llm import LLM
        return LLM
    if name in ("AsyncLLM", "AsyncLLMEngine"):   # vLLM's AsyncLLMEngine is its AsyncLLM, by another name
        from pagedllm.engine.async_llm import AsyncLLM
        return AsyncLLM
    if name in ("EngineArgs", "AsyncEngineArgs"):
        from pagedllm.engine import engine_args
        return getattr(engine_args, name)
    if name == "FlexibleArgumentParser":   # vLLM's is vllm.utils.argparse_utils'
        from pagedllm.vllm_argv import FlexibleArgumentParser
        return FlexibleArgumentParser
    if name in ("RequestOutput", "CompletionOutput"):
        from pagedllm import outputs
        return getattr(outputs, name)
    if name == "EngineConfig":
        from pagedllm.config import EngineConfig
        return EngineConfig
    if name in ("TextPrompt", "TokensPrompt"):
        from pagedllm import inputs
        return getattr(inputs, name)
    if name == "LoRARequest":
        from pagedllm.lora.request import LoRARequest
        return LoRARequest
    raise AttributeError(name)
