"""vLLM's LLM and LLMEngine methods and attributes that pagedllm does not build, each with why and what to use
instead: a script written for vLLM that reaches for one stops there saying so, not with a bare AttributeError.
The same for AsyncLLM's methods and the arguments of its that ask for what is not built."""

_METRICS = ("vLLM's snapshot of Prometheus metrics is not built: llm.engine.get_stats() gives the scheduler's "
            "counts (SchedulerStats: running, waiting, KV cache usage, prefix cache hits, preemptions)")
_RPC = ("calls on every worker are not built: llm.engine.runner is rank 0's model runner (its model: "
        "llm.engine.runner.model)")

# a name of vLLM's LLMEngine (the methods also of its LLM) -> why not, and what instead
ENGINE_NAMES = {
    "get_metrics": _METRICS, "get_num_unfinished_requests": "has_unfinished_requests() is built; " + _METRICS,
    "collective_rpc": _RPC, "apply_model": _RPC,
}


_WEIGHTS = ("vLLM's weight transfer (weights updated in place, for RL training) is not built: build a new LLM on "
            "the updated checkpoint")

# a method of vLLM's LLM (not of its LLMEngine) -> why not, and what instead
LLM_NAMES = dict.fromkeys(("init_weight_transfer_engine", "start_weight_update", "start_draft_weight_update",
                           "update_weights", "finish_weight_update"), _WEIGHTS)


_CORE_RPC = ("calls on the engine core's workers are not built: the model runs in the engine core process, which "
             "takes requests, LoRA adapters and statistics calls only")
_DATA_PARALLEL = "data parallelism is not built: one engine core serves every request"

# a method of vLLM's AsyncLLM (EngineClient) -> why not, and what instead
ASYNC_LLM_NAMES = {
    "collective_rpc": _CORE_RPC,
    **dict.fromkeys(("scale_elastic_ep", "wait_for_requests_to_drain"), _DATA_PARALLEL),
    "notify_kv_transfer_request_rejected": "KV transfer connectors (disaggregated prefill) are not built",
    **LLM_NAMES,
}


def not_built(owner: str, name: str) -> NotImplementedError:
    why = ASYNC_LLM_NAMES[name] if owner == "AsyncLLM" else ENGINE_NAMES.get(name) or LLM_NAMES[name]
    return NotImplementedError(f"{owner}.{name}(), vLLM's: {why}")


def missing(owner: str, name: str) -> AttributeError:
    """Python's own AttributeError, with why and what instead for vLLM's names."""
    why = f" (vLLM's LLMEngine has): {ENGINE_NAMES[name]}" if name in ENGINE_NAMES else ""
    return AttributeError(f"'{owner}' object has no attribute {name!r}{why}")


def refusing(name: str, error):
    """A method for vLLM's `name` that raises error(name), so a class lists the methods it refuses in one loop,
    not one stub each."""
    def method(self, *args, **kwargs):
        raise error(name)
    method.__name__ = method.__qualname__ = name
    return method


def check_no_stat_loggers(method: str, stat_loggers):
    if stat_loggers:
        raise NotImplementedError(f"AsyncLLM.{method}(stat_loggers=...): vLLM's stat logger plug-ins are not built; "
                                  f"the engine core logs its statistics every log_stats_interval seconds, and "
                                  f"get_stats() returns them")


def check_vllm_keywords(data_parallel_rank: int | None, reasoning_ended: bool | None,
                        reasoning_parser_kwargs: dict | None):
    """generate()'s vLLM keywords that ask for what is not built: refused, naming them (not ignored)."""
    if data_parallel_rank not in (None, 0):
        raise ValueError(f"data_parallel_rank {data_parallel_rank!r} is out of range: data parallelism is not "
                         f"built, the engine is the one rank 0")
    if reasoning_ended is not None or reasoning_parser_kwargs is not None:
        raise NotImplementedError("generate(reasoning_ended=..., reasoning_parser_kwargs=...): the engine keeps no "
                                  "reasoning-parser state; a structured-output constraint applies from the first "
                                  "generated token")
