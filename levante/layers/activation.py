import torch
import torch.nn.functional as F
from torch import nn


class GatedActivation(nn.Module):
    """act(gate) * up over a fused [gate | up] projection output."""

    def __init__(self, hidden_act: str):
        super().__init__()
        if hidden_act == "silu":
            self.act = F.silu
        elif hidden_act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = lambda x: F.gelu(x, approximate="tanh")
        elif hidden_act == "gelu":
            self.act = F.gelu
        else:
            raise ValueError(f"unsupported activation {hidden_act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
