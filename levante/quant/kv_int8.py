"""The 8-bit KV cache (`--kv-cache-dtype int8`): int8 codes with a float16 scale per 16 values.

A cache row of a KV head holds ``head_dim`` int8 codes followed by one float16 scale per block of 16
of them (the last block may be shorter), so a layer's int8 cache is one tensor
``[slots, kv_heads, row_bytes(head_dim)]`` (int8) that every road handles as it handles a float
cache: written at `slot_mapping`, gathered through `key_slots`, shared between Gemma 3n layers.
``value = code * scale`` with ``scale = max |x| / 127`` over the block (symmetric, round to
nearest): llama.cpp's q8_0 with blocks of 16 instead of 32, so that each 16-lane vector of the
native kernel (kernels/cpu/*_attention.c) has one scale; measured on Qwen2.5 (benchmarks/kv_cache_quality.py),
blocks of 16 halve the KL divergence of blocks of 32 and one scale per head row is 3x worse.

Keys may be stored shifted by a constant vector per KV head (`Attention.key_offset`: the key
projection's bias where the model has one): a query's scores then all move by the same amount,
which softmax ignores, while the shift removes the large constant channels (Qwen2's key bias
reaches 145 where keys are ~7) that would otherwise take the whole int8 range.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from levante.kernels import native

BLOCK = 16  # values per scale
_F16_MAX = torch.finfo(torch.float16).max


def num_blocks(head_dim: int) -> int:
    return -(-head_dim // BLOCK)


def row_bytes(head_dim: int) -> int:
    """Bytes of one (token, KV head) row of an int8 cache: the codes, then a float16 scale per block."""
    return head_dim + 2 * num_blocks(head_dim)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> [..., row_bytes(D)] int8: the codes, then each block's float16 scale as bytes."""
    dim, blocks = x.shape[-1], num_blocks(x.shape[-1])
    padded = F.pad(x.float(), (0, blocks * BLOCK - dim)).unflatten(-1, (blocks, BLOCK))
    scale = (padded.abs().amax(-1, keepdim=True) / 127).clamp(max=_F16_MAX).to(torch.float16)
    codes = torch.round(padded / scale.float().clamp_min(torch.finfo(torch.float32).tiny)).clamp(-127, 127)
    return torch.cat([codes.to(torch.int8).flatten(-2)[..., :dim], scale.squeeze(-1).view(torch.int8)], dim=-1)


def dequantize(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., row_bytes(D)] int8 (from `quantize`) -> [..., D] `dtype`."""
    blocks = -(-rows.shape[-1] // (BLOCK + 2))  # D in (16(b-1), 16b] makes the row (18b-16, 18b] bytes
    dim = rows.shape[-1] - 2 * blocks
    scale = rows[..., dim:].contiguous().view(torch.float16).float()  # [..., blocks]
    codes = F.pad(rows[..., :dim].float(), (0, blocks * BLOCK - dim)).unflatten(-1, (blocks, BLOCK))
    return (codes * scale.unsqueeze(-1)).flatten(-2)[..., :dim].to(dtype)


def store(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, offset: torch.Tensor | None = None) -> None:
    """Write x [T, KVH, D] (less `offset` [KVH, D], if any) into an int8 cache at `slots`: with the
    native kernels in one pass (no temporaries: a decode step writes 2 x layers of these), else
    through `quantize`; both write the same bytes."""
    if cache.device.type == "cpu" and cache.is_contiguous() and x.dtype in native._Q_DTYPES and native.available():
        native.kv_int8_store(x, cache, slots, offset)
        return
    if offset is not None:
        x = x.float() - offset
    cache.index_copy_(0, slots, quantize(x))


def cache_values(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows gathered from any KV cache as `dtype` values: an int8 cache's dequantised, others cast."""
    return dequantize(rows, dtype) if rows.dtype == torch.int8 else rows.to(dtype)
