"""Linear layers that know how to load (and, under tensor parallelism, shard) their weights.

As in nano-vllm: each parameter carries a `weight_loader(param, loaded, shard_id)`
so a checkpoint's separate q/k/v or gate/up tensors land in one fused matrix,
and a column/row-parallel rank keeps only its slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.distributed import all_reduce, tp_rank, tp_size


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, shard_dim: int | None):
        super().__init__()
        self.shard_dim = shard_dim
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _shard(self, loaded: torch.Tensor, dim: int | None) -> torch.Tensor:
        if dim is None or self.tp_size == 1 or loaded.dim() <= dim:
            return loaded
        size = loaded.size(dim) // self.tp_size
        return loaded.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        param.data.copy_(self._shard(loaded, self.shard_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias, shard_dim=None)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features // tp_size(), bias, shard_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (gate and up) stored as one matrix."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0):
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        param.data.narrow(0, offset, size).copy_(self._shard(loaded, 0))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; kv heads are split across ranks like q heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.q_size = num_heads // tp * head_dim
        self.kv_size = max(1, num_kv_heads // tp) * head_dim
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str = "q"):
        offset = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}[shard_id]
        size = self.q_size if shard_id == "q" else self.kv_size
        param.data.narrow(0, offset, size).copy_(self._shard(loaded, 0))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features // tp_size(), out_features, bias, shard_dim=1)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        param.data.copy_(self._shard(loaded, 1 if loaded.dim() == 2 else None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return all_reduce(F.linear(x, self.weight, bias))
