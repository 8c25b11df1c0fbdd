"""Pieces vision towers share: attention within segments of packed patches, 2-D rotary angles.

A vision tower runs once per image, outside the paged KV cache: its patches (of all
images of a batch) are packed `[num_patches, ...]` and attend only inside their own
segment (an image, a frame, or a window of one), given by cumulative lengths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                      scale: float) -> torch.Tensor:
    """q, k, v: [tokens, heads, head_dim]; bidirectional attention inside each [cu[i], cu[i+1]).

    Segments of equal length run as one batched SDPA call (windows are mostly one size).
    Returns [tokens, heads * head_dim].
    """
    tokens, heads, head_dim = q.shape
    out = q.new_empty(tokens, heads, head_dim)
    by_length: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        index = (torch.tensor(starts, device=q.device).unsqueeze(1)
                 + torch.arange(length, device=q.device)).reshape(-1)
        shape = (len(starts), length, heads, head_dim)
        qs, ks, vs = (t.index_select(0, index).view(shape).transpose(1, 2) for t in (q, k, v))
        result = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out.index_copy_(0, index, result.transpose(1, 2).reshape(-1, heads, head_dim))
    return out.view(tokens, heads * head_dim)


def rope_2d(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D rotary angles: positions [tokens, 2] (row, column) -> cos, sin [tokens, 1, head_dim // 2].

    The first half of the rotated frequencies follows the row, the second the column
    (Qwen2-VL family); use with `layers.rotary.rotate`.
    """
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=positions.device) / quarter))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [tokens, 2, head_dim // 4]
    freqs = freqs.flatten(1)
    return freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1)
