"""Rank 0 -> workers: one message per engine step.

A message is a kind, a few integers and a list of integer tensors (any of them None).
It travels as a fixed-size int64 header on the CPU group (kind, integers, each tensor's
shape) and, when there are tensors, one flat int64 payload on the device group, so a
step costs two broadcasts whatever its size. Both sides agree on the order of fields;
this module knows nothing of what they mean.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from levante.distributed import parallel_state

HEADER_LEN = 128
SHUTDOWN, STEP, INIT, LORA_LOAD, LORA_UNLOAD = 0, 1, 2, 3, 4


def send(kind: int, ints: list[int], tensors: list[torch.Tensor | None], device: torch.device) -> None:
    header = [kind, len(ints), *ints, len(tensors)]
    for t in tensors:
        header += [-1] if t is None else [t.dim(), *t.shape]
    if len(header) > HEADER_LEN:
        raise ValueError(f"message header of {len(header)} values exceeds {HEADER_LEN}")
    buf = torch.zeros(HEADER_LEN, dtype=torch.long)
    buf[: len(header)] = torch.tensor(header, dtype=torch.long)
    dist.broadcast(buf, src=0, group=parallel_state.cpu_group())
    present = [t.reshape(-1).to(device=device, dtype=torch.long) for t in tensors if t is not None]
    if present:
        dist.broadcast(torch.cat(present), src=0, group=parallel_state.device_group())


def recv(device: torch.device) -> tuple[int, list[int], list[torch.Tensor | None]]:
    buf = torch.empty(HEADER_LEN, dtype=torch.long)
    dist.broadcast(buf, src=0, group=parallel_state.cpu_group())
    header = buf.tolist()
    kind, n_ints = header[0], header[1]
    ints = header[2:2 + n_ints]
    pos = 2 + n_ints
    n_tensors, pos = header[pos], pos + 1
    shapes: list[tuple[int, ...] | None] = []
    for _ in range(n_tensors):
        ndim, pos = header[pos], pos + 1
        if ndim < 0:
            shapes.append(None)
        else:
            shapes.append(tuple(header[pos:pos + ndim]))
            pos += ndim
    total = sum(_numel(s) for s in shapes if s is not None)
    tensors: list[torch.Tensor | None] = []
    if any(s is not None for s in shapes):
        payload = torch.empty(total, dtype=torch.long, device=device)
        dist.broadcast(payload, src=0, group=parallel_state.device_group())
        offset = 0
        for shape in shapes:
            if shape is None:
                tensors.append(None)
                continue
            n = _numel(shape)
            tensors.append(payload[offset:offset + n].view(shape))
            offset += n
    else:
        tensors = [None] * n_tensors
    return kind, ints, tensors


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
