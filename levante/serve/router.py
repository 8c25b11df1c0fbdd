"""Several models behind one server: a request's `model` routed to what serves it, models loaded on
first use and unloaded when idle or when room is needed (llama.cpp's router mode, llama-swap).

    ModelRouter.use(name) -> Route (the name to report, the ServedModel, the LoRA adapter)
        loaded:    held for the request; a held model is never unloaded
        unloaded:  loaded by the one loader thread (one load at a time) while its requests wait,
                   up to --model-load-timeout seconds (then 503 with Retry-After)
        failed:    its requests fail at once (503, saying why) for FAILED_RETRY_SECONDS, then it is
                   tried again (at once through POST /models/load); the other models keep serving

Room: before a load, the least recently used idle models (held by no request, awaited by none)
are unloaded until the new one fits within --max-loaded-models and --models-memory-gb (its size
as measured when it was last loaded, else its weight files plus its KV-cache budget); with none
idle, the load waits for one. Models idle for --model-idle-timeout seconds are unloaded. Pinned
models (--embedding-model, models handed over loaded) stay, and count toward the memory budget only.

The state sits under one lock (a condition) shared by the event loops that serve requests (the
OpenAI port and the MCP port each run one), the loader thread and the idle watcher; loading and
unloading themselves run outside it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from levante.engine.loop import EngineLoop
from levante.errors import InvalidRequest, LevanteError, ModelBusy, ModelNotFound, ServiceUnavailable
from levante.serve.embeddings import EmbeddingService
from levante.serve.model_specs import DEFAULT_LOAD_TIMEOUT, ModelSpec, check_names

logger = logging.getLogger("levante")

FAILED_RETRY_SECONDS = 30.0
GIB = 1 << 30


def load_llm(spec: ModelSpec):
    """How a model loads by default: `LLM.from_engine_args` (weights, KV cache, warm-up). The
    structured-output tokenizer is built by the first constrained request (serve/pipeline.py)."""
    args = spec.args  # replicas when asked for (a backend named: even one, e.g. to measure the overhead)
    if (args.data_parallel_size != 1 or args.distributed_executor_backend) and not spec.embedding:
        from levante.engine.front import DataParallelLLM

        return DataParallelLLM(args)
    from levante import LLM

    return LLM.from_engine_args(dataclasses.replace(args, data_parallel_size=1, distributed_executor_backend=None))


class ServedModel:
    """One model of the server: its spec and, while loaded, its LLM with its engine loop (a chat
    model) or its embedding service."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.status = "unloaded"  # unloaded | loading | loaded | failed
        self.failure: str | None = None
        self.failed_at = 0.0
        self.llm = None
        self.loop: EngineLoop | None = None
        self.embeddings: EmbeddingService | None = None
        self.loading: Future | None = None
        self.users = 0  # requests holding it
        self.waiting = 0  # requests waiting for it to load
        self.in_flight = 0  # sequences admitted and not yet done (serve/pipeline.py)
        self.last_used = 0.0
        self.memory_bytes = 0  # as measured at its last load
        self.load_seconds: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def idle(self) -> bool:
        return self.status == "loaded" and not self.spec.pinned and not self.users and not self.waiting

    def health(self) -> dict:
        problem = self.loop.problem if self.loop is not None else None
        replicas = self.loop.health() if hasattr(self.loop, "health") else {}  # data parallel: replicas up
        if problem:
            return {"status": "unhealthy", "reason": problem, **replicas}
        return {"status": self.status, **({"reason": self.failure} if self.status == "failed" else {}), **replicas}

    def cards(self) -> list[dict]:
        """Its /v1/models entries: the model (with `status`), then its LoRA adapters."""
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "levante", "status": self.status}
        if self.embeddings is not None:
            card.update(self.embeddings.card(), status=self.status)
        elif self.spec.embedding:
            card["type"] = "embedding"
        else:
            card["type"] = "chat"
            if self.llm is not None:
                card["max_model_len"] = self.llm.engine.max_model_len
                card["input_modalities"] = input_modalities(self.llm)
        adapters = [{"id": name, "object": "model", "created": 0, "owned_by": "levante", "parent": self.name,
                     "root": str(path), "status": self.status} for name, path in dict(self.spec.adapters).items()]
        return [card, *adapters]


def input_modalities(llm) -> list[str]:
    """What a chat model's messages may carry: text, and images (and audio) for models with a processor."""
    processor = llm.engine.processor
    if processor is None:
        return ["text"]
    return ["text", "image"] + (["audio"] if getattr(processor, "takes_audio", False) else [])


@dataclass
class Route:
    """What a request runs on: the name its responses report (the model or adapter it named), the
    model, and the LoRA adapter to apply (None: the base model)."""
    name: str
    model: ServedModel
    lora: str | None = None

    @property
    def llm(self):
        return self.model.llm

    @property
    def loop(self) -> EngineLoop:
        return self.model.loop


class ModelRouter:
    def __init__(self, specs: list[ModelSpec] = (), max_loaded: int | None = None, memory_gb: float | None = None,
                 idle_timeout: float | None = None, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
                 load: Callable[[ModelSpec], object] = load_llm, on_change: Callable | None = None):
        if max_loaded is not None and max_loaded < 1:
            raise InvalidRequest("--max-loaded-models: must be 1 or more")
        self.models: dict[str, ServedModel] = {}
        self.max_loaded = max_loaded
        self.memory_budget = None if memory_gb is None else int(memory_gb * GIB)
        self.idle_timeout, self.load_timeout = idle_timeout, load_timeout
        self._load_llm = load
        self.on_change = on_change or (lambda model, event: None)  # (ServedModel, "loaded"|"failed"|"unloaded")
        self._lock = threading.Condition()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="levante-model-load")
        self._closed = False
        self._watcher: threading.Thread | None = None
        for spec in specs:
            self.add(spec)

    @classmethod
    def from_cli_args(cls, args, specs: list[ModelSpec]) -> ModelRouter:
        return cls(specs, args.max_loaded_models, args.models_memory_gb, args.model_idle_timeout,
                   args.model_load_timeout)

    # -- what is served ----------------------------------------------------------------------------
    def add(self, spec: ModelSpec, llm=None) -> ServedModel:
        """Offer `spec`; with `llm`, as loaded already (pinned: there is nothing to load it again from)."""
        with self._lock:
            check_names([m.spec for m in self.models.values()] + [spec])
            served = self.models[spec.name] = ServedModel(spec)
        if llm is not None:
            self._publish(served, llm, 0.0)
        return served

    @property
    def default(self) -> ServedModel | None:
        return next(iter(self.models.values()), None)

    def names(self) -> list[str]:
        return [name for m in self.models.values() for name in (m.name, *m.spec.adapters)]

    def loaded(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.status == "loaded"]

    def resolve(self, name: str | None, embedding: bool = False) -> tuple[ServedModel, str | None]:
        """The one place a request's `model` is mapped to what serves it: (model, LoRA adapter or None).
        No name: the first model of the kind asked for."""
        if not self.models:
            raise ServiceUnavailable("the model is still loading; retry when /health answers 200", retry_after=1)
        if not name:
            served = next((m for m in self.models.values() if m.spec.embedding == embedding), None)
            if served is None:
                raise InvalidRequest(self._wrong_kind(self.default, embedding))
            return served, None
        served, lora = self.models.get(name), None
        if served is None:
            served = next((m for m in self.models.values() if name in m.spec.adapters), None)
            lora = name
        if served is None:
            raise ModelNotFound(f"model '{name}' is not served here; this server serves '{', '.join(self.names())}'")
        if served.spec.embedding != embedding:
            raise InvalidRequest(self._wrong_kind(served, embedding))
        return served, lora

    def _wrong_kind(self, served: ServedModel, embedding: bool) -> str:
        if embedding:
            other = next((m.name for m in self.models.values() if m.spec.embedding), None)
            return (f"'{served.name}' is a chat model; embeddings come from '{other}'" if other else
                    f"'{served.name}' is not an embedding model, and no embedding model is served (start the "
                    "server with --embedding-model)")
        has_chat = any(not m.spec.embedding for m in self.models.values())
        return f"'{served.name}' is an embedding model: it serves /v1/embeddings only" + (
            "" if has_chat else " (start the server with a chat model to generate)")

    # -- holding a model for a request -------------------------------------------------------------
    @asynccontextmanager
    async def use(self, name: str | None, embedding: bool = False) -> AsyncIterator[Route]:
        """Hold the model `name` routes to (loading it first, if need be) while the block runs."""
        served, lora = self.resolve(name, embedding)
        await self.hold(served)
        try:
            yield Route(name or served.name, served, lora)
        finally:
            self.release(served)

    async def hold(self, served: ServedModel, retry_failed: bool = False) -> None:
        deadline = time.monotonic() + self.load_timeout
        with self._lock:
            served.waiting += 1
        try:
            while True:
                with self._lock:
                    if served.status == "loaded":
                        served.users += 1
                        served.last_used = time.monotonic()
                        return
                    future = self._start_loading(served, retry_failed)
                await _wait(served, future, deadline)
        finally:
            with self._lock:
                served.waiting -= 1
                self._lock.notify_all()

    def hold_if_loaded(self, served: ServedModel) -> bool:
        """Hold `served` if it is loaded (True), without loading it."""
        with self._lock:
            if served.status != "loaded":
                return False
            served.users += 1
            return True

    def release(self, served: ServedModel) -> None:
        with self._lock:
            served.users -= 1
            served.last_used = time.monotonic()
            self._lock.notify_all()  # a load waiting for room, or the idle watcher, may act now

    # -- loading -----------------------------------------------------------------------------------
    def start_loading(self, name: str) -> Future:
        """Load model `name` (if it is not loaded or loading) without holding it: what `levante serve`
        does for its default model at start; the future ends when it is loaded."""
        with self._lock:
            served = self.models[name]
            if served.status == "loaded":
                future = Future()
                future.set_result(None)
                return future
            return self._start_loading(served, retry_failed=True)

    def _start_loading(self, served: ServedModel, retry_failed: bool) -> Future:
        if served.loading is not None:
            return served.loading
        if self._closed:
            raise ServiceUnavailable("the server is shutting down")
        if served.status == "failed" and not retry_failed:
            wait = FAILED_RETRY_SECONDS - (time.monotonic() - served.failed_at)
            if wait > 0:
                raise ServiceUnavailable(f"model '{served.name}' could not be loaded: {served.failure}",
                                         retry_after=max(1, round(wait)))
        served.status = "loading"
        served.loading = self._loader.submit(self._load, served)
        return served.loading

    def _load(self, served: ServedModel) -> None:
        """The loader thread: make room, load, publish; a failure fails this model's requests only."""
        started = time.monotonic()
        try:
            self._make_room(served)
            logger.warning("levante: loading model '%s'", served.name)
            llm = self._load_llm(served.spec)
        except _NoRoom as e:
            with self._lock:
                served.status, served.loading = "unloaded", None
                self._lock.notify_all()
            raise ServiceUnavailable(str(e), retry_after=5) from None
        except Exception as e:  # noqa: BLE001 - any failure fails this model's requests, with one line
            reason = str(e) if isinstance(e, LevanteError) else f"internal error: {type(e).__name__}: {e}"
            logger.warning("levante: model '%s' could not be loaded: %s", served.name, reason)
            with self._lock:
                served.status, served.failure, served.failed_at, served.loading = \
                    "failed", reason, time.monotonic(), None
                self._lock.notify_all()
            self.on_change(served, "failed")
            raise ServiceUnavailable(f"model '{served.name}' could not be loaded: {reason}",
                                     retry_after=round(FAILED_RETRY_SECONDS)) from None
        self._publish(served, llm, time.monotonic() - started)
        logger.warning("levante: model '%s' loaded (%.1f s)", served.name, served.load_seconds)

    def _publish(self, served: ServedModel, llm, seconds: float) -> None:
        # A data-parallel model brings its own loop (engine/data_parallel.py's ReplicaSet).
        loop = getattr(llm, "loop", None) or (EngineLoop(llm.engine) if llm.engine is not None else None)
        if loop is not None:
            # what the engine holds (a model handed over loaded may bring adapters of its own)
            served.spec.args.lora = {name: str(a.path) for name, a in llm.engine.lora.loaded.items()}
        embeddings = EmbeddingService(llm, served.name) if llm.is_embedding_model else None
        with self._lock:
            served.llm, served.loop, served.embeddings = llm, loop, embeddings
            served.memory_bytes, served.load_seconds = llm.memory_bytes(), seconds
            served.status, served.failure, served.loading = "loaded", None, None
            served.last_used = time.monotonic()
            self._lock.notify_all()
        self.on_change(served, "loaded")
        self._start_watcher()

    # -- room --------------------------------------------------------------------------------------
    def _make_room(self, served: ServedModel) -> None:
        """Unload idle models, least recently used first, until `served` fits; wait (up to the load
        timeout) while the models in the way are busy."""
        need = self._estimate(served)
        pinned = sum(m.memory_bytes for m in self.loaded() if m.spec.pinned)
        if self.memory_budget is not None and need + pinned > self.memory_budget:
            raise InvalidRequest(f"model '{served.name}' needs about {_gib(need)}, more than the "
                                 f"{_gib(self.memory_budget - pinned)} that --models-memory-gb leaves it")
        deadline = time.monotonic() + self.load_timeout
        with self._lock:
            while (victims := self._victims(served, need)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    busy = ", ".join(m.name for m in self.loaded() if m is not served and not m.spec.pinned)
                    raise _NoRoom(f"no room to load model '{served.name}' while {busy} serve requests "
                                  "(--max-loaded-models / --models-memory-gb); retry shortly")
                self._lock.wait(left)
            taken = [self._take(victim) for victim in victims]
        for victim, parts in zip(victims, taken):
            self._shut(victim, parts)

    def _victims(self, served: ServedModel, need: int) -> list[ServedModel] | None:
        """Idle models to unload so that `served` fits, least recently used first; None if it cannot yet."""
        loaded = [m for m in self.loaded() if m is not served]
        over_count = (len([m for m in loaded if not m.spec.pinned]) + 1 - self.max_loaded
                      if self.max_loaded is not None and not served.spec.pinned else 0)
        over_bytes = (sum(m.memory_bytes for m in loaded) + need - self.memory_budget
                      if self.memory_budget is not None else 0)
        victims = []
        for model in sorted((m for m in loaded if m.idle), key=lambda m: m.last_used):
            if over_count <= 0 and over_bytes <= 0:
                break
            victims.append(model)
            over_count, over_bytes = over_count - 1, over_bytes - model.memory_bytes
        return victims if over_count <= 0 and over_bytes <= 0 else None

    def _estimate(self, served: ServedModel) -> int:
        """Bytes `served` will take: as measured at its last load, else its weights and KV-cache budget."""
        if served.memory_bytes or self.memory_budget is None:
            return served.memory_bytes
        from levante.loader.auto import resolve_path

        path = resolve_path(served.spec.args.model_name)[1]
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in (".safetensors", ".gguf")]
        args = served.spec.args
        kv_gb = args.kv_cache_gb if args.kv_cache_gb is not None else (2.0 if args.device == "cpu" else 0.0)
        return sum(f.stat().st_size for f in files) + int(0 if args.num_kv_blocks else kv_gb * GIB)

    # -- unloading ---------------------------------------------------------------------------------
    async def unload(self, name: str) -> bool:
        """Unload model `name` now (POST /models/unload); False if it was not loaded. ModelBusy while
        requests use it or wait for it."""
        served = self._served(name)
        with self._lock:
            if served.spec.pinned:
                raise InvalidRequest(f"model '{name}' is pinned (--embedding-model, or handed over loaded): "
                                     "it stays loaded")
            if served.status == "loading" or served.users or served.waiting:
                raise ModelBusy(f"model '{name}' is {'loading' if served.status == 'loading' else 'in use'} "
                                f"({served.users} requests hold it, {served.waiting} wait for it); retry later")
            if served.status != "loaded":
                return False
            parts = self._take(served)
        await asyncio.to_thread(self._shut, served, parts)
        return True

    async def load(self, name: str) -> None:
        """Load model `name` now (POST /models/load), a failed one included, and wait until it is."""
        served = self._served(name)
        await self.hold(served, retry_failed=True)
        self.release(served)

    def _served(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ModelNotFound(f"model '{name}' is not served here; this server serves "
                                f"'{', '.join(self.models)}'")
        return served

    def _take(self, served: ServedModel) -> tuple:
        """Under the lock: mark `served` unloaded, and hand back what must be shut down."""
        parts = (served.llm, served.loop, served.embeddings)
        served.llm = served.loop = served.embeddings = None
        served.status = "unloaded"
        return parts

    def _shut(self, served: ServedModel, parts: tuple) -> None:
        llm, loop, embeddings = parts
        if loop is not None:
            loop.stop()
        if embeddings is not None:
            embeddings.close()
        if llm is not None:
            llm.close()
            cuda = llm.engine is not None and llm.engine.device.type == "cuda"
            del llm, embeddings, parts
            gc.collect()
            if cuda:
                import torch

                torch.cuda.empty_cache()
        logger.warning("levante: model '%s' unloaded", served.name)
        self.on_change(served, "unloaded")

    # -- idle models -------------------------------------------------------------------------------
    def _start_watcher(self) -> None:
        with self._lock:
            if self.idle_timeout is None or self._watcher is not None or self._closed:
                return
            self._watcher = threading.Thread(target=self._watch_idle, name="levante-idle-models", daemon=True)
            self._watcher.start()

    def _watch_idle(self) -> None:
        """Unload models idle for `idle_timeout` seconds; sleeps until the next one could be (no polling)."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                expired = [m for m in self.models.values() if m.idle and now - m.last_used >= self.idle_timeout]
                if not expired:
                    upcoming = [m.last_used + self.idle_timeout - now for m in self.models.values() if m.idle]
                    self._lock.wait(min(upcoming) if upcoming else None)
                    continue
                taken = [(m, self._take(m)) for m in expired]
                self._lock.release()
                try:
                    for served, parts in taken:
                        self._shut(served, parts)
                finally:
                    self._lock.acquire()

    def close(self) -> None:
        """Stop every engine loop and the loader (the server is shutting down)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            loops = [m.loop for m in self.models.values() if m.loop is not None]
        self._loader.shutdown(wait=False, cancel_futures=True)
        for loop in loops:
            loop.stop()


class _NoRoom(Exception):
    pass


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB // 100 else f"{num_bytes / (1 << 20):.1f} MiB"


async def _wait(served: ServedModel, future: Future, deadline: float) -> None:
    """Wait for `served` to load, until `deadline`: 503 with Retry-After past it; the load's own error."""
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise ServiceUnavailable(f"model '{served.name}' is still loading; retry shortly (--model-load-timeout)",
                                 retry_after=5) from None
    except asyncio.CancelledError:
        if future.cancelled():  # the loader was shut down, not this request
            raise ServiceUnavailable("the server is shutting down") from None
        raise
