"""Paged attention on CUDA with one Triton kernel (prefill chunks and decode alike).

Packed queries of a step attend, causally (optionally within a sliding window), to each
sequence's context read straight out of the paged KV cache through its block table: no
gather, no padding to the longest sequence, no host synchronisation (CUDA-graph capturable:
the grid depends only on python ints). The kernel follows the design of vLLM's Triton
"unified attention": one program per (sequence, query tile, KV head), the tile covering
query rows x the query heads grouped on that KV head; see `_triton_attention_kernel`.
Decode steps with few (sequence, KV head) pairs split each context over several programs
and merge the partial softmaxes in a second small kernel (flash-decoding; `SPLIT_KV_BELOW`).

Triton is imported lazily: this module imports where triton is absent (CPU CI);
`triton_available()` says whether the kernel can run.
"""
from __future__ import annotations

import math

import torch

_KERNELS = None
# Decode steps with fewer (sequence, KV head) programs than this split each sequence's keys
# (flash-decoding); 0 turns split-KV off.
SPLIT_KV_BELOW = 256


def triton_available() -> bool:
    """Whether triton imports here (the kernel also needs CUDA tensors, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from levante.kernels._triton_attention_kernel import combine_splits_kernel, paged_attention_kernel
        _KERNELS = paged_attention_kernel, combine_splits_kernel
    return _KERNELS


def _num_splits(max_q: int, batch: int, num_kv_heads: int) -> int:
    """Key-range splits per (sequence, KV head): > 1 only for decode steps too small to fill the GPU."""
    programs = batch * num_kv_heads
    if max_q != 1 or programs >= SPLIT_KV_BELOW:
        return 1
    return 16 if programs <= 64 else 8 if programs <= 128 else 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tiles(max_q: int, group: int, d_pad: int, fp32: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, TILE_N, num_warps) for a step: rows of a tile = query positions x grouped heads.

    Sized to stay within registers on sm_90 (checked with ptxas: no spills for 16-bit inputs up to
    D 128, a few bytes at 256); float32 inputs (tests, not the serving path) take smaller tiles.
    """
    big = 64 if d_pad >= 256 or fp32 else 128
    block_m = min(big, max(16, _next_pow2(max_q * group)))
    block_m = max(block_m, _next_pow2(group))  # at least one query position per tile
    tile_n = 32 if d_pad >= 256 or fp32 else 64
    num_warps = 8 if block_m >= 128 or d_pad >= 256 else 4
    return block_m, tile_n, num_warps


def paged_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *,
                           block_size: int, scale: float, max_q: int,
                           sliding_window: int | None = None, out=None) -> torch.Tensor:
    """Causal attention of packed queries `q` [T, H, D] over the paged cache; the interface is in
    layers/paged_attention.py.

    Query row i of sequence b (rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1) sits at position
    seq_lens[b] - q_len_b + i and sees keys j <= its position (and within the sliding window).
    Rows that see no key get zeros. Returns `out` (written in place) or a new tensor.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if k_cache.shape[2] != head_dim or v_cache.shape[2] != head_dim or v_cache.shape[1] != num_kv_heads:
        raise ValueError(f"KV cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"KV cache dtype {k_cache.dtype} differs from q dtype {q.dtype}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    batch = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or cu_seqlens_q.shape != (batch + 1,):
        raise ValueError(f"metadata shapes do not agree: block_tables {tuple(block_tables.shape)}, "
                         f"cu_seqlens_q {tuple(cu_seqlens_q.shape)}, seq_lens {tuple(seq_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(f"{name} must be an integer tensor on {q.device}, got {t.dtype} on {t.device}")
    if num_tokens == 0 or batch == 0 or max_q <= 0:
        return out

    group = num_heads // num_kv_heads
    d_pad = max(16, _next_pow2(head_dim))
    block_m, tile_n, num_warps = _tiles(max_q, group, d_pad, q.dtype == torch.float32)
    block_q = block_m // group
    splits = _num_splits(max_q, batch, num_kv_heads)
    grid = (batch, splits if splits > 1 else triton_cdiv(max_q, block_q), num_kv_heads)
    if splits > 1:  # float32 partials per (token, head, split); unwritten rows read as empty
        part_m = torch.full((num_tokens, num_heads, splits), float("-inf"), dtype=torch.float32, device=q.device)
        part_l = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=q.device)
        part_acc = torch.empty((num_tokens, num_heads, splits, d_pad), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # not read
    window = sliding_window if sliding_window is not None else 0
    attend, combine = _kernels()
    interpret = q.device.type != "cuda"
    attend[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_tables.stride(0),
        part_m, part_l, part_acc, num_heads,
        float(scale) * math.log2(math.e),
        int(window),
        int(block_size),
        G=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
        USE_WINDOW=sliding_window is not None, IEEE=q.dtype == torch.float32, INTERPRET=interpret,
        NUM_SPLITS=splits, num_warps=num_warps,
    )
    if splits > 1:
        combine[(num_tokens, num_heads)](
            part_m, part_l, part_acc, out, out.stride(0), out.stride(1), out.stride(2), num_heads,
            HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=splits, num_warps=4,
        )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
