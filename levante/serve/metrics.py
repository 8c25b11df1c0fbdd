"""Prometheus metrics for /metrics, one registry per app (so tests can run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("levante_num_requests_running", "Sequences being computed", registry=registry)
        self.waiting = Gauge("levante_num_requests_waiting", "Sequences waiting for the scheduler",
                             registry=registry)
        self.admitted = Gauge("levante_num_sequences_admitted", "Sequences admitted by the server and not yet "
                              "done (running, waiting, or being planned)", registry=registry)
        self.kv_usage = Gauge("levante_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                              registry=registry)
        self.prompt_tokens = Counter("levante_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generation_tokens = Counter("levante_generation_tokens", "Tokens generated", registry=registry)
        self.requests = Counter("levante_requests", "Finished requests by reason", ["finish_reason"],
                                registry=registry)
        self.ttft = Histogram("levante_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("levante_inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_LATENCY_BUCKETS, registry=registry)

    def render(self, engine, admitted: int = 0) -> bytes:
        self.admitted.set(admitted)
        if engine is not None:
            scheduler = engine.scheduler
            self.running.set(len(scheduler.running))
            self.waiting.set(len(scheduler.waiting))
            self.kv_usage.set(engine.block_manager.usage())
        return generate_latest(self.registry)
