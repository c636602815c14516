"""Prometheus metrics of one server instance, in a registry of its own (never the process-global one)."""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Latency buckets in seconds: TTFT spans a CPU prefill (seconds) down to a GPU one (milliseconds).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineGauges(Collector):
    """Reads the engine's live numbers at scrape time, so they are never stale."""

    def __init__(self, read_stats: Callable[[], object | None]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._read_stats()
        gauges = {
            "jaxserve_num_requests_running": ("Requests in the running batch", "num_running"),
            "jaxserve_num_requests_waiting": ("Requests waiting to be scheduled", "num_waiting"),
            "jaxserve_kv_pages_used": ("KV cache pages in use", "kv_pages_used"),
            "jaxserve_kv_pages_total": ("KV cache pages in the pool", "kv_pages_total"),
            "jaxserve_kv_pages_cached": ("KV cache pages held only by the prefix cache (reusable, evictable)",
                                         "kv_pages_cached"),
            "jaxserve_programs_compiling": (
                "Engines still compiling step programs in the background (serving meanwhile; steps use ready buckets)",
                "num_program_sets_compiling"),
            "jaxserve_num_requests_queued": (
                "Requests admitted but not yet producing output (compiling a constraint, queued, prefilling)",
                "num_queued"),
        }
        for name, (doc, attr) in gauges.items():
            family = GaugeMetricFamily(name, doc)
            if stats is not None:
                family.add_metric([], float(getattr(stats, attr)))
            yield family
        # Requests whose constraint did not fit the device grammar tables and advanced on the host (their
        # steps are synchronous: a sign to raise grammar_class_map_slots / grammar_next_capacity).
        counter = CounterMetricFamily(
            "jaxserve_constrained_host_advance_requests",
            "Constrained requests whose grammar advanced on the host (device grammar tables full)",
        )
        if stats is not None:
            counter.add_metric([], float(getattr(stats, "num_constrained_host_advance_total", 0)))
        yield counter
        counters = {
            "jaxserve_failed_requests": ("Requests the engine ended with an error (the others went on)",
                                         "num_failed_requests_total"),
            "jaxserve_constraint_cache_hits": ("Constraints answered from the compiled-grammar cache",
                                               "num_constraint_cache_hits_total"),
            "jaxserve_constraint_compiles": ("Constraint compiles started", "num_constraint_compiles_total"),
            "jaxserve_constrained_host_matcher_requests": (
                "Constrained requests driven by the host matcher (constraints the device tables cannot hold)",
                "num_constrained_host_matcher_total"),
            "jaxserve_constrained_host_matcher_seconds": (
                "Host time the host matcher's masks took (steps are synchronous while one runs)",
                "host_matcher_seconds_total"),
            "jaxserve_prefix_cache_query_tokens": ("Prompt tokens looked up in the prefix cache",
                                                   "num_prefix_query_tokens_total"),
            "jaxserve_prefix_cache_hit_tokens": ("Prompt tokens whose KV came from the prefix cache",
                                                 "num_prefix_hit_tokens_total"),
            "jaxserve_prefix_cache_evicted_pages": ("Pages evicted from the prefix cache",
                                                    "num_prefix_evicted_pages_total"),
            "jaxserve_constraints_too_complex": ("Constraints refused by the compile budget (HTTP 400)",
                                                 "num_constraints_too_complex_total"),
        }
        for name, (doc, attr) in counters.items():
            family = CounterMetricFamily(name, doc)
            if stats is not None:
                family.add_metric([], float(getattr(stats, attr, 0)))
            yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class ServerMetrics:
    def __init__(self, read_stats: Callable[[], object | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jaxserve_requests", "Finished HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "jaxserve_time_to_first_token_seconds", "Time to first token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "jaxserve_inter_token_latency_seconds",
            "Time between consecutive engine outputs of a request, per token",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jaxserve_request_latency_seconds", "End-to-end latency of a generation", buckets=_E2E_BUCKETS, registry=r
        )
        r.register(_EngineGauges(read_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Feeds TTFT / inter-token latency of one generation into the histograms as outputs arrive."""

    def __init__(self, metrics: ServerMetrics, start: float) -> None:
        self._metrics = metrics
        self._start = start
        self._last: float | None = None

    def on_output(self, now: float, new_tokens: int) -> None:
        if new_tokens <= 0:
            return
        if self._last is None:
            self._metrics.ttft.observe(now - self._start)
        else:
            # One engine output may carry several tokens (e.g. n > 1): spread the gap over them.
            per_token = (now - self._last) / new_tokens
            for _ in range(new_tokens):
                self._metrics.itl.observe(per_token)
        self._metrics.generation_tokens.inc(new_tokens)
        self._last = now

    def on_finish(self, now: float) -> None:
        self._metrics.e2e.observe(now - self._start)
