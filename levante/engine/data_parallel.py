"""Data parallelism: N replicas of one model behind the one server, each request routed to one.

`ReplicaSet` is what the server drives instead of an `EngineLoop` (engine/loop.py), with the same
calls (submit, abort, call, stop, alive, healthy, problem), so every request takes the server's
one road (validation, admission, fault isolation, auth, site checks) up to its last step, which
runs on a replica (engine/replica.py) chosen by the prefix router (engine/prefix_router.py).

One reader thread per replica takes its outputs to their callers. When a replica dies:
  * its requests that have produced nothing yet are routed again, to the others;
  * the ones that had produced output fail with `RequestFailed` (a stream ends with an error
    event, never a hang: its prefix cannot be taken back);
  * its handle restarts it (a local process) or waits for Ray to (an actor), and it serves again.
While replicas are down, `health()` says how many of N serve; with none up, `problem` says so
(/health 503) and new requests are refused at once.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from levante.engine.prefix_router import PrefixRouter
from levante.engine.replica import RemoteError
from levante.errors import InvalidRequest, RequestFailed, ServiceUnavailable
from levante.multimodal.inputs import MultiModalPrompt

logger = logging.getLogger("levante")

DRAIN_SECONDS = 1.0


@dataclass
class ReplicaStats:
    """What /metrics reports of one replica (counters only grow; serve/metrics.py reads the deltas)."""
    up: bool = False
    pid: int | None = None
    waiting: int = 0
    running: int = 0
    routed: dict = field(default_factory=dict)  # reason -> requests routed here
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens its prefix cache held
    rerouted: int = 0  # requests it lost before they produced anything, run elsewhere
    failed: int = 0  # requests it lost mid-output
    restarts: int = 0


@dataclass
class _Pending:
    prompt: object
    params: object
    callback: object
    keys: list
    replica: int = -1
    started: bool = False  # an output reached the caller: it cannot move to another replica


class ReplicaSet:
    def __init__(self, handles: list, routing: str = "prefix", block_size: int = 16):
        self.handles = handles
        self.router = PrefixRouter(len(handles), block_size, routing)
        self.stats = [ReplicaStats() for _ in handles]
        self.infos: list[dict] = [{} for _ in handles]
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.RLock()
        self._stopped = False
        with ThreadPoolExecutor(len(handles)) as pool:  # load the replicas side by side
            starting = [pool.submit(handle.start) for handle in handles]
            try:
                for index, future in enumerate(starting):
                    self._up(index, future.result())
            except BaseException:
                pool.shutdown(wait=True)
                self._close_handles()
                raise
        self._readers = [threading.Thread(target=self._read, args=(i,), name=f"levante-replica-{i}", daemon=True)
                         for i in range(len(handles))]
        for reader in self._readers:
            reader.start()

    # -- EngineLoop's calls ------------------------------------------------------------------------
    def submit(self, request_id: str, prompt, params, callback) -> None:
        """Route a request to a replica; ServiceUnavailable at once if none serves."""
        ids = prompt.token_ids if isinstance(prompt, MultiModalPrompt) else prompt
        keys = self.router.keys(ids, params.lora) if isinstance(ids, list) else []
        with self._lock:
            if self._stopped:
                raise ServiceUnavailable("the server is shutting down")
            pending = self._pending[request_id] = _Pending(prompt, params, callback, keys)
            if not self._route(request_id, pending):
                del self._pending[request_id]
                raise ServiceUnavailable(self.problem or "no replica is serving")

    def abort(self, request_id: str) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            if pending is None:
                return
            self.router.done(pending.replica)
        self.handles[pending.replica].abort(request_id)

    def call(self, function):
        raise InvalidRequest("with --data-parallel-size, LoRA adapters are loaded at start (--lora), "
                             "not at run time")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            pending, self._pending = self._pending, {}
        for item in pending.values():
            _deliver(item.callback, ServiceUnavailable("the server is shutting down"))
        self._close_handles()

    @property
    def alive(self) -> bool:
        return not self._stopped

    @property
    def healthy(self) -> bool:
        return self.problem is None

    @property
    def problem(self) -> str | None:
        if self._stopped:
            return "the engine has stopped (shut down)"
        if not any(s.up for s in self.stats):
            return f"no data-parallel replica is serving (0 of {len(self.handles)}; restarting)"
        return None

    def health(self) -> dict:
        """/health's view: how many replicas serve, of how many."""
        up = sum(s.up for s in self.stats)
        return {"replicas": len(self.handles), "replicas_up": up,
                **({"capacity": f"reduced: {up} of {len(self.handles)} replicas serve"} if up < len(self.handles)
                   else {})}

    # -- routing -----------------------------------------------------------------------------------
    def _route(self, request_id: str, pending: _Pending, exclude: frozenset = frozenset()) -> bool:
        """Under the lock: send `pending` to the replica the router picks; False if none is up."""
        choice = self.router.choose(pending.keys, exclude)
        if choice is None:
            return False
        pending.replica = choice.replica
        self.router.routed(choice.replica, pending.keys)
        routed = self.stats[choice.replica].routed
        routed[choice.reason] = routed.get(choice.reason, 0) + 1
        self.handles[choice.replica].add(request_id, pending.prompt, pending.params)
        return True

    # -- the readers -------------------------------------------------------------------------------
    def _read(self, index: int) -> None:
        handle = self.handles[index]
        while not self._stopped:
            try:
                items, load = handle.drain(DRAIN_SECONDS)
            except Exception as e:  # noqa: BLE001 - ReplicaDown, or the transport broke: the same to us
                if self._stopped:
                    return
                self._lost(index, e)
                self._restart(index)
                continue
            if load is not None:
                self._observe_load(index, load)
            for request_id, item in items:
                self._output(index, request_id, item)

    def _output(self, index: int, request_id: str, item) -> None:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.replica != index:
                return  # aborted, or moved to another replica
            error = item.exception() if isinstance(item, RemoteError) else None
            if error is None and not pending.started:
                stats = self.stats[index]
                stats.prompt_tokens += len(item.prompt_token_ids)
                stats.cached_tokens += item.num_cached_tokens or 0
            pending.started = True
            if error is not None or item.finished:
                del self._pending[request_id]
                self.router.done(index)
        if not _deliver(pending.callback, error or item) and error is None and not item.finished:
            self.abort(request_id)  # nobody listens any more

    def _observe_load(self, index: int, load: dict) -> None:
        stats = self.stats[index]
        stats.waiting, stats.running = load["waiting"], load["running"]
        self.router.replicas[index].kv_usage = load["kv_usage"]

    def _lost(self, index: int, error: Exception) -> None:
        """Replica `index` died: move what it had not started, fail what it had."""
        logger.warning("levante: data-parallel replica %d lost: %s", index, error)
        failed = []
        with self._lock:
            self._down(index)
            for request_id, pending in list(self._pending.items()):
                if pending.replica != index:
                    continue
                if not pending.started and self._route(request_id, pending, frozenset({index})):
                    self.stats[index].rerouted += 1
                    continue
                del self._pending[request_id]
                failed.append(pending)
            self.stats[index].failed += len(failed)
        for pending in failed:
            _deliver(pending.callback, RequestFailed(
                f"data-parallel replica {index} was lost while running this request; retry it" if pending.started
                else f"data-parallel replica {index} was lost and no other replica is serving; retry shortly"))

    def _restart(self, index: int) -> None:
        started = time.monotonic()
        while not self._stopped:
            try:
                info = self.handles[index].restart()
            except Exception as e:  # noqa: BLE001 - e.g. the model can no longer be loaded: try again
                logger.warning("levante: data-parallel replica %d could not restart: %s", index, e)
                time.sleep(5)
                continue
            with self._lock:
                self.stats[index].restarts += 1
                self._up(index, info)
            logger.warning("levante: data-parallel replica %d serves again (%.1f s)", index,
                           time.monotonic() - started)
            return

    def _up(self, index: int, info: dict) -> None:
        self.infos[index] = info
        view = self.router.replicas[index]
        view.capacity, view.in_flight, view.up = info["num_blocks"], 0, True
        self.stats[index].up, self.stats[index].pid = True, info["pid"]

    def _down(self, index: int) -> None:
        view = self.router.replicas[index]
        view.up, view.in_flight, view.kv_usage = False, 0, 0.0
        self.router.forget(index)
        self.stats[index].up = False
        self.stats[index].waiting = self.stats[index].running = 0

    def _close_handles(self) -> None:
        for handle in self.handles:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - one that will not close must not keep the others
                logger.warning("levante: a data-parallel replica did not close cleanly", exc_info=True)


def _deliver(callback, item) -> bool:
    try:
        callback(item)
        return True
    except Exception:  # noqa: BLE001 - the caller's trouble, not the replica's
        logger.warning("an output callback raised; its request is dropped", exc_info=True)
        return False
