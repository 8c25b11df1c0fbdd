"""The native paged attention (levante/kernels/cpu/*_attention.c) beside PyTorch's, one decode step's calls.

    python benchmarks/attention_kernel.py [--contexts 512 4096 16384] [--threads 1 2] [--layers 24]
                                          [--repeats 5]

The default model's shape (14 query heads, 2 KV heads of 64, blocks of 16 in shuffled order), one
decode row, bfloat16 queries; a cache per layer, `--layers` of them called in turn, so that at a
long context the reads come from memory as in a real step rather than from a warm cache. Prints
milliseconds per step (all layers; the best of `--repeats`) and the cache bytes read per second for
the native kernel with a bfloat16 and an int8 cache, and for `paged_attention_torch` (gather, then
PyTorch's attention: the peer, in the same run) with the bfloat16 cache.
"""
from __future__ import annotations

import argparse
import time

import torch

from levante.layers.paged_attention import paged_attention_torch
from levante.kernels import native
from levante.quant import kv_int8

HEADS, KV_HEADS, DIM, BLOCK = 14, 2, 64, 16


def step_time(fn, layers: int, repeats: int, calls: int) -> float:
    for i in range(layers):
        fn(i)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(i % layers)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("the native kernels do not run here")
    generator = torch.Generator().manual_seed(0)
    print(f"{HEADS} query heads, {KV_HEADS} KV heads of {DIM}, {args.layers} layers; ms per step (cache GB/s); "
          f"bfloat16 path: {getattr(native, 'bf16_dot_supported', lambda: False)()}")
    for context in args.contexts:
        blocks = -(-context // BLOCK)
        table = torch.randperm(blocks + 8, generator=generator)[:blocks].to(torch.int32)[None]
        cu, lens = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([context], dtype=torch.int32)
        q = torch.randn(1, HEADS, DIM, generator=generator).bfloat16()
        shape = ((blocks + 8) * BLOCK, KV_HEADS, DIM)
        caches = {"bfloat16": [(torch.randn(shape, generator=generator).bfloat16(),
                                torch.randn(shape, generator=generator).bfloat16()) for _ in range(args.layers)]}
        caches["int8"] = [(kv_int8.quantize(k.float()), kv_int8.quantize(v.float())) for k, v in caches["bfloat16"]]
        options = dict(block_size=BLOCK, scale=DIM ** -0.5, max_q=1)
        calls = max(args.layers, 200_000 // context)
        for threads in args.threads:
            native.set_threads(threads)
            torch.set_num_threads(threads)
            row = []
            for name, fn, cache in (
                    ("native bfloat16", native.paged_attention, "bfloat16"),
                    ("native int8", native.paged_attention, "int8"),
                    ("torch bfloat16", paged_attention_torch, "bfloat16")):
                layers = caches[cache]
                seconds = step_time(lambda i: fn(q, *layers[i], table, cu, lens, **options), args.layers,
                                    args.repeats, calls if name.startswith("native") else args.layers)
                read = context * KV_HEADS * 2 * layers[0][0][0, 0].numel() * layers[0][0].element_size() * args.layers
                row.append((name, seconds))
                print(f"{context:>6} keys  {threads} thread(s)  {name:<16} {seconds * 1e3:8.2f} ms "
                      f"({read / seconds / 1e9:5.1f} GB/s)")
            native_ms, torch_ms = row[0][1], row[2][1]
            print(f"{context:>6} keys  {threads} thread(s)  native bfloat16 / torch: {torch_ms / native_ms:.2f}x faster")
    native.set_threads(None)


if __name__ == "__main__":
    main()
