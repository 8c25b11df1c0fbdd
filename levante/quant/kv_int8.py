"""The 8-bit KV cache (`--kv-cache-dtype int8`): one int8 row per (token, KV head) with its scale.

A cache row of a KV head holds ``head_dim`` int8 codes followed by the float32 scale's 4 bytes, so a
layer's int8 cache is one tensor ``[slots, kv_heads, head_dim + 4]`` (int8) that every road handles
as it handles a float cache: written at `slot_mapping`, gathered through `key_slots`, shared between
Gemma 3n layers. ``value = code * scale`` with ``scale = max |x| / 127`` over the row (symmetric,
round to nearest): llama.cpp's q8_0 with one block per head row instead of blocks of 32 (any head
size works, and the dot product of a row needs one multiplication by its scale). The native kernel
(quant/attention.c) reads the codes in place; `dequantize` serves the PyTorch paths.
"""
from __future__ import annotations

import torch

SCALE_BYTES = 4  # the float32 scale after each row's codes


def row_bytes(head_dim: int) -> int:
    """Bytes of one (token, KV head) row of an int8 cache."""
    return head_dim + SCALE_BYTES


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> [..., D + 4] int8: the codes, then the row's float32 scale as bytes."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127.0
    codes = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)).to(torch.int8)
    return torch.cat([codes, scale.view(torch.int8)], dim=-1)


def dequantize(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., D + 4] int8 (from `quantize`) -> [..., D] `dtype`."""
    dim = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., dim:].contiguous().view(torch.float32)
    return (rows[..., :dim].float() * scale).to(dtype)


def cache_values(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows gathered from any KV cache as `dtype` values: an int8 cache's dequantised, others cast."""
    return dequantize(rows, dtype) if rows.dtype == torch.int8 else rows.to(dtype)
