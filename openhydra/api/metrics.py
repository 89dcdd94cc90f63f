"""Prometheus metrics for the HTTP API, on a registry per app (tests run several apps per process).

``exposition()`` also appends the node-wide registry of openhydra/metrics.py (pipeline hops, failovers,
peer steps, ledger); verification, privacy and settlement providers add theirs in routes_public.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from openhydra.metrics import METRICS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "openhydra_http_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "openhydra_http_request_duration_seconds", "HTTP request latency (to the last byte for streams)",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens_generated = Counter(
            "openhydra_tokens_generated_total", "Completion tokens generated", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "openhydra_prompt_tokens_total", "Prompt tokens processed", ["model"], registry=r
        )
        self.ttft = Histogram(
            "openhydra_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.stream_errors = Counter(
            "openhydra_stream_errors_total", "Streams ended by an error after they started", ["route"], registry=r
        )
        self.client_disconnects = Counter(
            "openhydra_client_disconnects_total", "Streams whose client went away before the end", ["route"],
            registry=r,
        )
        self.active_sessions = Gauge("openhydra_active_sessions", "Generation sessions in flight", registry=r)
        self.queued_requests = Gauge("openhydra_queued_requests", "Requests waiting for a generation slot",
                                     registry=r)
        self.ready = Gauge("openhydra_ready", "1 when the node can serve its model", registry=r)
        self.rate_limited = Counter(
            "openhydra_rate_limited_total", "Requests refused with 429", registry=r
        )

    def observe_generation(self, model: str, prompt_tokens: int, completion_tokens: int,
                           ttft_s: float | None) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.tokens_generated.labels(model).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + METRICS.text()
