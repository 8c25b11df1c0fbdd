"""Prometheus metrics for /metrics, one registry per app (so tests can run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOOL_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        self.mcp_tools_registered = Gauge("levante_mcp_tools_registered", "MCP tools the connected servers offer",
                                          registry=registry)
        self.mcp_tools_offered = Histogram("levante_mcp_tools_offered", "MCP tools offered to the model per "
                                           "request (the most relevant, when they exceed --mcp-max-tools or a "
                                           "share of the context)", buckets=_TOOL_COUNT_BUCKETS, registry=registry)
        self.mcp_tool_calls = Counter("levante_mcp_tool_calls", "MCP tool calls by outcome (ok, error, or repeat: "
                                      "answered from an identical earlier call)", ["outcome"], registry=registry)
        self.itl = Histogram("levante_inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        # Speculative decoding, read from the engine's Speculator (names as vLLM's spec_decode counters).
        self.spec_counters = {
            name: Counter(f"levante_spec_decode_{name}", doc, registry=registry)
            for name, doc in (("num_drafts", "Sequence-steps that checked proposed tokens"),
                              ("num_draft_tokens", "Proposed tokens checked by the target model"),
                              ("num_accepted_tokens", "Proposed tokens accepted"))}
        self._spec_seen = dict.fromkeys(self.spec_counters, 0)

    def render(self, engine, admitted: int = 0) -> bytes:
        self.admitted.set(admitted)
        if engine is not None:
            scheduler = engine.scheduler
            self.running.set(len(scheduler.running))
            self.waiting.set(len(scheduler.waiting))
            self.kv_usage.set(engine.block_manager.usage())
            if engine.speculator is not None:
                self._count_speculation(engine.speculator)
        return generate_latest(self.registry)

    def _count_speculation(self, speculator) -> None:
        """The counters move by what the engine counted since the last render."""
        for name, counter in self.spec_counters.items():
            total = getattr(speculator, name)
            counter.inc(total - self._spec_seen[name])
            self._spec_seen[name] = total
