import torch
import torch.nn.functional as F
from torch import nn

from levante.kernels import native


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. Gemma scales by (1 + weight): pass `unit_offset=True`;
    Gemma 3n's v-norm and projector norms have no scale at all: `scale=False`."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        if scale:
            self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim), requires_grad=False)
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        if native.small_op(x) and self.weight.dtype == x.dtype:  # a decode step's few rows: one call
            return native.rms_norm(x, self.weight, self.eps, self.unit_offset)
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one fused op: x * rsqrt(mean(x^2) + eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)
