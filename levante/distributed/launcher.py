"""Starting the ranks of a tensor-parallel group on one host.

`spawn_workers` starts ranks 1..N-1 as fresh Python processes running `python -m MODULE`,
with the environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
= 127.0.0.1, MASTER_PORT = a free port), so a spawned worker and a torchrun worker take
the same path. A fresh interpreter, rather than multiprocessing's "spawn", never
re-imports the caller's main script (which would need an `if __name__ == "__main__"`
guard) and copies none of rank 0's threads or CUDA state.

Workers die with rank 0: a clean shutdown is a message (messages.SHUTDOWN); if rank 0
vanishes, a worker's pending collective fails on the closed socket, and a spawned worker
also watches its parent process id (LEVANTE_TP_PARENT).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PARENT_ENV = "LEVANTE_TP_PARENT"


def spawn_workers(module: str, world_size: int, port: int, args: list[str]) -> list[subprocess.Popen]:
    package_root = str(Path(__file__).resolve().parents[2])
    procs = []
    for rank in range(1, world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env[PARENT_ENV] = str(os.getpid())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdin=subprocess.DEVNULL))
    return procs


def join_workers(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()


def exit_with_parent(interval: float = 1.0) -> None:
    """In a spawned worker: end this process as soon as its parent (rank 0) is gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    # Ctrl+C in a terminal reaches the whole process group; `levante chat` uses it to stop one
    # answer, so a spawned worker leaves it to rank 0 and ends only with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != int(parent):
                os._exit(0)

    threading.Thread(target=watch, name="levante-parent-watch", daemon=True).start()
