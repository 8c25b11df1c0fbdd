"""From token vectors to one vector per text: pooling, dense projections, normalisation.

Token vectors arrive as a right-padded batch, `[texts, max_len, hidden]`, with
`lengths` real tokens per text. The modes are sentence-transformers' own, and
computed its way (masked sums in float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.layers.linear import ReplicatedLinear

# sentence-transformers saves a Dense stage's activation as a torch class path.
DENSE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.Tanh": torch.tanh,
    "torch.nn.modules.activation.ReLU": F.relu,
    "torch.nn.modules.activation.GELU": F.gelu,
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
    "torch.nn.modules.activation.SiLU": F.silu,
}


def pool(hidden: torch.Tensor, lengths: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """[texts, max_len, hidden] right-padded -> [texts, hidden * len(modes)] float32, modes concatenated."""
    position = torch.arange(hidden.size(1), device=hidden.device)
    mask = (position < lengths.unsqueeze(1)).unsqueeze(-1)  # [texts, max_len, 1]
    return torch.cat([_pool_one(hidden, lengths, mask, mode) for mode in modes], dim=-1)


def _pool_one(hidden: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0].float()
    if mode == "lasttoken":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1].float()
    if mode == "max":
        return hidden.masked_fill(~mask, float("-inf")).amax(dim=1).float()
    count = lengths.float().unsqueeze(-1)
    if mode == "weightedmean":  # weights 1, 2, ... along each text
        weights = torch.arange(1, hidden.size(1) + 1, device=hidden.device).view(1, -1, 1) * mask
        return (hidden.float() * weights).sum(dim=1) / (count * (count + 1) / 2)
    sums = (hidden.float() * mask).sum(dim=1)
    if mode == "mean":
        return sums / count
    if mode == "mean_sqrt_len_tokens":
        return sums / count.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")


class Dense(nn.Module):
    """sentence-transformers' Dense stage: `activation(linear(x))` on pooled vectors."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: str):
        super().__init__()
        if activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"unsupported Dense activation '{activation}' "
                             f"(supported: {', '.join(n.rsplit('.', 1)[-1] for n in DENSE_ACTIVATIONS)})")
        self.linear = ReplicatedLinear(in_features, out_features, bias=bias)
        self.activation = DENSE_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x.to(self.linear.weight.dtype)))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row i of `a` against row i of `b` (rows broadcast), float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)
