"""The front's handle on one replica (engine/replica.py), by backend: a local process (`mp`) or a
Ray actor (`ray`). Both offer the same calls: `start` (blocks until loaded: its info), `add`,
`abort`, `drain` (the outputs since the last one; `ReplicaDown` once the replica has died),
`restart` (blocks until it serves again: its info) and `close`.

A local process that dies is started again by its handle; a Ray actor is restarted by Ray
(`max_restarts=-1`), and its handle waits for it. Each replica is placed in a Ray placement group
of one bundle per tensor-parallel rank, packed on one node (the ranks are that replica's processes).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from pathlib import Path

from levante.distributed.launcher import PARENT_ENV
from levante.errors import ModelLoadError

START_TIMEOUT = 600.0


class ReplicaDown(Exception):
    """The replica's process has ended (killed, crashed, or its node lost)."""


class ProcessReplica:
    """A replica in a local process, `python -m levante.engine.replica`, talking over a socket pair."""

    def __init__(self, index: int, args: dict):
        self.index, self.args = index, args
        self.proc: subprocess.Popen | None = None
        self._conn = None
        self._send_lock = threading.Lock()

    def start(self) -> dict:
        ours, theirs = Pipe(duplex=True)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "levante.engine.replica", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = ours
        ours.send((self.args, self.index))
        deadline = time.monotonic() + START_TIMEOUT
        while not ours.poll(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ModelLoadError(f"data-parallel replica {self.index} ended while loading "
                                     f"(exit status {self.proc.poll()})")
        try:
            kind, detail = ours.recv()
        except (EOFError, OSError):
            raise ModelLoadError(f"data-parallel replica {self.index} ended while loading") from None
        if kind != "ready":
            raise ModelLoadError(f"data-parallel replica {self.index} could not load: {detail}")
        return detail

    def add(self, request_id: str, prompt, params) -> None:
        self._send(("add", request_id, prompt, params))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:
            pass  # it has died: the reader finds out and re-routes what it held

    def drain(self, timeout: float) -> tuple[list, dict | None]:
        try:
            if not self._conn.poll(timeout):
                return [], None
            _, items, load = self._conn.recv()
            return items, load
        except (EOFError, OSError):
            raise ReplicaDown(f"replica {self.index}'s process ended (exit status {self.proc.wait()})") from None

    def restart(self) -> dict:
        self._conn.close()
        self.proc.wait()
        return self.start()

    def close(self) -> None:
        self._send(("stop",))
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._conn is not None:
            self._conn.close()


class RayReplica:
    """A replica as a Ray actor, restarted by Ray when its process dies."""

    def __init__(self, index: int, args: dict, cpus_per_rank: float = 1.0):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from levante.engine.replica import ReplicaEngine

        self.index = index
        ranks = args.get("tensor_parallel_size", 1)
        gpus = 1 if str(args.get("device", "cpu")).startswith("cuda") else 0
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus} if gpus else {})}
        self.group = placement_group([dict(bundle) for _ in range(ranks)], strategy="STRICT_PACK")
        actor = ray.remote(ReplicaEngine).options(
            max_restarts=-1, max_task_retries=0, max_concurrency=8, num_cpus=cpus_per_rank, num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=0))
        self.actor = actor.remote(args, index)

    def start(self) -> dict:
        import ray

        try:
            ray.get(self.group.ready(), timeout=START_TIMEOUT)
            return ray.get(self.actor.info.remote(), timeout=START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise ModelLoadError(f"data-parallel replica {self.index} did not start in {START_TIMEOUT:.0f} s "
                                 "(does the Ray cluster have the CPUs/GPUs it asks for?)") from None
        except ray.exceptions.RayActorError as e:
            raise ModelLoadError(f"data-parallel replica {self.index} could not load: {_cause(e)}") from None

    def add(self, request_id: str, prompt, params) -> None:
        self.actor.add.remote(request_id, prompt, params)

    def abort(self, request_id: str) -> None:
        self.actor.abort.remote(request_id)

    def drain(self, timeout: float) -> tuple[list, dict | None]:
        import ray

        try:
            return ray.get(self.actor.drain.remote(timeout))
        except ray.exceptions.RayActorError as e:  # died, or unreachable (ActorUnavailableError)
            raise ReplicaDown(f"replica {self.index}'s actor died: {_cause(e)}") from None

    def restart(self) -> dict:
        import ray

        while True:  # Ray restarts the actor; its calls wait until the new one has loaded
            try:
                return ray.get(self.actor.info.remote(), timeout=START_TIMEOUT)
            except ray.exceptions.RayActorError:
                time.sleep(0.5)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        ray.kill(self.actor, no_restart=True)
        remove_placement_group(self.group)


def _cause(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


# A local cluster's node address is loopback: Ray turns `_node_ip_address="127.0.0.1"` (and `ray start
# --node-ip-address 127.0.0.1`) into the host's routable address unless it is told the cluster is this
# host alone (its switch for macOS and Windows, where that is the default), and its servers then listen there.
LOCAL_ONLY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def connect_ray(num_cpus: float | None = None) -> None:
    """Join the Ray cluster RAY_ADDRESS names, or start a local one on loopback only; usage statistics
    and the dashboard stay off either way."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ.update(LOCAL_ONLY)  # read when ray is imported: here, or by the processes it starts
    import ray

    if ray.is_initialized():
        return
    local = {} if address else {"_node_ip_address": "127.0.0.1", "num_cpus": num_cpus}
    ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False, **local)
