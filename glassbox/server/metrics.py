"""Prometheus metrics, named like vLLM's with a `glassbox:` prefix. One registry per app (no globals).

Gauges and the prefix-cache counters come from the engine's stats, read on its loop thread at scrape time
(`render(stats)`); token counters and latency histograms are fed as requests finish.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from glassbox.engine.llm_engine import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.stats: dict | None = None  # LLMEngine.stats() of the scrape being rendered

    def collect(self) -> Iterator[object]:
        stats = self.stats
        if stats is None:  # prometheus_client's describe-time call, before any scrape
            return
        prefix = stats["prefix_cache"]
        yield GaugeMetricFamily("glassbox:num_requests_running", "Requests in the running batch.", stats["num_running"])
        yield GaugeMetricFamily("glassbox:num_requests_waiting", "Requests waiting to be scheduled.", stats["num_waiting"])
        yield GaugeMetricFamily("glassbox:kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1).", stats["kv_cache_usage"])
        yield CounterMetricFamily("glassbox:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", prefix["queried_tokens"])
        yield CounterMetricFamily("glassbox:prefix_cache_hits", "Prompt tokens found in the prefix cache.", prefix["hit_tokens"])
        yield CounterMetricFamily("glassbox:num_preemptions", "Sequences preempted for lack of KV blocks.", stats["num_preemptions"])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._engine_stats = _EngineCollector()
        self.registry.register(self._engine_stats)
        r = self.registry
        self.prompt_tokens = Counter("glassbox:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("glassbox:generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "glassbox:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token = Histogram(
            "glassbox:inter_token_latency_seconds", "Time between output tokens.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "glassbox:e2e_request_latency_seconds", "Request latency, arrival to finish.", buckets=_LATENCY_BUCKETS, registry=r
        )

    def observe(self, out: RequestOutput) -> None:
        """Record a finished request."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        t = out.timings
        if t.get("ttft_ms") is not None:
            self.ttft.observe(t["ttft_ms"] / 1000)
        if t.get("decode_ms_per_token") is not None:
            self.inter_token.observe(t["decode_ms_per_token"] / 1000)
        if t.get("total_ms") is not None:
            self.e2e.observe(t["total_ms"] / 1000)

    def render(self, engine_stats: dict) -> bytes:
        """The Prometheus text for one scrape; `engine_stats` is LLMEngine.stats() read for it."""
        self._engine_stats.stats = engine_stats  # no await until rendered: one scrape at a time
        return generate_latest(self.registry)
