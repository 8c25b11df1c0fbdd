"""Several models behind one server: a request's `model` routed to what serves it, models loaded on
first use and unloaded when idle or when room is needed (llama.cpp's router mode, llama-swap).

    ModelRouter.use(name) -> Route (the name to report, the ServedModel, the LoRA adapter)
        loaded:    held for the request; a held model is never unloaded
        unloaded:  loaded by the one loader thread (one load at a time) while its requests wait,
                   up to --model-load-timeout seconds (then 503 with Retry-After)
        failed:    its requests fail at once (503, saying why) for FAILED_RETRY_SECONDS, then it is
                   tried again (at once through POST /models/load); the other models keep serving
        sleeping:  woken by the loader thread (level 1: its weights loaded again; level 2: loaded
                   whole) while its requests wait, as a load; POST /sleep, --sleep-after

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
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager

from levante.engine.loop import EngineLoop
from levante.errors import InvalidRequest, LevanteError, ModelBusy, ModelNotFound, ServiceUnavailable
from levante.loader.memory import release_memory
from levante.serve.model_specs import DEFAULT_LOAD_TIMEOUT, TASK_NOUNS, TASK_ROUTES, ModelSpec, check_names
from levante.serve.served import Route, ServedModel, model_service

__all__ = ["ModelRouter", "Route", "ServedModel", "load_llm"]

logger = logging.getLogger("levante")

FAILED_RETRY_SECONDS = 30.0
GIB = 1 << 30


def load_llm(spec: ModelSpec):
    """How a model loads by default: `LLM.from_engine_args` (weights, KV cache, warm-up). The
    structured-output tokenizer is built by the first constrained request (serve/pipeline.py)."""
    args = spec.args  # replicas when asked for (a backend named: even one, e.g. to measure the overhead)
    if (args.data_parallel_size != 1 or args.distributed_executor_backend) and spec.task == "generate":
        from levante.engine.front import DataParallelLLM

        return DataParallelLLM(args)
    from levante import LLM

    return LLM.from_engine_args(dataclasses.replace(args, data_parallel_size=1, distributed_executor_backend=None))


class ModelRouter:
    def __init__(self, specs: list[ModelSpec] = (), max_loaded: int | None = None, memory_gb: float | None = None,
                 idle_timeout: float | None = None, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
                 load: Callable[[ModelSpec], object] = load_llm, on_change: Callable | None = None,
                 sleep_after: float | None = None, sleep_level: int = 1):
        if max_loaded is not None and max_loaded < 1:
            raise InvalidRequest("--max-loaded-models: must be 1 or more")
        if sleep_level not in (1, 2):
            raise InvalidRequest("--sleep-level: must be 1 or 2")
        self.sleep_after, self.sleep_level = sleep_after, sleep_level
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
                   args.model_load_timeout, sleep_after=getattr(args, "sleep_after", None),
                   sleep_level=getattr(args, "sleep_level", 1))

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

    def resolve(self, name: str | None, tasks: tuple[str, ...] = ("generate",)) -> tuple[ServedModel, str | None]:
        """The one place a request's `model` is mapped to what serves it: (model, LoRA adapter or None).
        `tasks`: what the route takes (model_specs.py's TASKS). No name: the first model of the first task."""
        if not self.models:
            raise ServiceUnavailable("the model is still loading; retry when /health answers 200", retry_after=1)
        if not name:
            served = next((m for task in tasks for m in self.models.values() if m.spec.task == task), None)
            if served is None:
                raise InvalidRequest(self._wrong_kind(self.default, tasks))
            return served, None
        served, lora = self.models.get(name), None
        if served is None:
            served = next((m for m in self.models.values() if name in m.spec.adapters), None)
            lora = name
        if served is None:
            raise ModelNotFound(f"model '{name}' is not served here; this server serves '{', '.join(self.names())}'")
        if served.spec.task not in tasks:
            raise InvalidRequest(self._wrong_kind(served, tasks))
        return served, lora

    def _wrong_kind(self, served: ServedModel, tasks: tuple[str, ...]) -> str:
        task = served.spec.task
        other = next((m.name for m in self.models.values() if m.spec.task in tasks), None)
        return (f"'{served.name}' is {TASK_NOUNS[task]}: it serves {TASK_ROUTES[task]}; " +
                (f"this route is served by '{other}'" if other else
                 f"no model served here is {' or '.join(TASK_NOUNS[t] for t in tasks)}"))

    # -- holding a model for a request -------------------------------------------------------------
    @asynccontextmanager
    async def use(self, name: str | None, tasks: tuple[str, ...] = ("generate",)) -> AsyncIterator[Route]:
        """Hold the model `name` routes to (loading it first, if need be) while the block runs."""
        served, lora = self.resolve(name, tasks)
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
        waking = served.status == "sleeping"
        served.status = "loading"
        served.loading = self._loader.submit(self._wake if waking else self._load, served)
        return served.loading

    def _load(self, served: ServedModel, llm=None) -> None:
        """The loader thread: make room, load (or wake `llm`, asleep), publish; a failure fails this
        model's requests only."""
        started = time.monotonic()
        try:
            self._make_room(served)
            logger.warning("levante: %s model '%s'", "loading" if llm is None else "waking", served.name)
            if llm is None:
                llm = self._load_llm(served.spec)
            else:
                llm.wake_up()
        except _NoRoom as e:
            with self._lock:
                served.status, served.loading = "sleeping" if served.sleep_level else "unloaded", None
                self._lock.notify_all()
            raise ServiceUnavailable(str(e), retry_after=5) from None
        except Exception as e:  # noqa: BLE001 - any failure fails this model's requests, with one line
            reason = str(e) if isinstance(e, LevanteError) else f"internal error: {type(e).__name__}: {e}"
            logger.warning("levante: model '%s' could not be loaded: %s", served.name, reason)
            with self._lock:
                stale = self._take(served) if served.llm is not None else None  # a wake that failed
                served.status, served.failure, served.failed_at, served.loading = \
                    "failed", reason, time.monotonic(), None
                served.sleep_level = None
                self._lock.notify_all()
            if stale is not None:
                self._shut(served, stale)
            self.on_change(served, "failed")
            raise ServiceUnavailable(f"model '{served.name}' could not be loaded: {reason}",
                                     retry_after=round(FAILED_RETRY_SECONDS)) from None
        self._publish(served, llm, time.monotonic() - started)
        logger.warning("levante: model '%s' loaded (%.1f s)", served.name, served.load_seconds)

    def _wake(self, served: ServedModel) -> None:
        """The loader thread: a sleeping model loaded again (level 2) or its weights (level 1)."""
        started, level = time.monotonic(), served.sleep_level
        self._load(served, served.llm)
        served.wake_seconds, served.sleep_level = time.monotonic() - started, None
        logger.warning("levante: model '%s' woke from sleep level %d in %.2f s", served.name, level,
                       served.wake_seconds)
        self.on_change(served, "woken")

    def _publish(self, served: ServedModel, llm, seconds: float) -> None:
        if served.llm is llm:  # woken at level 1: its loop and service stay
            with self._lock:
                served.memory_bytes, served.load_seconds = llm.memory_bytes(), seconds
                served.status, served.failure, served.loading = "loaded", None, None
                served.last_used = time.monotonic()
                self._lock.notify_all()
            return
        # A data-parallel model brings its own loop (engine/data_parallel.py's ReplicaSet).
        loop = getattr(llm, "loop", None) or (EngineLoop(llm.engine) if llm.engine is not None else None)
        if loop is not None:
            # what the engine holds (a model handed over loaded may bring adapters of its own)
            served.spec.args.lora = {name: str(a.path) for name, a in llm.engine.lora.loaded.items()}
        service = model_service(llm, served.name)
        with self._lock:
            served.llm, served.loop, served.service = llm, loop, service
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

    def _take(self, served: ServedModel) -> list:
        """Under the lock: mark `served` unloaded, and hand back what must be shut down."""
        parts = [served.llm, served.loop, served.service]
        served.llm = served.loop = served.service = None
        served.status = "unloaded"
        return parts

    def _shut(self, served: ServedModel, parts: list, event: str = "unloaded") -> None:
        """Stop and free what `_take` handed back. The list is emptied, so that no caller's reference keeps
        the model alive past the collection below (its memory goes back to the system now)."""
        llm, loop, service = parts
        parts.clear()
        if loop is not None:
            loop.stop()
        if service is not None:
            service.close()
        device = None
        if llm is not None:
            llm.close()
            device = llm.engine.device if llm.engine is not None else None
        del llm, loop, service
        release_memory(device)
        logger.warning("levante: model '%s' %s", served.name, "unloaded" if event == "unloaded" else "asleep (level 2)")
        self.on_change(served, event)

    # -- sleep ---------------------------------------------------------------------------------------
    async def sleep(self, name: str | None, level: int) -> list[str]:
        """Put model `name` (None: every loaded one) to sleep: level 1 gives its weights and KV cache back
        to the system and keeps the rest (tokenizer, templates, grammar tables, engine loop); level 2
        unloads it whole. A request for it wakes it. ModelBusy while requests use it; the names put to sleep."""
        if level not in (1, 2):
            raise InvalidRequest("level: must be 1 (weights and KV cache released) or 2 (everything)")
        with self._lock:
            targets = [self._served(name)] if name else [m for m in self.models.values() if m.status == "loaded"]
            targets = [m for m in targets if m.status != "sleeping"]
            for served in targets:
                if served.status != "loaded":
                    raise InvalidRequest(f"model '{served.name}' is {served.status}: only a loaded model sleeps")
                if level == 1 and not hasattr(served.llm, "sleep"):  # data-parallel replicas: only unloading
                    raise InvalidRequest(f"model '{served.name}' runs as replicas: it sleeps at level 2 only")
                if served.users or served.waiting:
                    raise ModelBusy(f"model '{served.name}' is in use ({served.users} requests hold it, "
                                    f"{served.waiting} wait for it); retry later")
            futures = [self._start_sleep(served, level) for served in targets]
        for future in futures:
            await asyncio.wrap_future(future)
        return [served.name for served in targets]

    async def wake(self, name: str | None) -> list[str]:
        """Wake model `name` (None: every sleeping one) now, as its next request would; the names woken."""
        targets = [self._served(name)] if name else [m for m in self.models.values() if m.status == "sleeping"]
        woken = []
        for served in targets:
            asleep = served.status == "sleeping"
            await self.hold(served)
            self.release(served)
            if asleep:
                woken.append(served.name)
        return woken

    def _start_sleep(self, served: ServedModel, level: int) -> Future:
        """Under the lock: mark `served` asleep, and put it to sleep on the loader thread (after any load
        under way, before any wake a request asks for)."""
        parts = self._take(served) if level == 2 else None
        served.status, served.sleep_level = "sleeping", level
        served.loading = self._loader.submit(self._put_to_sleep, served, parts)
        return served.loading

    def _put_to_sleep(self, served: ServedModel, parts: list | None) -> None:
        try:
            if parts is not None:
                self._shut(served, parts, event="sleeping")
                return
            llm = served.llm
            if served.loop is not None:  # on the engine's thread, between two steps
                served.loop.call(llm.sleep).result()
            else:
                llm.sleep()
        except Exception:
            with self._lock:  # still awake: it serves on
                served.status, served.sleep_level = "loaded", None
            raise
        finally:
            with self._lock:
                served.loading = None
                self._lock.notify_all()
        logger.warning("levante: model '%s' asleep (level 1)", served.name)
        self.on_change(served, "sleeping")

    # -- idle models -------------------------------------------------------------------------------
    def _start_watcher(self) -> None:
        with self._lock:
            if (self.idle_timeout is None and self.sleep_after is None) or self._watcher is not None or self._closed:
                return
            self._watcher = threading.Thread(target=self._watch_idle, name="levante-idle-models", daemon=True)
            self._watcher.start()

    def _watch_idle(self) -> None:
        """Unload models idle for `idle_timeout` seconds, put to sleep those idle for `sleep_after`; waits
        until the next one could be (no polling)."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                deadlines = self._idle_deadlines()
                due = [(m, action) for m, (action, when) in deadlines.items() if when <= now]
                if not due:
                    upcoming = [when - now for _, when in deadlines.values()]
                    self._lock.wait(min(upcoming) if upcoming else None)
                    continue
                for served, action in due:
                    if action == "sleep":
                        self._start_sleep(served, self.sleep_level)
                taken = [(m, self._take(m)) for m, action in due if action == "unload"]
                self._lock.release()
                try:
                    for served, parts in taken:
                        self._shut(served, parts)
                finally:
                    self._lock.acquire()

    def _idle_deadlines(self) -> dict[ServedModel, tuple[str, float]]:
        """Under the lock: for each model nobody uses, what comes first ("unload" or "sleep") and when.
        A pinned embedding model stays awake: the server ranks with it directly (serve/ranking.py)."""
        deadlines = {}
        for m in self.models.values():
            if m.status != "loaded" or m.users or m.waiting:
                continue
            options = []
            if self.idle_timeout is not None and not m.spec.pinned:
                options.append(("unload", m.last_used + self.idle_timeout))
            if self.sleep_after is not None and not (m.spec.pinned and m.spec.task == "embed"):
                options.append(("sleep", m.last_used + self.sleep_after))
            if options:
                deadlines[m] = min(options, key=lambda option: option[1])
        return deadlines

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
