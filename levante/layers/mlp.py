"""The gated MLP of a transformer block: down(act(gate(x)) * up(x)), gate and up fused."""
import torch
from torch import nn

from levante.layers.activation import GatedActivation
from levante.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """Column-parallel gate/up, row-parallel down: each rank holds a slice of the hidden width.
    `reduce_results=False` leaves the partial sums for the caller to add up (experts, layers/moe.py)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False,
                 reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, reduce_results=reduce_results)
        self.act = GatedActivation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
