import torch
import torch.nn.functional as F
from torch import nn

from levante.kernels import native


class GatedActivation(nn.Module):
    """act(gate) * up over a fused [gate | up] projection output."""

    def __init__(self, hidden_act: str):
        super().__init__()
        self.silu = hidden_act == "silu"
        if hidden_act == "silu":
            self.act = F.silu
        elif hidden_act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = lambda x: F.gelu(x, approximate="tanh")
        elif hidden_act == "gelu":
            self.act = F.gelu
        else:
            raise ValueError(f"unsupported activation {hidden_act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu and native.small_op(x):  # a decode step's few rows: one call
            return native.silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
