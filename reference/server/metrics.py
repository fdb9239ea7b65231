"""The server's Prometheus metrics, in a registry of its own (so two servers in one process never collide).

    nano_vllm_requests_total{outcome}          generation requests (completions and chat) by how they ended
    nano_vllm_prompt_tokens_total              prompt tokens of admitted requests
    nano_vllm_generation_tokens_total          tokens generated (aborted requests' tokens included)
    nano_vllm_engine_steps_total               engine steps run
    nano_vllm_time_to_first_token_seconds      histograms over finished requests (engine clock: from
    nano_vllm_time_per_output_token_seconds      admission into the engine)
    nano_vllm_e2e_request_latency_seconds
    nano_vllm_queue_time_seconds
    nano_vllm_num_requests_running / _waiting  requests the scheduler runs / that wait for a seat
    nano_vllm_num_requests_in_flight           HTTP generation requests accepted and not yet answered
    nano_vllm_kv_blocks_in_use / _total        KV blocks held by live sequences / in the cache

Outcomes: success, aborted (the client went away), timeout, rejected (429: queue full), invalid (400/404/422),
unauthorized (401), shutdown (503), error (500).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..outputs import RequestMetrics

OUTCOMES = ("success", "aborted", "timeout", "rejected", "invalid", "unauthorized", "shutdown", "error")
# From a fast GPU decode step (~ms) to a long CPU request (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("nano_vllm_requests", "Generation requests by outcome", ["outcome"],
                                registry=registry)
        for outcome in OUTCOMES:  # every outcome appears from the start, at 0
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("nano_vllm_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=registry)
        self.generation_tokens = Counter("nano_vllm_generation_tokens", "Tokens generated", registry=registry)
        self.engine_steps = Counter("nano_vllm_engine_steps", "Engine steps run", registry=registry)
        self.ttft = Histogram("nano_vllm_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("nano_vllm_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("nano_vllm_e2e_request_latency_seconds", "Request latency, admission to finish",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram("nano_vllm_queue_time_seconds", "Admission to first scheduled",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.running = Gauge("nano_vllm_num_requests_running", "Requests the scheduler is running",
                             registry=registry)
        self.waiting = Gauge("nano_vllm_num_requests_waiting", "Requests waiting for a seat", registry=registry)
        self.in_flight = Gauge("nano_vllm_num_requests_in_flight", "HTTP generation requests not yet answered",
                               registry=registry)
        self.kv_blocks_in_use = Gauge("nano_vllm_kv_blocks_in_use", "KV blocks held by live sequences",
                                      registry=registry)
        self.kv_blocks_total = Gauge("nano_vllm_kv_blocks_total", "KV blocks in the cache", registry=registry)

    def count(self, outcome: str) -> None:
        assert outcome in OUTCOMES, outcome
        self.requests.labels(outcome).inc()

    def observe_finished(self, metrics: RequestMetrics) -> None:
        for histogram, value in ((self.ttft, metrics.ttft), (self.tpot, metrics.tpot),
                                 (self.e2e, metrics.e2e_latency), (self.queue_time, metrics.queue_time)):
            if value is not None:
                histogram.observe(value)

    def set_engine_stats(self, stats) -> None:
        """stats: an engine_thread.EngineStats."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_blocks_in_use.set(stats.kv_blocks_in_use)
        self.kv_blocks_total.set(stats.kv_blocks_total)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
