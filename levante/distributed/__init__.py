"""Process-group helpers. With no tensor-parallel group set up levante runs as a single rank.

The group lives in parallel_state.py; layers read the size and rank when they are built
(`tp_size`, `tp_rank`: 1 and 0 except while a tensor-parallel model is being built) and,
when split, call `all_reduce` / `all_gather` in their forward.
"""
import torch
import torch.distributed as dist

from levante.distributed import parallel_state as _state


def tp_size() -> int:
    return _state.world_size()


def tp_rank() -> int:
    return _state.rank()


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if _state.group_size() > 1:
        dist.all_reduce(tensor, group=_state.device_group())
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `tensor`, concatenated along `dim` in rank order."""
    if _state.group_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_state.group_size())]
    dist.all_gather(parts, tensor.contiguous(), group=_state.device_group())
    return torch.cat(parts, dim=dim)
