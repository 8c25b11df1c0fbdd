"""Drives `Engine.step()` from one background thread for concurrent callers.

Callers never touch the engine directly: they queue commands (add, abort) that
the loop applies between steps, and receive outputs through a callback. With no
work the thread waits on a condition variable, so an idle engine uses no CPU.

A request the engine fails (a step raised for it, engine/engine.py `_isolate`)
reaches its caller as `RequestFailed`; the others go on. `healthy` is what
/health reports: the thread is alive and no step has run for longer than
`stall_seconds`. Should the thread end (a bug in the loop itself), every caller
waiting is told, and later submissions fail at once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from levante.engine.engine import Engine
from levante.engine.outputs import RequestOutput
from levante.engine.sampling_params import SamplingParams
from levante.errors import RequestFailed, ServiceUnavailable

logger = logging.getLogger("levante")

# Receives each RequestOutput of its request, or the exception that ended it.
OutputCallback = Callable[[RequestOutput | BaseException], None]

DEFAULT_STALL_SECONDS = 120.0


class EngineLoop:
    def __init__(self, engine: Engine, stall_seconds: float = DEFAULT_STALL_SECONDS):
        self.engine = engine
        self.stall_seconds = stall_seconds
        self._adds: dict[str, tuple] = {}  # request id -> (prompt, params, callback), not yet in the engine
        self._taken: dict[str, tuple] = {}  # the adds this iteration is making
        self._aborts: deque[str] = deque()
        self._callbacks: dict[str, OutputCallback] = {}
        self._wakeup = threading.Condition()
        self._stopped = False
        self._dead: str | None = None  # why the thread ended, once it has
        self._busy_since: float | None = None  # when the running iteration (commands and a step) began
        self._thread = threading.Thread(target=self._run, name="levante-engine", daemon=True)
        self._thread.start()

    # -- what callers do --------------------------------------------------
    def submit(self, request_id: str, prompt, params: SamplingParams, callback: OutputCallback) -> None:
        """Queue a request; ServiceUnavailable at once if the loop has ended."""
        with self._wakeup:
            if self._dead is not None or self._stopped:
                raise ServiceUnavailable(f"the engine has stopped ({self._dead or 'shut down'})")
            self._adds[request_id] = (prompt, params, callback)
            self._wakeup.notify()

    def abort(self, request_id: str) -> None:
        with self._wakeup:
            if self._adds.pop(request_id, None) is None:
                self._aborts.append(request_id)
                self._wakeup.notify()

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Alive and making progress: no iteration has been running for more than `stall_seconds`."""
        busy_since = self._busy_since
        return self.alive and (busy_since is None or time.monotonic() - busy_since < self.stall_seconds)

    @property
    def problem(self) -> str | None:
        """Why the loop is not healthy, for /health and refusals; None when it is."""
        if not self.alive:
            return f"the engine has stopped ({self._dead or 'shut down'})"
        if not self.healthy:
            return f"the engine has made no progress for {self.stall_seconds:.0f} s"
        return None

    # -- the thread -------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._next_iteration():
                pass
        except BaseException as e:  # a bug in the loop itself: say so to everyone waiting
            logger.exception("the engine loop stopped")
            self._dead = f"{type(e).__name__}: {e}"
        finally:
            self._dead = self._dead or "shut down"
            self._fail_everyone(ServiceUnavailable(f"the engine has stopped ({self._dead})"))

    def _next_iteration(self) -> bool:
        with self._wakeup:
            self._busy_since = None
            while not self._stopped and not self._adds and not self._aborts \
                    and not self.engine.has_unfinished_requests():
                self._wakeup.wait()
            if self._stopped:
                return False
            self._busy_since = time.monotonic()
            self._taken, self._adds = self._adds, {}
            aborts, self._aborts = self._aborts, deque()
        for request_id in aborts:
            self._callbacks.pop(request_id, None)
            self.engine.abort_request(request_id)
        while self._taken:
            request_id = next(iter(self._taken))
            prompt, params, callback = self._taken[request_id]
            self._add(request_id, prompt, params, callback)
            del self._taken[request_id]
        if self.engine.has_unfinished_requests():
            self._step()
        return True

    def _add(self, request_id: str, prompt, params: SamplingParams, callback: OutputCallback) -> None:
        try:
            self.engine.add_request(request_id, prompt, params)
        except Exception as e:  # noqa: BLE001 - reported to the caller, never kills the loop
            _deliver(callback, e)
            return
        self._callbacks[request_id] = callback

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - not any one request's doing (the engine narrows those down)
            logger.exception("engine step failed")
            error = RequestFailed(f"the engine failed: {type(e).__name__}: {e}")
            for request_id, callback in list(self._callbacks.items()):
                self.engine.abort_request(request_id)
                _deliver(callback, error)
            self._callbacks.clear()
            return
        for output in outputs:
            callback = self._callbacks.get(output.request_id)
            if output.finished:
                self._callbacks.pop(output.request_id, None)
            if callback is None:
                continue
            item = RequestFailed(f"the engine failed on this request: {output.error}") if output.error else output
            if not _deliver(callback, item) and not output.finished:
                self._callbacks.pop(output.request_id, None)  # nobody listens any more
                self.engine.abort_request(output.request_id)

    def _fail_everyone(self, error: Exception) -> None:
        with self._wakeup:
            adds, self._adds = {**self._taken, **self._adds}, {}
        for request_id, callback in list(self._callbacks.items()):
            _deliver(callback, error)
        self._callbacks.clear()
        for _, _, callback in adds.values():
            _deliver(callback, error)


def _deliver(callback: OutputCallback, item) -> bool:
    """Hand `item` to a caller; False if the callback raised (e.g. its event loop has closed)."""
    try:
        callback(item)
        return True
    except Exception:  # noqa: BLE001 - the caller's problem must not stop the engine
        logger.warning("an output callback raised; its request is dropped", exc_info=True)
        return False
