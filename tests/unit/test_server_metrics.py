"""/metrics against vLLM's PrometheusStatLogger: the series its dashboards and alerts read, with its names (the
`pagedllm:` prefix for `vllm:`), labels, buckets and meaning. Over StepStats and SchedulerStats, no engine."""
import re
import time

from pagedllm.config import EngineConfig
from pagedllm.metrics import (FinishedRequestStats, PromptTokenSources, SchedulerStats, SpecDecodeStats, StepStats,
                              TokenHistogram)
from pagedllm.server.metrics import ServerMetrics


def scheduler_stats(**kw) -> SchedulerStats:
    fields = dict(num_running=2, num_waiting=1, num_blocks_total=10, num_blocks_free=4, kv_cache_usage=0.6,
                  prefix_cache_queries=64, prefix_cache_hits=32, num_preemptions=1, num_prompt_tokens=32,
                  num_generation_tokens=7, peak_blocks=6, peak_running=2, kv_waste_at_peak=0.1)
    return SchedulerStats(**{**fields, **kw})


def exposed(metrics: ServerMetrics, stats: SchedulerStats | None = None) -> str:
    return metrics.render(stats).decode()


def samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(re.escape(name) + r"[{ ]", line)]


def test_every_series_has_vllms_engine_label():
    """vLLM labels every series model_name and engine (its core's index); a query that selects or sums by engine
    finds nothing without it. One core here: engine="0"."""
    metrics = ServerMetrics("m")
    metrics.record(StepStats(queue_times=[0.1], time_to_first_tokens=[0.2], inter_token_latencies=[0.01],
                             finished=[FinishedRequestStats("stop", 0.5, 3, 4)]))
    text = exposed(metrics, scheduler_stats(spec_decode=SpecDecodeStats(2, 4, 3, [2, 1])))
    series = [line for line in text.splitlines() if line.startswith("pagedllm:")]
    assert len(series) > 40
    assert [line for line in series if 'engine="0"' not in line or 'model_name="m"' not in line] == []
    assert 'pagedllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0' in text
    assert 'pagedllm:num_requests_running{engine="0",model_name="m"} 2.0' in text


def bounds(text: str, name: str) -> list[float]:
    return [float(b) for b in re.findall(re.escape(name) + r'_bucket\{[^}]*le="([^"+]+)"', text)]


def test_latency_histograms_have_vllms_bucket_bounds():
    """Alerts and SLO panels read one bucket (the share of TTFTs under le="0.1", of requests under le="10.0"):
    it exists only where the bounds are vLLM's."""
    metrics = ServerMetrics("m")
    metrics.record(StepStats(queue_times=[0.1], time_to_first_tokens=[0.2], inter_token_latencies=[0.01],
                             finished=[FinishedRequestStats("stop", 0.5, 3, 4)]))
    text = exposed(metrics)
    request_latency = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                       240.0, 480.0, 960.0, 1920.0, 7680.0]
    assert bounds(text, "pagedllm:time_to_first_token_seconds") == [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        160.0, 640.0, 2560.0]
    assert bounds(text, "pagedllm:inter_token_latency_seconds") == [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
    assert bounds(text, "pagedllm:e2e_request_latency_seconds") == request_latency
    assert bounds(text, "pagedllm:request_queue_time_seconds") == request_latency


def test_prompt_tokens_counter_is_vllms_all_prompt_tokens():
    """vllm:prompt_tokens counts cached prompt tokens too: rate() of it is the prompt throughput served."""
    text = exposed(ServerMetrics("m"), scheduler_stats(num_prompt_tokens=10,
                                                          prompt_token_sources=PromptTokenSources(10, 8)))
    assert samples(text, "pagedllm:prompt_tokens_total") == [
        'pagedllm:prompt_tokens_total{engine="0",model_name="m"} 18.0']


def test_request_phase_histograms():
    """vLLM's request_prefill/decode/inference_time_seconds (request latency bounds) and
    request_time_per_output_token_seconds (inter-token bounds): its "Requests Prefill and Decode Time" panel. Each
    finished sequence is one observation of each, as vLLM's: one that had no phase (no token) observes its zeros
    (it was left out, so the counts were short of request_success's)."""
    metrics = ServerMetrics("m")
    metrics.record(StepStats(finished=[FinishedRequestStats("stop", 5.0, 3, 4, prefill_time=0.4, decode_time=3.0,
                                                            inference_time=3.4, mean_time_per_output_token=1.0),
                                       FinishedRequestStats("error", 1.0, 3, 0)]))   # no token: zeros
    text = exposed(metrics)
    for name, total in (("request_prefill_time_seconds", 0.4), ("request_decode_time_seconds", 3.0),
                        ("request_inference_time_seconds", 3.4), ("request_time_per_output_token_seconds", 1.0)):
        assert f'pagedllm:{name}_count{{engine="0",model_name="m"}} 2.0' in text
        assert f'pagedllm:{name}_sum{{engine="0",model_name="m"}} {total}' in text
        assert samples(text, f"pagedllm:{name}_bucket")[0].endswith(" 1.0")   # the zero, in the lowest bucket
    assert bounds(text, "pagedllm:request_prefill_time_seconds") == bounds(text, "pagedllm:e2e_request_latency_seconds")
    assert bounds(text, "pagedllm:request_time_per_output_token_seconds") == bounds(
        text, "pagedllm:inter_token_latency_seconds")


def test_queue_time_is_observed_when_a_sequence_finishes():
    """vLLM observes request_queue_time_seconds with a finished request's other phases (update_from_finished_request:
    first scheduled minus queued), not when it is first scheduled: a request scheduled and aborted by its client
    counts in none of them, and the queue histogram's count is the finished sequences', as the others'. It was
    observed at the first scheduling, so it counted requests no other phase histogram did."""
    from pagedllm.core.messages import EngineCoreOutput
    from pagedllm.engine.output_processor import OutputKind, OutputProcessor
    from pagedllm.sampling_params import SamplingParams
    op, metrics = OutputProcessor(None), ServerMetrics("m")
    for rid in ("done", "aborted"):
        op.add_request(rid, None, [1, 2], SamplingParams(max_tokens=2, detokenize=False), OutputKind.FINAL, 0.0)

    def count() -> str:
        return samples(exposed(metrics), "pagedllm:request_queue_time_seconds_count")[0].rsplit(" ", 1)[1]
    for stats, outputs in ((StepStats(first_scheduled_ids=["done", "aborted"], queue_times=[0.25, 0.5]), []),
                           (StepStats(), [EngineCoreOutput("done", [5]), EngineCoreOutput("aborted", [5])])):
        op.process(outputs, stats)
        metrics.record(stats)
    assert count() == "0.0"   # scheduled, not finished
    op.abort("aborted")   # the client's abort: no finished record, as vLLM's
    stats = StepStats()
    op.process([EngineCoreOutput("done", [6], finish_reason="length")], stats)
    metrics.record(stats)
    text = exposed(metrics)
    assert count() == "1.0"
    assert 'pagedllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 0.25' in text
    assert 'pagedllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 1.0' in text


def test_request_parameter_histograms():
    """vLLM's request_params_n (bounds 1, 2, 5, 10, 20) and request_max_num_generation_tokens (1-2-5 bounds) once
    per request; request_params_max_tokens once per finished sequence (vLLM's child requests)."""
    metrics = ServerMetrics("m")
    metrics.record(StepStats(finished=[FinishedRequestStats("stop", 5.0, 3, 30, max_tokens=30),
                                       FinishedRequestStats("length", 5.0, 3, 10, max_tokens=30),
                                       FinishedRequestStats("stop", 1.0, 3, 1)],
                             params_n=[2, 1], max_num_generation_tokens=[30, 1]))
    text = exposed(metrics)
    assert bounds(text, "pagedllm:request_params_n") == [1.0, 2.0, 5.0, 10.0, 20.0]
    assert 'pagedllm:request_params_n_sum{engine="0",model_name="m"} 3.0' in text
    assert 'pagedllm:request_params_n_count{engine="0",model_name="m"} 2.0' in text
    assert 'pagedllm:request_params_max_tokens_count{engine="0",model_name="m"} 2.0' in text
    assert 'pagedllm:request_params_max_tokens_bucket{engine="0",le="50.0",model_name="m"} 2.0' in text
    assert 'pagedllm:request_max_num_generation_tokens_sum{engine="0",model_name="m"} 31.0' in text
    assert 'pagedllm:request_max_num_generation_tokens_count{engine="0",model_name="m"} 2.0' in text


def test_series_of_an_n_request_count_as_vllms():
    """n = 2 through the output processor: each sequence is one observation of time to first token, end-to-end
    latency, the phases, prompt tokens (the whole prompt each), generation tokens (its own) and
    request_success; request_params_n and request_max_num_generation_tokens are one for the request."""
    from pagedllm.core.messages import EngineCoreOutput
    from pagedllm.engine.output_processor import OutputKind, OutputProcessor
    from pagedllm.sampling_params import SamplingParams
    op, metrics = OutputProcessor(None), ServerMetrics("m")
    op.add_request("r", None, [1, 2, 3], SamplingParams(n=2, max_tokens=4, detokenize=False), OutputKind.FINAL, 0.0)
    for stats, outputs in ((StepStats(first_scheduled_ids=["r#0", "r#1"], queue_times=[0.0, 0.0]), []),
                           (StepStats(), [EngineCoreOutput("r#0", [5]), EngineCoreOutput("r#1", [5])]),
                           (StepStats(), [EngineCoreOutput("r#0", [6], finish_reason="stop"),
                                          EngineCoreOutput("r#1", [6])]),
                           (StepStats(), [EngineCoreOutput("r#1", [7, 8], finish_reason="length")])):
        op.process(outputs, stats)
        metrics.record(stats)
    text = exposed(metrics)

    def value(sample):
        return float(next(line for line in samples(text, "pagedllm:" + sample)).rsplit(" ", 1)[1])
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_prefill_kv_computed_tokens", "request_params_max_tokens"):
        assert value(name + "_count") == 2, name
    assert value("inter_token_latency_seconds_count") == 3
    assert (value("request_prompt_tokens_sum"), value("request_generation_tokens_sum")) == (6, 6)
    assert value("request_params_n_count") == value("request_max_num_generation_tokens_count") == 1
    assert value("request_max_num_generation_tokens_sum") == 4
    for reason in ("stop", "length"):
        assert f'pagedllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="m"}} 1.0' in text


def test_prefill_kv_computed_tokens_histogram():
    """vLLM's request_prefill_kv_computed_tokens: a finished request's prompt tokens less its cached ones."""
    metrics = ServerMetrics("m")
    metrics.record(StepStats(finished=[FinishedRequestStats("stop", 1.0, 40, 1, num_cached_tokens=32)]))
    text = exposed(metrics)
    assert 'pagedllm:request_prefill_kv_computed_tokens_sum{engine="0",model_name="m"} 8.0' in text
    assert 'pagedllm:request_prefill_kv_computed_tokens_bucket{engine="0",le="5.0",model_name="m"} 0.0' in text
    assert 'pagedllm:request_prefill_kv_computed_tokens_bucket{engine="0",le="10.0",model_name="m"} 1.0' in text


def test_request_success_has_every_finish_reason_from_zero():
    """vLLM creates request_success for each FinishReason at start: an alert on rate(...{finished_reason="error"})
    reads 0, not no data, before the first error."""
    text = exposed(ServerMetrics("m"))
    for reason in ("stop", "length", "abort", "error"):
        assert (f'pagedllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="m"}} 0.0'
                in text)


def test_iteration_tokens_histogram():
    """vLLM's iteration_tokens_total (tokens per engine step, its bounds 1 to 16384), from the core's counts."""
    hist = TokenHistogram()
    for tokens in (1, 10, 20000):
        hist.observe(tokens)
    text = exposed(ServerMetrics("m"), scheduler_stats(iteration_tokens=hist))
    name = "pagedllm:iteration_tokens_total"
    assert bounds(text, name) == [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    assert f'{name}_bucket{{engine="0",le="16.0",model_name="m"}} 2.0' in text
    assert f'{name}_bucket{{engine="0",le="+Inf",model_name="m"}} 3.0' in text
    assert f'{name}_count{{engine="0",model_name="m"}} 3.0' in text
    assert f'{name}_sum{{engine="0",model_name="m"}} 20011.0' in text


def test_prompt_tokens_by_source():
    """vLLM's prompt_tokens_by_source (local_compute + local_cache_hit + external_kv_transfer = prompt_tokens)
    and prompt_tokens_cached (the two cached sources)."""
    sources = PromptTokenSources()
    assert sources.record(40, 32, 16) == 8   # 16 of the 32 cached tokens were loaded from a KV tier
    text = exposed(ServerMetrics("m"), scheduler_stats(prompt_token_sources=sources))
    assert samples(text, "pagedllm:prompt_tokens_by_source_total") == [
        f'pagedllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="{source}"}} {value}'
        for source, value in (("local_compute", 8.0), ("local_cache_hit", 16.0), ("external_kv_transfer", 16.0))]
    assert samples(text, "pagedllm:prompt_tokens_cached_total") == [
        'pagedllm:prompt_tokens_cached_total{engine="0",model_name="m"} 32.0']
    assert samples(text, "pagedllm:prompt_tokens_total") == [
        'pagedllm:prompt_tokens_total{engine="0",model_name="m"} 40.0']


def test_cache_config_info():
    """vLLM's cache_config_info: a gauge of 1 whose labels are the cache config (its CacheConfig's names, str()
    values), num_gpu_blocks the blocks the engine has; readers (gateways' schedulers) read block_size from it."""
    config = EngineConfig(model="x", block_size=32, gpu_memory_utilization=0.8)
    text = exposed(ServerMetrics("m", config), scheduler_stats())
    assert samples(text, "pagedllm:cache_config_info") == [
        'pagedllm:cache_config_info{block_size="32",cache_dtype="auto",enable_prefix_caching="True",engine="0",'
        'gpu_memory_utilization="0.8",kv_cache_memory_bytes="None",num_gpu_blocks="10",'
        'num_gpu_blocks_override="None"} 1.0']


def test_lora_requests_info():
    """vLLM's lora_requests_info, only with LoRA on: the time as value (readers take the newest sample), the
    running and waiting requests' adapters comma-joined, and max_lora."""
    assert "lora_requests_info" not in exposed(ServerMetrics("m", EngineConfig(model="x")), scheduler_stats())
    metrics = ServerMetrics("m", EngineConfig(model="x", enable_lora=True, max_loras=2))
    start = time.time()
    text = exposed(metrics, scheduler_stats(running_lora_adapters={"a": 2, "b": 1}, waiting_lora_adapters={}))
    [line] = samples(text, "pagedllm:lora_requests_info")
    labels, value = line.rsplit(" ", 1)
    assert labels == ('pagedllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",'
                      'waiting_lora_adapters=""}')
    assert start <= float(value) <= time.time()


def test_token_histograms_stop_at_max_model_len_and_count_an_unset_max_tokens():
    """vLLM's token-count histograms have 1-2-5 bounds up to max_model_len (build_1_2_5_buckets): they went to
    5M whatever the context. A request without max_tokens is observed in request_params_max_tokens at what the
    context leaves it, as vLLM's serving fills max_tokens before the engine counts it (it was not observed)."""
    metrics = ServerMetrics("m", max_model_len=256)
    metrics.record(StepStats(finished=[FinishedRequestStats("length", 0.5, 3, 253, max_tokens=None),
                                       FinishedRequestStats("stop", 0.5, 6, 2, max_tokens=16)]))
    text = exposed(metrics)
    for name in ("request_prompt_tokens", "request_generation_tokens", "request_params_max_tokens",
                 "request_max_num_generation_tokens", "request_prefill_kv_computed_tokens"):
        assert bounds(text, f"pagedllm:{name}") == [1, 2, 5, 10, 20, 50, 100, 200], name
    assert 'pagedllm:request_params_max_tokens_sum{engine="0",model_name="m"} 269.0' in text
    assert 'pagedllm:request_params_max_tokens_count{engine="0",model_name="m"} 2.0' in text
    assert 'le="5e+06"' in exposed(ServerMetrics("m"))   # max_model_len unknown: up to 5M


def test_vllms_always_on_series_are_there():
    """vLLM registers these whatever the engine does, each series from its start: a dashboard panel over them
    showed no data. Their values here are what is true: awake (not asleep), no KV connector and no multimodal
    cache (0), no repetition detection (0)."""
    text = exposed(ServerMetrics("m"), scheduler_stats())
    for name in ("external_prefix_cache_queries", "external_prefix_cache_hits", "mm_cache_queries", "mm_cache_hits"):
        assert f'pagedllm:{name}_total{{engine="0",model_name="m"}} 0.0' in text, name
    assert 'pagedllm:engine_sleep_state{engine="0",model_name="m",sleep_state="awake"} 1.0' in text
    assert 'pagedllm:engine_sleep_state{engine="0",model_name="m",sleep_state="discard_all"} 0.0' in text
    assert 'pagedllm:request_success_total{engine="0",finished_reason="repetition",model_name="m"} 0.0' in text


def test_waiting_requests_by_reason_sum_to_the_waiting():
    """vLLM's num_requests_waiting_by_reason: capacity (room to run) and deferred (an adapter's load, a
    grammar's compile), summing to num_requests_waiting; the series was missing."""
    text = exposed(ServerMetrics("m"), scheduler_stats(num_waiting=3, num_waiting_deferred=1))
    assert 'pagedllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 2.0' in text
    assert 'pagedllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="deferred"} 1.0' in text


def test_http_series_of_vllms_instrumentator():
    """vLLM's /metrics has prometheus-fastapi-instrumentator's series, read by HTTP dashboards and alerts (request
    rate and error ratio by handler, latency): http_requests_total{method, status, handler} (status grouped, handler
    the route's template, "none" for no route), http_request_duration_seconds{method, handler} (bounds 0.1, 0.5,
    1), http_request_duration_highr_seconds, http_request/response_size_bytes{handler}. /metrics itself (and
    /health, ...) is not counted. A request refused before routing (no API key) counts under its route."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient
    from pagedllm.config import ServerConfig
    from pagedllm.server.api_server import build_app
    from pagedllm.server.serving import ServingContext

    class Engine:
        config, max_model_len = SimpleNamespace(model="m"), 64

        async def get_stats(self):
            return None
    metrics = ServerMetrics("m")
    client = TestClient(build_app(ServingContext(Engine(), "m", None), metrics, ServerConfig(), ["k"]))
    assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/responses/resp_1").status_code == 401   # templated: counted under its template
    assert client.get("/nowhere", headers={"Authorization": "Bearer k"}).status_code == 404
    text = client.get("/metrics").text
    assert samples(text, "http_requests_total") == [
        'http_requests_total{handler="/v1/models",method="GET",status="2xx"} 1.0',
        'http_requests_total{handler="/v1/models",method="GET",status="4xx"} 1.0',
        'http_requests_total{handler="/v1/responses/{response_id}",method="GET",status="4xx"} 1.0',
        'http_requests_total{handler="none",method="GET",status="4xx"} 1.0']
    assert bounds(text, "http_request_duration_seconds")[:3] == [0.1, 0.5, 1.0]
    assert 'http_request_duration_seconds_count{handler="/v1/models",method="GET"} 2.0' in text
    assert 'http_request_duration_highr_seconds_count 4.0' in text
    assert bounds(text, "http_request_duration_highr_seconds")[-3:] == [10.0, 30.0, 60.0]
    assert 'http_request_size_bytes_count{handler="/v1/models"} 2.0' in text
    size = re.search(r'http_response_size_bytes_sum\{handler="/v1/models"\} (\S+)', text)
    assert size and float(size.group(1)) > 0   # the answers' Content-Length
    assert "/metrics" not in "".join(samples(text, "http_requests_total"))


def test_process_series_of_vllms_default_registry():
    """vLLM's /metrics (one API process) is prometheus_client's default registry, with its process and Python
    series: memory and CPU panels read process_resident_memory_bytes and process_cpu_seconds_total."""
    import sys
    text = exposed(ServerMetrics("m"))
    assert samples(text, "python_info") and samples(text, "python_gc_objects_collected_total")
    if sys.platform == "linux":   # read from /proc
        assert samples(text, "process_resident_memory_bytes") and samples(text, "process_cpu_seconds_total")
