"""Time the Triton paged-attention kernel on CUDA against torch SDPA on a gathered contiguous cache.

    python benchmarks/gpu_attention.py [--block-size 16]

Shapes of Qwen3-0.6B (16 heads, 8 KV heads, head dim 128, bf16): a decode step of 256 sequences
x 1024 context and a prefill of 8 x 512. Prints the median time (triton.testing.do_bench) and the
achieved bandwidth (bytes of K/V read + q read + out written) of each; the SDPA peer reads an
already gathered contiguous [B, KVH, L, D] cache (the gather itself is not timed, which favours it).
Needs CUDA and triton; it exits with a one-line message otherwise.
"""
import argparse
import sys

import torch
import torch.nn.functional as F


def paged_case(batch, q_len, ctx, heads, kv_heads, dim, block_size, dtype, device, seed=0):
    """Packed q, a shuffled paged cache holding each sequence's `ctx` keys, and the metadata."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per = -(-ctx // block_size)
    num_blocks = batch * blocks_per
    tables = torch.randperm(num_blocks, generator=g).view(batch, blocks_per).to(torch.int32)
    k = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(batch * q_len, heads, dim, generator=g).to(dtype)
    cu = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    return [t.to(device) for t in (q, k, v, tables, cu, lens)]


def gathered(k_cache, tables, ctx, block_size):
    """[B, KVH, ctx, D] contiguous copy of each sequence's keys (what SDPA needs)."""
    j = torch.arange(ctx, device=tables.device)
    slots = tables[:, j // block_size].long() * block_size + j % block_size  # [B, ctx]
    return k_cache[slots].transpose(1, 2).contiguous()


def bench(name, batch, q_len, ctx, heads, kv_heads, dim, block_size, dtype):
    import triton
    from levante.kernels.triton_attention import paged_attention_triton

    q, k, v, tables, cu, lens = paged_case(batch, q_len, ctx, heads, kv_heads, dim, block_size, dtype, "cuda")
    scale = dim ** -0.5
    out = torch.empty_like(q)

    def ours():
        paged_attention_triton(q, k, v, tables, cu, lens, block_size=block_size, scale=scale, max_q=q_len, out=out)

    kg, vg = gathered(k, tables, ctx, block_size), gathered(v, tables, ctx, block_size)
    qs = q.view(batch, q_len, heads, dim).transpose(1, 2)  # [B, H, q_len, D]

    def sdpa():
        if q_len == 1:
            return F.scaled_dot_product_attention(qs, kg, vg, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(qs, kg, vg, scale=scale, is_causal=True, enable_gqa=True)

    ours()
    ref = sdpa().transpose(1, 2).reshape(q.shape)
    err = (out.float() - ref.float()).abs().max().item()
    t_ours = triton.testing.do_bench(ours, return_mode="median")
    t_sdpa = triton.testing.do_bench(sdpa, return_mode="median")
    elt = q.element_size()
    nbytes = 2 * batch * ctx * kv_heads * dim * elt + 2 * q.numel() * elt
    flops = 4 * batch * heads * dim * (q_len * ctx - (q_len * (q_len - 1) // 2 if q_len > 1 else 0))
    for who, ms in (("triton paged", t_ours), ("torch sdpa (gathered)", t_sdpa)):
        print(f"{name:28s} {who:22s} {ms * 1e3:9.1f} us  {nbytes / ms / 1e6:8.0f} GB/s  "
              f"{flops / ms / 1e9:7.1f} TFLOP/s")
    print(f"{name:28s} max |triton - sdpa| = {err:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_attention: needs a CUDA device (none found)")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("gpu_attention: needs triton (not importable)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    shape = dict(heads=16, kv_heads=8, dim=128, block_size=args.block_size, dtype=torch.bfloat16)
    bench("decode 256 x ctx 1024", 256, 1, 1024, **shape)
    bench("decode 8 x ctx 4096", 8, 1, 4096, **shape)
    bench("prefill 8 x 512", 8, 512, 512, **shape)


if __name__ == "__main__":
    main()
