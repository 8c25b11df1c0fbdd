"""Attention of a decoder's queries over a fixed memory: an encoder's output (encoder-decoder models,
Whisper). The memory's keys and values are projected once per input and kept here (`remember`);
every decoding step then attends over all of them, with no mask (the memory has no padding: Whisper's
encoder always reads 30 s).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.keys: torch.Tensor | None = None  # [batch, heads, memory, head_dim]
        self.values: torch.Tensor | None = None

    def remember(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [batch, memory, heads * head_dim], the projections of the memory."""
        batch = keys.size(0)
        self.keys, self.values = (t.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
                                  for t in (keys, values))

    def forget(self) -> None:
        self.keys = self.values = None

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: [batch * queries, heads * head_dim], each memory row's queries together -> same shape."""
        batch = self.keys.size(0)
        queries = q.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, self.keys, self.values, scale=self.scale)
        return out.transpose(1, 2).reshape(q.shape)
