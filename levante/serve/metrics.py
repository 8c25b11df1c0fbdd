"""Prometheus metrics for /metrics, one registry per app (so tests can run several).

Every series carries `model_name` (vLLM's label): the served model it counts, adapters under
their base model. Per-model gauges are read from the router at each scrape.
"""
from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from levante.errors import LevanteError
from levante.kernels import native

def cpu_kernels() -> str:
    """The CPU kernels' variant, as /health, /metrics and the start-up line report it."""
    try:
        return native.variant()
    except LevanteError:  # LEVANTE_CPU_ISA names one this CPU cannot run: the model load said so
        return "none"


from levante.engine.data_parallel import ReplicaSet

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MODEL = ["model_name"]
_TOOL_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("levante_num_requests_running", "Sequences being computed", MODEL, registry=registry)
        self.waiting = Gauge("levante_num_requests_waiting", "Sequences waiting for the scheduler", MODEL,
                             registry=registry)
        self.admitted = Gauge("levante_num_sequences_admitted", "Sequences admitted by the server and not yet "
                              "done (running, waiting, or being planned)", MODEL, registry=registry)
        self.kv_usage = Gauge("levante_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", MODEL,
                              registry=registry)
        self.cpu_kernels = Info("levante_cpu_kernels", "The native CPU kernels' variant in use (avx512, avx2, "
                                "avx2-vnni, neon; scalar: PyTorch's kernels)", registry=registry)
        self.loaded = Gauge("levante_model_loaded", "1 while the model is loaded, else 0", MODEL, registry=registry)
        self.memory = Gauge("levante_model_memory_bytes", "Memory the loaded model holds (weights, KV cache)", MODEL,
                            registry=registry)
        self.model_events = Counter("levante_model_events", "Loads, failed loads, unloads, sleeps and wakes of "
                                    "each model",
                                    MODEL + ["event"], registry=registry)
        self.load_seconds = Histogram("levante_model_load_seconds", "Time to load a model (warm-up included)", MODEL,
                                      buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=registry)
        self.wake_seconds = Histogram("levante_model_wake_seconds", "Time to wake a sleeping model (POST /sleep, "
                                      "--sleep-after) for the request that found it asleep", MODEL,
                                      buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=registry)
        self.prompt_tokens = Counter("levante_prompt_tokens", "Prompt tokens processed", MODEL, registry=registry)
        self.generation_tokens = Counter("levante_generation_tokens", "Tokens generated", MODEL, registry=registry)
        self.requests = Counter("levante_requests", "Finished requests by reason", MODEL + ["finish_reason"],
                                registry=registry)
        self.ttft = Histogram("levante_time_to_first_token_seconds", "Time to first token", MODEL,
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.mcp_tools_registered = Gauge("levante_mcp_tools_registered", "MCP tools the connected servers offer",
                                          registry=registry)
        self.mcp_tools_offered = Histogram("levante_mcp_tools_offered", "MCP tools offered to the model per "
                                           "request (the most relevant, when they exceed --mcp-max-tools or a "
                                           "share of the context)", buckets=_TOOL_COUNT_BUCKETS, registry=registry)
        self.mcp_tool_calls = Counter("levante_mcp_tool_calls", "MCP tool calls by outcome (ok, error, or repeat: "
                                      "answered from an identical earlier call)", ["outcome"], registry=registry)
        self.itl = Histogram("levante_inter_token_latency_seconds", "Time between generated tokens", MODEL,
                             buckets=_LATENCY_BUCKETS, registry=registry)
        # Speculative decoding, read from the engine's Speculator (names as vLLM's spec_decode counters).
        self.spec_counters = {
            name: Counter(f"levante_spec_decode_{name}", doc, MODEL, registry=registry)
            for name, doc in (("num_drafts", "Sequence-steps that checked proposed tokens"),
                              ("num_draft_tokens", "Proposed tokens checked by the target model"),
                              ("num_accepted_tokens", "Proposed tokens accepted"))}
        self._spec_seen: dict[str, tuple[weakref.ref, dict[str, int]]] = {}  # model -> (its speculator, counts read)
        self.replicas = _ReplicaMetrics(registry)

    def model_changed(self, served, event: str) -> None:
        """The router's report: model `served` was loaded, failed to load, unloaded, put to sleep or woken."""
        self.model_events.labels(served.name, event).inc()
        if event == "loaded" and served.load_seconds:
            self.load_seconds.labels(served.name).observe(served.load_seconds)
        if event == "woken" and served.wake_seconds is not None:
            self.wake_seconds.labels(served.name).observe(served.wake_seconds)

    def render(self, models) -> bytes:
        """The exposition text, with the gauges of `models` (the router's ServedModels) read now."""
        self.cpu_kernels.info({"variant": cpu_kernels()})
        for served in models:
            llm = served.llm  # read once: the model may be unloaded meanwhile
            name, engine = served.name, llm.engine if llm is not None else None
            self.loaded.labels(name).set(served.status == "loaded")
            self.memory.labels(name).set(served.memory_bytes if served.status == "loaded" else 0)
            self.admitted.labels(name).set(served.in_flight)
            if served.spec.task != "generate":
                continue
            replica_set = served.loop if isinstance(served.loop, ReplicaSet) else None
            if replica_set is not None:  # data parallel: per replica, and the sums
                self.replicas.render(name, replica_set)
                stats = replica_set.stats
                self.running.labels(name).set(sum(s.running for s in stats))
                self.waiting.labels(name).set(sum(s.waiting for s in stats))
                views = [v for v in replica_set.router.replicas if v.up]
                self.kv_usage.labels(name).set(sum(v.kv_usage for v in views) / max(1, len(views)))
                continue
            scheduler = engine.scheduler if engine is not None else None
            self.running.labels(name).set(len(scheduler.running) if scheduler else 0)
            self.waiting.labels(name).set(len(scheduler.waiting) if scheduler else 0)
            self.kv_usage.labels(name).set(engine.block_manager.usage() if engine is not None else 0)
            if engine is not None and engine.speculator is not None:
                self._count_speculation(name, engine.speculator)
        return generate_latest(self.registry)

    def _count_speculation(self, model: str, speculator) -> None:
        """The counters move by what the engine counted since the last render (from 0 for an engine
        loaded since: a model unloaded and loaded again)."""
        seen_by, seen = self._spec_seen.get(model, (None, {}))
        if seen_by is None or seen_by() is not speculator:
            seen = {}
        for name, counter in self.spec_counters.items():
            total = getattr(speculator, name)
            counter.labels(model).inc(total - seen.get(name, 0))
            seen[name] = total
        self._spec_seen[model] = (weakref.ref(speculator), seen)


class _ReplicaMetrics:
    """Data-parallel replicas (engine/data_parallel.py), each series labelled with its `replica`: state and
    load read at each scrape, counters moved by what the ReplicaSet counted since the last one."""

    COUNTED = ("prompt_tokens", "cached_tokens", "rerouted", "failed", "restarts")

    def __init__(self, registry):
        labels = MODEL + ["replica"]
        self.up = Gauge("levante_replica_up", "1 while the data-parallel replica serves, else 0", labels,
                        registry=registry)
        self.in_flight = Gauge("levante_replica_requests_in_flight", "Requests routed to the replica and not "
                               "yet done (its queue depth)", labels, registry=registry)
        self.running = Gauge("levante_replica_num_requests_running", "Sequences the replica computes", labels,
                             registry=registry)
        self.waiting = Gauge("levante_replica_num_requests_waiting", "Sequences waiting on the replica", labels,
                             registry=registry)
        self.kv_usage = Gauge("levante_replica_kv_cache_usage_ratio", "Fraction of the replica's KV-cache blocks "
                              "in use", labels, registry=registry)
        self.routed = Counter("levante_replica_routed", "Requests routed to the replica, by reason (prefix: the "
                              "longest cached prefix; load: the least loaded; round-robin)", labels + ["reason"],
                              registry=registry)
        docs = {"prompt_tokens": "Prompt tokens the replica was given",
                "cached_tokens": "Prompt tokens the replica's prefix cache held (prefix-cache hits)",
                "rerouted": "Requests the replica lost before they produced output, run on another",
                "failed": "Requests the replica lost mid-output (ended with an error)",
                "restarts": "Times the replica was restarted after its process died"}
        self.counters = {name: Counter(f"levante_replica_{name}", docs[name], labels, registry=registry)
                         for name in self.COUNTED}
        self._seen: dict[str, tuple[weakref.ref, dict]] = {}  # model -> (its ReplicaSet, totals read)

    def render(self, model: str, replica_set: ReplicaSet) -> None:
        """Counters move from 0 for a ReplicaSet made since the last render (the model unloaded and loaded again)."""
        owner, seen = self._seen.get(model, (None, {}))
        if owner is None or owner() is not replica_set:
            seen = {}
        self._seen[model] = (weakref.ref(replica_set), seen)
        for index, (stats, view) in enumerate(zip(replica_set.stats, replica_set.router.replicas)):
            replica = str(index)
            self.up.labels(model, replica).set(stats.up)
            self.in_flight.labels(model, replica).set(max(0, view.in_flight) if stats.up else 0)
            self.running.labels(model, replica).set(stats.running)
            self.waiting.labels(model, replica).set(stats.waiting)
            self.kv_usage.labels(model, replica).set(view.kv_usage)
            for reason, count in list(stats.routed.items()):
                _move(self.routed.labels(model, replica, reason), seen, (replica, reason), count)
            for name, counter in self.counters.items():
                _move(counter.labels(model, replica), seen, (replica, name), getattr(stats, name))


def _move(counter, seen: dict, key: tuple, total: float) -> None:
    counter.inc(total - seen.get(key, 0))
    seen[key] = total
