"""The CPU paged-attention kernel (kernels/cpu/*_attention.c through native.paged_attention) against a
float64 reference computed from the same cache values, and the engine's default CPU path (the
kernel where it runs) against the SDPA path.

Cases: context lengths around the 16-key tile and past the 256-key ranges one sequence is split
into (one and two threads split differently), block sizes 1 to 32, grouped-query ratios 1 to 7,
head sizes with and without a partial 16-value tail, sliding windows, decode rows beside
prefill chunks, empty sequences, and sequences whose first blocks are shared (prefix cache).
Slots no sequence owns hold NaN and table entries past a sequence's blocks point out of range,
so a read outside the context shows.
"""
from __future__ import annotations

import pytest
import torch

from kernel_variants import kernel_variant  # noqa: F401
from levante.kernels import native

every_variant = pytest.mark.usefixtures("kernel_variant")  # each variant this CPU runs (kernel_variants.py)
needs_native = pytest.mark.skipif(not native.available(), reason="no native kernel variant runs here")

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(q, k_cache, v_cache, tables, q_lens, seq_lens, block_size, scale, window):
    """Per sequence, float64, from the definition (vectorised over a sequence's rows)."""
    heads, kv_heads = q.size(1), k_cache.size(1)
    out, row = torch.zeros(q.shape, dtype=torch.float64), 0
    for table, q_len, n in zip(tables, q_lens, seq_lens):
        if q_len == 0:
            continue
        pos = torch.arange(n)
        slots = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        keys = k_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        values = v_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        q_pos = torch.arange(n - q_len, n).unsqueeze(1)
        allowed = pos <= q_pos
        if window is not None:
            allowed &= q_pos - pos < window
        scores = torch.einsum("qhd,nhd->hqn", q[row:row + q_len].double(), keys) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[row:row + q_len] = torch.einsum("hqn,nhd->qhd", probs, values)
        row += q_len
    return out


def make_case(seq_lens, q_lens, *, block_size, heads, kv_heads, dim, dtype, shared_blocks=0, seed=0):
    """Caches and block tables for sequences of `seq_lens` tokens computing their last `q_lens`;
    with `shared_blocks`, every sequence's table starts with the same blocks (a prefix-cache hit)."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in seq_lens]
    num_blocks = shared_blocks + sum(max(0, c - shared_blocks) for c in counts) + 3
    free = torch.randperm(num_blocks, generator=g).tolist()
    shared = [free.pop() for _ in range(shared_blocks)]
    tables = [shared[:c] + [free.pop() for _ in range(max(0, c - shared_blocks))] for c in counts]
    k_cache = torch.full((num_blocks * block_size, kv_heads, dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    for table, n in zip(tables, seq_lens):
        pos = torch.arange(n)
        slots = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        k_cache[slots] = torch.randn(n, kv_heads, dim, generator=g)
        v_cache[slots] = torch.randn(n, kv_heads, dim, generator=g)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    width = max(1, max(counts))
    block_tables = torch.tensor([t + [num_blocks + 99] * (width - len(t)) for t in tables], dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables, block_tables, cu


def check(seq_lens, q_lens, *, block_size=16, heads=4, kv_heads=2, dim=64, dtype=torch.float32, window=None,
          shared_blocks=0, threads=(1, 2)):
    q, k_cache, v_cache, tables, block_tables, cu = make_case(
        seq_lens, q_lens, block_size=block_size, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype,
        shared_blocks=shared_blocks)
    scale = dim ** -0.5
    want = reference(q, k_cache, v_cache, tables, q_lens, seq_lens, block_size, scale, window)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    for count in threads:
        native.set_threads(count)
        try:
            got = native.paged_attention(q, k_cache, v_cache, block_tables, cu, lens, block_size=block_size,
                                         scale=scale, sliding_window=window)
        finally:
            native.set_threads(None)
        assert got.dtype == dtype and got.shape == q.shape and torch.isfinite(got).all()
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@every_variant
@pytest.mark.parametrize("length", [1, 15, 16, 17, 255, 700, 2100])
@pytest.mark.parametrize("block_size", [1, 5, 16, 32])
def test_decode_lengths_and_block_sizes(length, block_size):
    check([length, max(1, length // 3)], [1, 1], block_size=block_size)


@every_variant
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (14, 2), (6, 1)])
@pytest.mark.parametrize("dim", [8, 64, 80, 128, 256])
def test_grouped_query_ratios_and_head_sizes(heads, kv_heads, dim):
    check([600, 33, 1], [1, 1, 1], heads=heads, kv_heads=kv_heads, dim=dim)


@every_variant
@pytest.mark.parametrize("window", [1, 7, 16, 300, 5000])
def test_sliding_windows(window):
    """Decode rows and a prefill chunk, windows inside a tile, across tiles, and wider than the context."""
    check([1000, 40, 520], [1, 40, 9], window=window, block_size=8)


@every_variant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cache_dtypes(dtype):
    check([900, 70, 3], [1, 5, 3], dtype=dtype, heads=14, kv_heads=2)


@every_variant
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,shared_blocks", [(None, 0), (37, 0), (None, 20)])
def test_int8_caches(q_dtype, window, shared_blocks):
    """int8 caches (quant/kv_int8.py, read in place) against the reference on their dequantised values;
    NaN rows (slots no sequence owns) quantise to a NaN scale, so a read outside the context still shows."""
    from levante.quant import kv_int8

    seq_lens, q_lens = [900, 700, 33, 1], [1, 20, 1, 1]
    q, k_cache, v_cache, tables, block_tables, cu = make_case(
        seq_lens, q_lens, block_size=16, heads=14, kv_heads=2, dim=64, dtype=torch.float32,
        shared_blocks=shared_blocks)
    k8, v8 = kv_int8.quantize(k_cache), kv_int8.quantize(v_cache)
    want = reference(q.to(q_dtype), kv_int8.dequantize(k8), kv_int8.dequantize(v8), tables, q_lens, seq_lens, 16,
                     0.125, window)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    for count in (1, 2):
        native.set_threads(count)
        try:
            got = native.paged_attention(q.to(q_dtype), k8, v8, block_tables, cu, lens, block_size=16, scale=0.125,
                                         sliding_window=window)
        finally:
            native.set_threads(None)
        assert got.dtype == q_dtype and torch.isfinite(got).all()
        tol = TOLERANCE[q_dtype]
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@every_variant
def test_prefill_chunks_decode_rows_and_empty_sequences():
    """A ragged step: a whole prompt, a chunk after a prefix-cache hit, decode rows, a sequence with no rows."""
    check([300, 1200, 7, 0, 64], [300, 100, 1, 0, 1], heads=8, kv_heads=2, block_size=16)


@every_variant
@pytest.mark.parametrize("window", [None, 50])
def test_prefix_cache_sharing(window):
    """Sequences whose tables start with the same blocks (one copy of the shared prefix in the cache)."""
    check([700, 650, 333, 900], [1, 1, 20, 1], shared_blocks=20, window=window, heads=14, kv_heads=2)


@every_variant
@pytest.mark.skipif(not native.bf16_dot_supported(), reason="the bfloat16 path needs AVX512-BF16")
@pytest.mark.parametrize("case", [
    # (seq_lens, q_lens, heads, kv_heads, dim, block_size, window, shared_blocks)
    ([1, 15, 16, 17], [1, 1, 1, 1], 14, 2, 64, 16, None, 0),           # inside one tile, one past it
    ([63, 64, 65, 129], [1, 1, 1, 1], 14, 2, 64, 5, None, 0),          # chunk edges, blocks across tiles
    ([2100, 700], [1, 1], 14, 2, 64, 1, None, 0),                      # many chunks, key ranges split
    ([600, 33], [1, 1], 4, 4, 32, 16, None, 0),                        # no grouping, the smallest head
    ([600, 33], [1, 1], 16, 2, 128, 16, None, 0),                      # G 8: one full register group
    ([600, 33], [1, 1], 18, 2, 256, 8, None, 0),                       # G 9: a group of 8 and of 1
    ([300, 64], [1, 1], 64, 2, 64, 16, None, 0),                       # G 32: the largest the path takes
    ([300, 64], [1, 1], 66, 1, 64, 16, None, 0),                       # G 66: the general path
    ([1000, 40, 520], [1, 40, 9], 14, 2, 64, 8, 7, 0),                 # windows inside a tile, prefill rows
    ([1000, 40, 520], [1, 40, 9], 14, 2, 64, 8, 300, 0),               # windows across chunks
    ([300, 1200, 7, 0, 64], [300, 100, 1, 0, 1], 8, 2, 64, 16, None, 0),  # a prompt, a chunk, no rows
    ([700, 650, 333, 900], [1, 1, 20, 1], 14, 2, 64, 16, 50, 20),      # prefix-cache sharing
])
def test_bfloat16_path(case):
    """bfloat16 queries and caches (the usual decode, transposed key tiles and bfloat16 weights times
    values interleaved by pairs of keys) against the float64 definition; unowned slots are NaN."""
    seq_lens, q_lens, heads, kv_heads, dim, block_size, window, shared = case
    check(seq_lens, q_lens, heads=heads, kv_heads=kv_heads, dim=dim, block_size=block_size, window=window,
          shared_blocks=shared, dtype=torch.bfloat16)


@every_variant
def test_out_argument_and_layer_dispatch():
    from levante.layers.paged_attention import paged_attention, paged_attention_torch

    q, k_cache, v_cache, tables, block_tables, cu = make_case([40, 9], [3, 1], block_size=4, heads=4, kv_heads=2,
                                                              dim=16, dtype=torch.float32)
    lens = torch.tensor([40, 9], dtype=torch.int32)
    options = dict(block_size=4, scale=0.25, max_q=3)
    out = torch.full_like(q, float("nan"))
    assert paged_attention(q, k_cache, v_cache, block_tables, cu, lens, out=out, **options) is out
    torch.testing.assert_close(out, native.paged_attention(q, k_cache, v_cache, block_tables, cu, lens, **options))
    k_safe, v_safe = k_cache.nan_to_num(), v_cache.nan_to_num()  # the torch version reads whole blocks
    torch.testing.assert_close(out, paged_attention_torch(q, k_safe, v_safe, block_tables, cu, lens, **options),
                               atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])  # gemma3: sliding-window layers (window 16)
def test_long_context_matches_transformers(tiny_model, arch):
    """The engine's default CPU path (the kernel) against transformers over a 460-token prompt
    (prefilled in chunks, each sequence's keys split into ranges over two threads): the prompt's
    logits, a greedy continuation of 24 tokens and the logprob of each token chosen."""
    from levante import LLM, SamplingParams
    from tiny_models import load_reference

    folder = tiny_model(arch)
    prompt = torch.randint(3, 384, (460,), generator=torch.Generator().manual_seed(5)).tolist()
    native.set_threads(2)
    try:
        llm = LLM(str(folder), dtype="float32", block_size=16, max_model_len=512, max_num_batched_tokens=128)
        assert llm.engine.runner.paged
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0, return_prompt_logits=True)
        output = llm.generate([prompt], params)[0]
    finally:
        native.set_threads(None)
    tokens = output.outputs[0].token_ids
    with torch.no_grad():
        expected = load_reference(folder)(torch.tensor([prompt + tokens])).logits[0]
    torch.testing.assert_close(output.metrics["prompt_logits"], expected[:len(prompt)], atol=1e-4, rtol=0)
    continuation = expected[len(prompt) - 1:-1]
    assert tokens == continuation.argmax(-1).tolist()
    chosen = torch.tensor([next(iter(p.values())).logprob for p in output.outputs[0].logprobs])
    torch.testing.assert_close(chosen, continuation.log_softmax(-1)[torch.arange(24), tokens], atol=1e-4, rtol=0)
