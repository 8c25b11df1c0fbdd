"""Paged attention: packed queries attend to each sequence's context through its block table.

The interface, shared by `paged_attention_triton` (levante.kernels.triton_attention, the CUDA
kernel), `native.paged_attention` (levante.kernels.native: the CPU kernels of kernels/cpu/*_attention.c,
one per ISA) and `paged_attention_torch` here (plain PyTorch: the reference for tests and the
fallback where neither kernel runs):

    paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *,
                    block_size, scale, max_q, sliding_window=None, out=None) -> [T, H, D]

    q             [T, H, D]     the step's queries, sequence after sequence
    k/v_cache     [S, KVH, D]   a layer's cache; slot = block * block_size + offset (float: any float
                                dtype; int8: [S, KVH, D + 4], codes and scale, quant/kv_int8.py)
    block_tables  [B, W] int32  each sequence's block ids (entries past its blocks are never read)
    cu_seqlens_q  [B + 1] int32 sequence b owns query rows cu[b] .. cu[b+1]-1 (possibly none)
    seq_lens      [B] int32     context length after this step (the new keys are already written)
    max_q         python int    the longest query run of the step (sizes the grid)

Query row i of sequence b sits at position p = seq_lens[b] - q_len_b + i and attends keys j <= p
(and p - j < sliding_window when set); query head h reads KV head h // (H // KVH). Rows that see
no key come out as zeros, never NaN. No host synchronisation (CUDA-graph capturable); softmax in
float32, output in q's dtype. Not covered (the SDPA path of layers/attention.py keeps these):
attention without a cache, non-causal attention, image spans attending both ways (key_limits).

The torch version gathers the whole `[B, W * block_size]` context, so it is for small batches
and tests; where the native kernel cannot run, the CPU keeps the SDPA path instead.
"""
from __future__ import annotations

import logging

import torch

from levante.kernels import native
from levante.quant import kv_int8

logger = logging.getLogger("levante")

_TRITON = None  # the kernel function once it imported and reported available; False: never


def _triton_kernel():
    global _TRITON
    if _TRITON is None:
        _TRITON = False
        try:
            from levante.kernels.triton_attention import paged_attention_triton, triton_available
            if triton_available():
                _TRITON = paged_attention_triton
        except Exception as e:  # the module or triton is absent: the torch path serves
            logger.debug("paged attention: no triton kernel (%s)", e)
    return _TRITON


def triton_paged_attention_available() -> bool:
    return bool(_triton_kernel())


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *, block_size: int,
                    scale: float, max_q: int, sliding_window: int | None = None, out=None) -> torch.Tensor:
    """The Triton kernel for CUDA tensors when it is available, the native kernel for CPU
    tensors where it runs, else `paged_attention_torch`."""
    if q.is_cuda:
        kernel = _triton_kernel()
    else:
        kernel = native.paged_attention if native.paged_attention_fits(q, k_cache) else None
    fn = kernel or paged_attention_torch
    return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, block_size=block_size, scale=scale,
              max_q=max_q, sliding_window=sliding_window, out=out)


def paged_attention_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *, block_size: int,
                          scale: float, max_q: int, sliding_window: int | None = None, out=None) -> torch.Tensor:
    """q [T, H, D]; caches [S, KVH, D]; block_tables [B, W]; cu_seqlens_q [B + 1]; seq_lens [B] -> [T, H, D].

    Query row i of sequence b sits at position seq_lens[b] - q_len_b + i and sees keys j <= it
    (and within the window). Rows of empty sequences come out as zeros."""
    tokens, heads, dim = q.shape
    batch, width = block_tables.shape
    kv_heads = k_cache.size(1)
    group = heads // kv_heads
    dev = q.device
    cu = cu_seqlens_q.long()
    lens = seq_lens.long()
    q_lens = cu[1:] - cu[:-1]
    # Keys: slot of every context position of every sequence, [B, W * block_size].
    key_pos = torch.arange(width * block_size, device=dev)
    key_valid = key_pos < lens.unsqueeze(1)  # [B, K]
    blocks = block_tables.long().gather(1, (key_pos // block_size).expand(batch, -1))
    slots = torch.where(key_valid, blocks * block_size + key_pos % block_size, 0)
    keys = kv_int8.cache_values(k_cache[slots], torch.float32)  # [B, K, KVH, D]
    values = kv_int8.cache_values(v_cache[slots], torch.float32)
    values = torch.where(key_valid[..., None, None], values, 0.0)  # never-written slots: 0
    # Queries padded to [B, max_q]; rows past a sequence's q_len read row 0 and are dropped.
    row = torch.arange(max_q, device=dev)
    q_valid = row < q_lens.unsqueeze(1)  # [B, max_q]
    q_index = torch.where(q_valid, cu[:-1].unsqueeze(1) + row, 0)
    queries = q[q_index.view(-1)].view(batch, max_q, kv_heads, group, dim).float()
    q_pos = (lens - q_lens).unsqueeze(1) + row  # [B, max_q]
    allowed = key_valid.unsqueeze(1) & (key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1))  # [B, max_q, K]
    if sliding_window is not None:
        allowed = allowed & (q_pos.unsqueeze(-1) - key_pos.view(1, 1, -1) < sliding_window)
    allowed = allowed & q_valid.unsqueeze(-1)
    # scores [B, KVH, max_q, group, K]
    scores = torch.einsum("bqhgd,bkhd->bhqgk", queries, keys) * scale
    mask = allowed.view(batch, 1, max_q, 1, -1)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)  # fully masked rows: 0, not NaN
    result = torch.einsum("bhqgk,bkhd->bqhgd", probs, values).reshape(batch * max_q, heads, dim)
    # Back to packed rows; padding rows go to a spare row past the end.
    target = torch.where(q_valid, q_index, tokens).view(-1)
    packed = torch.zeros(tokens + 1, heads, dim, dtype=q.dtype, device=dev)
    packed.index_copy_(0, target, result.to(q.dtype))
    if out is None:
        return packed[:tokens]
    out.copy_(packed[:tokens])
    return out
