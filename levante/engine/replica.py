"""One data-parallel replica: an `Engine` and its `EngineLoop` in a process of its own, driven by the
front (engine/data_parallel.py) through a few calls: add, abort, drain, info.

The same `ReplicaEngine` runs as a Ray actor (`--distributed-executor-backend ray`) or in a local
process started as `python -m levante.engine.replica FD` (`mp`), which serves the calls over the
socket `FD` the front passed it (a `multiprocessing.Pipe` end: pickled messages, no network) and
ends when the front closes it or goes away.

Outputs are cumulative, so the buffer keeps the latest one per request: a front that reads late
gets less to read, never a stale state. An error reaches the front as a `RemoteError` (exceptions
with their own constructors do not all survive pickling).
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

from levante.engine.args import EngineArgs
from levante.engine.engine import Engine
from levante.engine.loop import EngineLoop
from levante.errors import InvalidRequest, RequestFailed, ServiceUnavailable


@dataclass
class RemoteError:
    """An error a replica reports for one request; `kind` picks the exception the front raises."""
    kind: str  # "invalid" | "unavailable" | "failed"
    message: str

    @classmethod
    def of(cls, error: BaseException) -> RemoteError:
        kind = ("invalid" if isinstance(error, InvalidRequest) else
                "unavailable" if isinstance(error, ServiceUnavailable) else "failed")
        return cls(kind, str(error) if kind != "failed" or isinstance(error, RequestFailed)
                   else f"the engine failed: {type(error).__name__}: {error}")

    def exception(self) -> Exception:
        return {"invalid": InvalidRequest, "unavailable": ServiceUnavailable}.get(self.kind, RequestFailed)(
            self.message)


class ReplicaEngine:
    """The engine of replica `index`, loaded from `args` (EngineArgs' fields, data_parallel_size 1)."""

    def __init__(self, args: dict, index: int):
        engine_args = EngineArgs(**args)
        self.index = index
        self.engine = Engine(engine_args.model_name, engine_args.engine_config(), progress=False)
        self.loop = EngineLoop(self.engine)
        self._outputs: dict[str, object] = {}  # request id -> its latest output, or a RemoteError
        self._arrived = threading.Condition()

    def info(self) -> dict:
        engine = self.engine
        return {"index": self.index, "pid": os.getpid(), "max_model_len": engine.max_model_len,
                "num_blocks": engine.block_manager.num_blocks, "block_size": engine.block_manager.block_size,
                "max_num_seqs": engine.config.max_num_seqs, "memory_bytes": engine.memory_bytes()}

    def add(self, request_id: str, prompt, params) -> None:
        def receive(item) -> None:
            with self._arrived:
                self._outputs[request_id] = RemoteError.of(item) if isinstance(item, BaseException) else item
                self._arrived.notify()

        try:
            self.loop.submit(request_id, prompt, params, receive)
        except Exception as e:  # noqa: BLE001 - the loop has stopped: the front hears it as this request's error
            receive(e)

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)
        with self._arrived:
            self._outputs.pop(request_id, None)

    def drain(self, timeout: float) -> tuple[list, dict]:
        """The outputs since the last drain (waiting up to `timeout` s for one), and the replica's load."""
        with self._arrived:
            if not self._outputs:
                self._arrived.wait(timeout)
            items, self._outputs = list(self._outputs.items()), {}
        return items, self.load()

    def load(self) -> dict:
        scheduler = self.engine.scheduler
        return {"waiting": len(scheduler.waiting), "running": len(scheduler.running),
                "kv_usage": self.engine.block_manager.usage(), "problem": self.loop.problem}

    def stop(self) -> None:
        self.loop.stop()
        self.engine.close()


def process_main(fd: int) -> None:
    """A local replica process: load, say ready (or why not), then serve the front's calls."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    args, index = conn.recv()
    try:
        replica = ReplicaEngine(args, index)
    except Exception as e:  # noqa: BLE001 - reported to the front, which fails start-up with it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", replica.info()))
    send_lock = threading.Lock()

    def commands() -> None:
        while True:
            try:
                kind, *rest = conn.recv()
            except (EOFError, OSError):  # the front has gone
                os._exit(0)
            if kind == "add":
                replica.add(*rest)
            elif kind == "abort":
                replica.abort(*rest)
            elif kind == "stop":
                replica.stop()
                os._exit(0)

    threading.Thread(target=commands, name="levante-replica-commands", daemon=True).start()
    while True:
        items, load = replica.drain(1.0)
        try:
            with send_lock:
                conn.send(("outputs", items, load))
        except OSError:
            os._exit(0)


if __name__ == "__main__":
    from levante.distributed.launcher import exit_with_parent

    exit_with_parent()
    process_main(int(sys.argv[1]))
