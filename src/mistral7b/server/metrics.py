"""Prometheus metrics of one app, in its own CollectorRegistry (no process-wide globals).

Request counts and latencies are recorded by the HTTP layer; queue depth, running sequences,
token counters and throughput are read from the scheduler when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mistral7b.scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class SchedulerCollector(Collector):
    """Reads the scheduler's live figures at scrape time (nothing while the model loads)."""

    def __init__(self, get_scheduler: Callable[[], Scheduler | None]) -> None:
        self.get_scheduler = get_scheduler

    def collect(self) -> Iterator[Metric]:
        s = self.get_scheduler()
        if s is None:
            return
        yield GaugeMetricFamily("mistral7b_queue_depth", "Requests waiting for a cache row",
                                value=s.queue_depth)
        yield GaugeMetricFamily("mistral7b_running_sequences",
                                "Sequences holding a cache row", value=s.running)
        yield GaugeMetricFamily("mistral7b_max_concurrency", "Cache rows",
                                value=s.max_concurrency)
        yield GaugeMetricFamily("mistral7b_generation_tokens_per_second",
                                "Generated tokens per second over the last 10 s",
                                value=s.throughput())
        yield CounterMetricFamily("mistral7b_prompt_tokens", "Prompt tokens pre-filled",
                                  value=s.prompt_tokens)
        yield CounterMetricFamily("mistral7b_prefix_cache_hit_tokens",
                                  "Prompt tokens taken from the prefix cache instead of computed",
                                  value=s.cached_tokens)
        yield CounterMetricFamily("mistral7b_spec_draft_tokens",
                                  "Speculative draft tokens proposed (--speculate, --draft-model)",
                                  value=s.stats.draft_tokens)
        yield CounterMetricFamily("mistral7b_spec_accepted_tokens",
                                  "Speculative draft tokens accepted",
                                  value=s.stats.accepted_tokens)
        yield CounterMetricFamily("mistral7b_preemptions",
                                  "Sequences preempted when the KV cache ran out (re-filled)",
                                  value=s.preemptions)
        pool = s.pool
        yield GaugeMetricFamily("mistral7b_kv_cache_budget_bytes",
                                "The KV cache's budget (--kv-cache-memory)", value=pool.nbytes)
        yield GaugeMetricFamily("mistral7b_kv_cache_used_bytes",
                                "KV blocks held by sequences or kept as cached prefixes",
                                value=pool.used_bytes)
        yield GaugeMetricFamily("mistral7b_kv_cache_prefix_bytes",
                                "KV blocks kept only as cached prefixes (reclaimable)",
                                value=pool.cached_bytes)
        yield CounterMetricFamily("mistral7b_generation_tokens", "Tokens generated",
                                  value=s.generated_tokens)
        yield CounterMetricFamily("mistral7b_model_steps", "Forward steps run", value=s.steps)
        yield CounterMetricFamily("mistral7b_failed_requests",
                                  "Requests failed by the scheduler (timeout, shutdown, model)",
                                  value=s.failed)


class Metrics:
    def __init__(self, get_scheduler: Callable[[], Scheduler | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mistral7b_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "mistral7b_time_to_first_token_seconds",
            "From request arrival to its first generated token", buckets=_LATENCY_BUCKETS,
            registry=self.registry)
        self.request_seconds = Histogram(
            "mistral7b_request_duration_seconds", "From arrival to the last token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("mistral7b_request_finish", "Finished generations by outcome",
                                ["reason"], registry=self.registry)
        self.registry.register(SchedulerCollector(get_scheduler))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
