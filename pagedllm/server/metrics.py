"""Prometheus metrics at /metrics, named as vLLM's with the `pagedllm:` prefix so its dashboards work, and the
HTTP series vLLM's server has from prometheus-fastapi-instrumentator (http_requests_total, ..., unprefixed).

Engine state (running/waiting, KV-cache usage, prefix-cache and token counters, preemptions, and per KV
tier below the GPU: hits, misses, bytes and transfer time) is read from
the core when scraped, so a scrape reflects every abort sent before it. Request latencies come from each
step's StepStats as the API process handles it.
"""
import bisect
import collections
import os
import time

from starlette.routing import compile_path

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, Summary, generate_latest)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from pagedllm.config import EngineConfig
from pagedllm.metrics import SchedulerStats, StepStats, TokenHistogram

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"   # prometheus_client's multiprocess mode: set, and read at import
# vLLM's labels on every series: `engine` is its engine core's index (data parallel); one core here, so "0".
# Dashboards and alerts that select or group by engine need it.
LABELS, ENGINE = ("model_name", "engine"), "0"

# Seconds: vLLM's bounds, series by series. Alerts and SLO panels read single buckets (le="0.1", le="10.0"),
# which exist only where the bounds are the same.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                            240.0, 480.0, 960.0, 1920.0, 7680.0)

# prometheus-fastapi-instrumentator's default series (vLLM's server adds them with its defaults): bounds, and the
# handlers left uncounted (vLLM's list; it matches them as regexes anywhere in the route, so that its
# /v1/load_lora_adapter goes uncounted too: here the routes themselves)
_HTTP_HIGHR_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 7.5, 10,
                       30, 60)
_HTTP_LOWR_BUCKETS = (0.1, 0.5, 1)
HTTP_UNCOUNTED = frozenset({"/metrics", "/metrics/", "/health", "/load", "/ping", "/version", "/server_info"})


def token_buckets(max_model_len: int | None) -> tuple[int, ...]:
    """Tokens, 1-2-5 apart up to max_model_len, as vLLM's build_1_2_5_buckets (unknown: up to 5M)."""
    top = max_model_len or 5 * 10 ** 6
    return tuple(b for b in (m * 10 ** e for e in range(10) for m in (1, 2, 5)) if b <= top)


class ServerMetrics:
    def __init__(self, model_name: str, config: EngineConfig | None = None, max_model_len: int | None = None):
        """config: the engine's, for vLLM's info series (cache_config_info, lora_requests_info); max_model_len:
        the engine's, where the token histograms' buckets stop and what a request without max_tokens may make."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.max_model_len = max_model_len
        tokens = token_buckets(max_model_len)
        self.config = config
        self.stats: SchedulerStats | None = None
        self.registry.register(_EngineCollector(self))
        labels, r = list(LABELS), self.registry
        if os.environ.get(METRICS_DIR_ENV):
            # Several API processes (--api-server-count): each one's latencies go to files in that directory
            # (prometheus_client's multiprocess mode), and a scrape of any of them sums them all.
            MultiProcessCollector(self.registry)
            r = None
        else:   # vLLM's default registry's: process_* (memory, CPU, open files), python_gc_*, python_info
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name, ENGINE)
        self.ttft = histogram("pagedllm:time_to_first_token_seconds", "Time to first token (arrival to first output).",
                              _TTFT_BUCKETS)
        self.itl = histogram("pagedllm:inter_token_latency_seconds", "Time between a sequence's successive outputs.",
                             _ITL_BUCKETS)
        self.e2e = histogram("pagedllm:e2e_request_latency_seconds", "Arrival to the last output of a sequence.",
                             _REQUEST_LATENCY_BUCKETS)
        # vLLM's request phases (its dashboards' "Requests Prefill and Decode Time" panel), each one observed for
        # every finished sequence, when it finishes (0 where the phase did not happen: metrics.py): vLLM runs each of
        # a request's n as its own request, so these and the length series count each one
        self.queue = histogram("pagedllm:request_queue_time_seconds", "Arrival to first scheduled.",
                               _REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("pagedllm:request_prefill_time_seconds", "First scheduled to first token.",
                                 _REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("pagedllm:request_decode_time_seconds", "First token to last token.",
                                _REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("pagedllm:request_inference_time_seconds", "First scheduled to last token.",
                                   _REQUEST_LATENCY_BUCKETS)
        self.tpot = histogram("pagedllm:request_time_per_output_token_seconds",
                              "A sequence's decode time per token after its first.", _ITL_BUCKETS)
        # vLLM's request length and parameter histograms (its dashboards' length panels), per finished sequence
        # but for request_params_n and request_max_num_generation_tokens, once per request
        self.prompt_tokens = histogram("pagedllm:request_prompt_tokens", "Prompt tokens of a finished sequence.",
                                       tokens)
        self.generation_tokens = histogram("pagedllm:request_generation_tokens",
                                           "Generated tokens of a finished sequence.",
                                           tokens)
        self.params_n = histogram("pagedllm:request_params_n", "The n request parameter.", (1, 2, 5, 10, 20))
        self.params_max_tokens = histogram("pagedllm:request_params_max_tokens", "The max_tokens request parameter.",
                                           tokens)
        self.max_generation_tokens = histogram("pagedllm:request_max_num_generation_tokens",
                                               "Generated tokens of a request's longest sequence.", tokens)
        self.prefill_kv_computed = histogram("pagedllm:request_prefill_kv_computed_tokens",
                                             "Prompt tokens a sequence computed (cached ones excluded).",
                                             tokens)
        self.success = Counter("pagedllm:request_success", "Finished sequences, by finish reason.",
                               labels + ["finished_reason"], registry=r)
        for reason in ("stop", "length", "abort", "error", "repetition"):   # vLLM's FinishReason: from 0,
            self.success.labels(model_name, ENGINE, reason)    # so rate() and increase() read 0, not no data
        # the instrumentator's: status grouped (2xx, 4xx, 5xx), handler the route's template ("none": no route)
        self.http_requests = Counter("http_requests_total", "Total number of requests by method, status and handler.",
                                     ["method", "status", "handler"], registry=r)
        self.http_request_size = Summary("http_request_size_bytes", "Content length of incoming requests by "
                                         "handler (its Content-Length header; 0 without one).", ["handler"],
                                         registry=r)
        self.http_response_size = Summary("http_response_size_bytes", "Content length of outgoing responses by "
                                          "handler (its Content-Length header; 0 without one, as a stream).",
                                          ["handler"], registry=r)
        self.http_latency_highr = Histogram("http_request_duration_highr_seconds", "Latency with many buckets but "
                                            "no API specific labels.", buckets=_HTTP_HIGHR_BUCKETS, registry=r)
        self.http_latency = Histogram("http_request_duration_seconds", "Latency with only few buckets by handler.",
                                      ["method", "handler"], buckets=_HTTP_LOWR_BUCKETS, registry=r)

    def record_http(self, method: str, status: int, handler: str, request_bytes: int, response_bytes: int,
                    seconds: float):
        self.http_requests.labels(method, f"{str(status)[0]}xx", handler).inc()
        self.http_request_size.labels(handler).observe(request_bytes)
        self.http_response_size.labels(handler).observe(response_bytes)
        self.http_latency_highr.observe(seconds)
        self.http_latency.labels(method, handler).observe(seconds)

    def record(self, step: StepStats):
        observe_all(self.ttft, step.time_to_first_tokens)
        observe_all(self.itl, step.inter_token_latencies)   # one a streaming request, every step
        observe_all(self.params_n, step.params_n)
        observe_all(self.max_generation_tokens, step.max_num_generation_tokens)
        for f in step.finished:   # each sequence of n, as vLLM's
            self.e2e.observe(f.e2e_latency)
            self.prompt_tokens.observe(f.num_prompt_tokens)
            self.generation_tokens.observe(f.num_generation_tokens)
            self.prefill_kv_computed.observe(f.num_prompt_tokens - f.num_cached_tokens)
            # without max_tokens: what the context leaves (vLLM's serving fills max_tokens so before it counts)
            max_tokens = f.max_tokens or (self.max_model_len and self.max_model_len - f.num_prompt_tokens)
            if max_tokens:
                self.params_max_tokens.observe(max_tokens)
            self.queue.observe(f.queued_time)
            self.prefill.observe(f.prefill_time)
            self.decode.observe(f.decode_time)
            self.inference.observe(f.inference_time)
            self.tpot.observe(f.mean_time_per_output_token)
            self.success.labels(self.model_name, ENGINE, f.finish_reason).inc()

    def render(self, stats: SchedulerStats | None) -> bytes:
        """stats: the core's counts (None: the core does not answer; only this process's metrics)."""
        self.stats = stats
        return generate_latest(self.registry)


def observe_all(histogram, values: list[float]):
    """histogram.observe(v) for each v, bucket counts added once per step: observe() takes a lock and walks the
    bounds in Python for each value (~3 us; 300 streams at a 10 ms step are 30,000 a second)."""
    bounds, buckets, total = getattr(histogram, "_upper_bounds", None), getattr(histogram, "_buckets", None), \
        getattr(histogram, "_sum", None)
    if len(values) < 4 or bounds is None or buckets is None or total is None:   # another prometheus_client
        for value in values:
            histogram.observe(value)
        return
    for i, count in collections.Counter(bisect.bisect_left(bounds, v) for v in values).items():
        buckets[i].inc(count)   # bisect_left: the first bound >= v, observe()'s `amount <= bound`
    total.inc(sum(values))


class _EngineCollector:
    """The core's counts, as gauges and counters, from the stats taken for this scrape."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        s, name = self.metrics.stats, self.metrics.model_name
        if s is None:
            return
        gauges = [("num_requests_running", "Sequences in the running batch.", s.num_running),
                  ("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
                  ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", s.kv_cache_usage)]
        counters = [("prefix_cache_queries", "Tokens looked up in the prefix cache.", s.prefix_cache_queries),
                    ("prefix_cache_hits", "Tokens found in the prefix cache.", s.prefix_cache_hits),
                    ("num_preemptions", "Preemptions (recompute).", s.num_preemptions),
                    # vLLM's: every prompt token of a request that produced its first token, prefix-cache hits
                    # included and a recompute after preemption not (rate() is the prompt throughput served)
                    ("prompt_tokens", "Prompt tokens of requests (cached ones included).", s.num_prompt_tokens_total),
                    ("generation_tokens", "Generated tokens.", s.num_generation_tokens),
                    # vLLM's always-on series, 0 here: no KV connector, no multimodal cache (dashboards show 0, not
                    # no data)
                    ("external_prefix_cache_queries", "Tokens looked up in an external KV cache (none here).", 0),
                    ("external_prefix_cache_hits", "Tokens found in an external KV cache (none here).", 0),
                    ("mm_cache_queries", "Multimodal cache lookups (text-only models here).", 0),
                    ("mm_cache_hits", "Multimodal cache hits (text-only models here).", 0)]
        for metric, doc, value in gauges:
            family = GaugeMetricFamily(f"pagedllm:{metric}", doc, labels=LABELS)
            family.add_metric([name, ENGINE], value)
            yield family
        family = GaugeMetricFamily("pagedllm:num_requests_waiting_by_reason", "Waiting requests by reason: capacity "
                                   "(room to run), deferred (an adapter's load, a grammar's compile); they sum to "
                                   "num_requests_waiting.", labels=[*LABELS, "reason"])
        family.add_metric([name, ENGINE, "capacity"], s.num_waiting - s.num_waiting_deferred)
        family.add_metric([name, ENGINE, "deferred"], s.num_waiting_deferred)
        yield family
        for metric, doc, value in counters:
            family = CounterMetricFamily(f"pagedllm:{metric}", doc, labels=LABELS)
            family.add_metric([name, ENGINE], value)
            yield family
        # vLLM's: awake 0 from sleep(level) until resumed, weights_offloaded 1 at level 1, discard_all at level 2
        # (not built); pause_generation is no sleep, awake stays 1
        family = GaugeMetricFamily("pagedllm:engine_sleep_state", "The engine's sleep state: awake 0 while it "
                                   "sleeps (sleep level 0: scheduling paused until wake_up); weights_offloaded 1 "
                                   "at sleep level 1, discard_all 1 at level 2 (not built: always 0).",
                                   labels=[*LABELS, "sleep_state"])
        level = s.sleep_level
        for state, value in (("awake", level is None), ("weights_offloaded", level == 1), ("discard_all", level == 2)):
            family.add_metric([name, ENGINE, state], int(value))
        yield family
        yield from _prompt_source_families(s, name)
        yield from _info_families(s, self.metrics.config)
        yield _histogram_family("iteration_tokens_total", "Tokens per engine step.", s.iteration_tokens, name)
        yield from _tier_families(s, name)
        yield from _spec_decode_families(s, name)


def _info_families(s: SchedulerStats, config: EngineConfig | None):
    """vLLM's info gauges. cache_config_info: 1, labelled with the cache config (its CacheConfig's names and
    str() values, for the fields that mean the same here). lora_requests_info: the time of the scrape, labelled
    with the adapters of running and waiting requests (comma-joined) and max_lora; readers take the newest."""
    if config is None:
        return
    labels = {"block_size": config.block_size, "cache_dtype": config.kv_cache_dtype,
              "enable_prefix_caching": config.enable_prefix_caching,
              "gpu_memory_utilization": config.gpu_memory_utilization,
              "kv_cache_memory_bytes": config.kv_cache_memory, "num_gpu_blocks": s.num_blocks_total,
              "num_gpu_blocks_override": config.num_gpu_blocks_override, "engine": ENGINE}
    family = GaugeMetricFamily("pagedllm:cache_config_info", "Information of the engine's cache config.",
                               labels=list(labels))
    family.add_metric([str(v) for v in labels.values()], 1)
    yield family
    if s.running_lora_adapters is None:
        return
    family = GaugeMetricFamily("pagedllm:lora_requests_info", "Running stats on lora requests.",
                               labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
    family.add_metric([str(config.max_loras), ",".join(s.waiting_lora_adapters or ()),
                       ",".join(s.running_lora_adapters)], time.time())
    yield family


def _prompt_source_families(s: SchedulerStats, model_name: str):
    """vLLM's prompt_tokens split by where the KV came from (they sum to prompt_tokens), and the cached part."""
    sources = s.prompt_token_sources
    family = CounterMetricFamily("pagedllm:prompt_tokens_by_source", "Prompt tokens by source.",
                                 labels=[*LABELS, "source"])
    for source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
        family.add_metric([model_name, ENGINE, source], getattr(sources, source))
    yield family
    family = CounterMetricFamily("pagedllm:prompt_tokens_cached", "Cached prompt tokens (local and external).",
                                 labels=LABELS)
    family.add_metric([model_name, ENGINE], sources.local_cache_hit + sources.external_kv_transfer)
    yield family


def _histogram_family(metric: str, doc: str, hist: TokenHistogram, model_name: str) -> HistogramMetricFamily:
    family = HistogramMetricFamily(f"pagedllm:{metric}", doc, labels=LABELS)
    cumulative, buckets = 0, []
    for bound, count in zip([*map(float, hist.bounds), "+Inf"], hist.counts):
        cumulative += count
        buckets.append((str(bound), cumulative))
    family.add_metric([model_name, ENGINE], buckets, hist.total)
    return family


# KVTierStats field -> (metric, help); one sample per enabled tier (swap, cpu, disk), labelled `tier`.
_TIER_METRICS = {"hits": ("kv_tier_hits", "KV blocks loaded from a tier below the GPU instead of recomputed."),
                 "misses": ("kv_tier_misses", "Lookups that went on past a tier (swap: pool full)."),
                 "invalid": ("kv_tier_invalid", "Truncated, corrupt or foreign blocks found and removed."),
                 "bytes_stored": ("kv_tier_stored_bytes", "Bytes of KV written into a tier."),
                 "bytes_loaded": ("kv_tier_loaded_bytes", "Bytes of KV loaded from a tier into GPU blocks."),
                 "store_seconds": ("kv_tier_store_seconds", "Transfer time into a tier."),
                 "load_seconds": ("kv_tier_load_seconds", "Transfer time out of a tier into GPU blocks.")}


def _tier_families(s: SchedulerStats, model_name: str):
    if not s.kv_tiers:
        return
    for field, (metric, doc) in _TIER_METRICS.items():
        family = CounterMetricFamily(f"pagedllm:{metric}", doc, labels=[*LABELS, "tier"])
        for tier, stats in s.kv_tiers.items():
            family.add_metric([model_name, ENGINE, tier], getattr(stats, field))
        yield family


def _spec_decode_families(s: SchedulerStats, model_name: str):
    """vLLM's spec_decode counters; accepted per position labelled `position` (0 = the first proposal)."""
    sd = s.spec_decode
    if sd is None:
        return
    for metric, doc, value in (
            ("spec_decode_num_drafts", "Verified drafts (one row's proposals in one step).", sd.num_drafts),
            ("spec_decode_num_draft_tokens", "Proposed tokens verified.", sd.num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Proposed tokens accepted.", sd.num_accepted_tokens)):
        family = CounterMetricFamily(f"pagedllm:{metric}", doc, labels=LABELS)
        family.add_metric([model_name, ENGINE], value)
        yield family
    family = CounterMetricFamily("pagedllm:spec_decode_num_accepted_tokens_per_pos",
                                 "Accepted proposals at each position.", labels=[*LABELS, "position"])
    for position, value in enumerate(sd.accepted_per_pos):
        family.add_metric([model_name, ENGINE, str(position)], value)
    yield family


class HttpMetrics:
    """Pure ASGI middleware, outermost: every request's http_* series (ServerMetrics.record_http), its handler the
    route that answered it; one refused before routing (a missing key, a body too large) is matched against the
    app's routes by path."""

    def __init__(self, app, metrics: ServerMetrics, routes_of=None):
        """routes_of: returns the app's route templates (its OpenAPI paths), read at the first refused request."""
        self.app, self.metrics, self.routes_of, self.templates = app, metrics, routes_of, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, length = time.perf_counter(), 500, 0   # no response started: the instrumentator's 500

        async def send_counted(message):
            nonlocal status, length
            if message["type"] == "http.response.start":
                status = message["status"]
                length = _content_length(message.get("headers", ()))
            await send(message)
        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", None) or self._template(scope)
            if handler not in HTTP_UNCOUNTED:
                self.metrics.record_http(scope["method"], status, handler, _content_length(scope["headers"]),
                                         length, time.perf_counter() - start)

    def _template(self, scope) -> str:
        if self.templates is None:
            try:
                paths = list(self.routes_of()) if self.routes_of is not None else []
            except Exception:   # no schema: such requests count under "none"
                paths = []
            self.templates = [(compile_path(path)[0], path) for path in paths]
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return next((template for regex, template in self.templates if regex.match(path)), "none")


def _content_length(headers) -> int:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
