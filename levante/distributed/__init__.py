"""Process-group helpers. With no group initialised levante runs as a single rank."""
import torch.distributed as dist


def tp_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(tensor):
    if tp_size() > 1:
        dist.all_reduce(tensor)
    return tensor
