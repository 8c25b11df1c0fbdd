"""The tensor-parallel process group of this process.

One group per process: `init(rank, world_size, ...)` joins it (NCCL on CUDA, gloo on
CPU), `destroy()` leaves it. Rank 0 runs the scheduler and sampler; the others follow its
steps (engine/tp_worker.py). Step headers travel on a separate gloo group, so an idle
worker waits in a blocking socket read, not in a spinning NCCL kernel.

Rendezvous: `MASTER_ADDR` / `MASTER_PORT` (set by torchrun, or by levante's own launcher
with 127.0.0.1 and a free port).
"""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A worker waits for the next step header (CPU group) for as long as the server idles; the
# rendezvous and the collectives inside a step (default group) fail after STEP_TIMEOUT, so a
# rank that never arrives (a worker that died at start) is an error, not a hang.
IDLE_TIMEOUT = timedelta(days=365)
STEP_TIMEOUT = timedelta(minutes=10)


@dataclass
class _Group:
    rank: int
    world_size: int
    backend: str
    device: torch.device
    cpu_group: object  # gloo group for step headers and start-up messages


_group: _Group | None = None
# Layers read the split when they are built, and only inside `building()`: a single-rank model
# built in this process (an embedding model, a TP1 reference) stays whole while a group exists.
_local = threading.local()


@contextmanager
def building():
    previous, _local.active = getattr(_local, "active", False), True
    try:
        yield
    finally:
        _local.active = previous


def _active() -> bool:
    return _group is not None and getattr(_local, "active", False)


def world_size() -> int:
    return _group.world_size if _active() else 1


def rank() -> int:
    return _group.rank if _active() else 0


def group_size() -> int:
    """The size of this process's group, whatever is being built (1 without a group)."""
    return _group.world_size if _group else 1


def group_rank() -> int:
    return _group.rank if _group else 0


def is_initialized() -> bool:
    return _group is not None


def device_group():
    """The group for collectives on activations (None: the default group)."""
    return None


def cpu_group():
    return _group.cpu_group if _group else None


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun (RANK and WORLD_SIZE set), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))


def local_device(device: str, local_rank: int) -> torch.device:
    """Each rank's own device: cuda:<local rank> under a CUDA device, the CPU otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.device("cuda", local_rank)
    return dev


def init(rank: int, world_size: int, device: torch.device, master_addr: str | None = None,
         master_port: int | None = None) -> None:
    """Join the process group as `rank` of `world_size` (env:// rendezvous)."""
    global _group
    if _group is not None:
        raise RuntimeError("this process already belongs to a tensor-parallel group")
    if master_addr:
        os.environ["MASTER_ADDR"] = master_addr
    if master_port:
        os.environ["MASTER_PORT"] = str(master_port)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=STEP_TIMEOUT)
    cpu = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    _group = _Group(rank, world_size, backend, device, cpu)


def destroy() -> None:
    global _group
    if _group is None:
        return
    _group = None
    if dist.is_initialized():
        dist.destroy_process_group()
