"""The Triton paged-attention kernel against a float64 torch reference.

Runs on CUDA when present, else on the CPU under the Triton interpreter (TRITON_INTERPRET=1 must be
set before triton is imported, hence at the top of this module); skipped where triton is absent.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from levante.kernels.triton_attention import paged_attention_triton, triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k_cache, v_cache, block_tables, cu, seq_lens, block_size, scale, window):
    """Per sequence: gather its keys by block table, mask causal/window, softmax in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    group = heads // kv_heads
    for b in range(len(seq_lens)):
        start, end, n = int(cu[b]), int(cu[b + 1]), int(seq_lens[b])
        if end == start or n == 0:
            continue
        j = torch.arange(n)
        slots = block_tables[b, j // block_size].long() * block_size + j % block_size
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        qb = q[start:end].double()  # [ql, H, D]
        pos = n - (end - start) + torch.arange(end - start)
        allowed = j[None, :] <= pos[:, None]
        if window is not None:
            allowed &= pos[:, None] - j[None, :] < window
        s = torch.einsum("qhd,khd->hqk", qb, k) * scale
        s = s.masked_fill(~allowed[None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows seeing nothing: zeros
        out[start:end] = torch.einsum("hqk,khd->qhd", p, v)
    return out


def make_case(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q and a shuffled paged cache; unused block-table entries hold garbage ids."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per) + 3
    width = max(blocks_per + [1]) + 2
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seq_lens), width), 10**6, dtype=torch.int32)  # out-of-range: must never be read
    used = 0
    for b, nb in enumerate(blocks_per):
        tables[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    slots = num_blocks * block_size
    k = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, tables, cu, torch.tensor(seq_lens, dtype=torch.int32)


def run_case(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, window=None, give_out=True):
    q, k, v, tables, cu, lens = make_case(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    ref = reference(q, k, v, tables, cu, lens, block_size, scale, window)
    dev = [t.to(DEVICE) for t in (q, k, v, tables, cu, lens)]
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE) if give_out else None
    got = paged_attention_triton(*dev, block_size=block_size, scale=scale, max_q=max(q_lens),
                                 sliding_window=window, out=out)
    if give_out:
        assert got.data_ptr() == out.data_ptr()
    got = got.cpu()
    assert got.dtype == dtype and got.shape == q.shape
    assert not got.isnan().any(), "some output element was not written (or NaN)"
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def test_available():
    assert triton_available()


# A mixed step: a prefill chunk with a cached prefix, a fresh prefill, decodes, a q_len 0 row
# (a sequence idle this step) and a seq_len 0 row (CUDA-graph padding).
MIXED = dict(q_lens=[9, 0, 1, 5, 1, 0], seq_lens=[23, 17, 40, 5, 1, 0])


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (14, 2)])
def test_mixed_batch_gqa(heads, kv_heads):
    run_case(**MIXED, heads=heads, kv_heads=kv_heads, head_dim=64, block_size=16, dtype=torch.float32)


@pytest.mark.parametrize("head_dim", [80, 96, 128, 256])
def test_head_dims(head_dim):
    run_case(**MIXED, heads=4, kv_heads=2, head_dim=head_dim, block_size=16, dtype=torch.float32)


def test_odd_block_size_bf16():
    run_case(**MIXED, heads=14, kv_heads=2, head_dim=64, block_size=5, dtype=torch.bfloat16)


@pytest.mark.parametrize("block_size", [16, 5])
def test_sliding_window(block_size):
    run_case(q_lens=[12, 1, 3, 0], seq_lens=[30, 25, 3, 4], heads=4, kv_heads=2, head_dim=64,
             block_size=block_size, dtype=torch.float32, window=7)


@pytest.mark.parametrize("split_kv", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_batch_no_out(split_kv, dtype, monkeypatch):
    # Small decode batches split each context over several programs (flash-decoding) unless turned off.
    import levante.kernels.triton_attention as ta

    monkeypatch.setattr(ta, "SPLIT_KV_BELOW", 256 if split_kv else 0)
    assert (ta._num_splits(1, 7, 1) > 1) == split_kv
    run_case(q_lens=[1] * 7, seq_lens=[1, 7, 16, 17, 33, 200, 0], heads=8, kv_heads=1, head_dim=64,
             block_size=16, dtype=dtype, give_out=False)


@pytest.mark.parametrize("split_kv", [True, False])
def test_decode_sliding_window(split_kv, monkeypatch):
    import levante.kernels.triton_attention as ta

    monkeypatch.setattr(ta, "SPLIT_KV_BELOW", 256 if split_kv else 0)
    run_case(q_lens=[1, 1, 1, 0], seq_lens=[150, 20, 70, 9], heads=4, kv_heads=2, head_dim=80, block_size=5,
             dtype=torch.float32, window=33)


def test_long_prefill_tiles():
    # q_len past one query tile (BLOCK_Q = 128 // 2 = 64) and keys past one key tile.
    run_case(q_lens=[70, 1], seq_lens=[90, 1], heads=2, kv_heads=1, head_dim=64, block_size=16,
             dtype=torch.float32)


def test_padded_graph_rows_write_zeros():
    # seq_len 0 with q_len 1: a padding row of a captured decode graph; it must come out zero.
    q, k, v, tables, cu, lens = make_case([1, 1], [0, 3], 4, 2, 64, 16, torch.float32)
    dev = [t.to(DEVICE) for t in (q, k, v, tables, cu, lens)]
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    paged_attention_triton(*dev, block_size=16, scale=0.125, max_q=1, out=out)
    assert out[0].eq(0).all() and not out.isnan().any()


def test_gqa7_prefill_spans_query_tiles():
    # 7 heads per KV head: a 128-row tile holds 18 query positions (2 rows idle); 40 rows need 3 tiles.
    run_case(q_lens=[40, 1, 3], seq_lens=[47, 12, 3], heads=14, kv_heads=2, head_dim=64, block_size=16,
             dtype=torch.bfloat16)


def test_strided_cache_views():
    # The caches may be views into a larger buffer (e.g. [slots, 2, kv_heads, dim] holding K and V).
    q, k, v, tables, cu, lens = make_case([4, 1], [20, 9], 4, 2, 64, 5, torch.float32)
    ref = reference(q, k, v, tables, cu, lens, 5, 0.125, None)
    kv = torch.stack([k, v], dim=1).to(DEVICE)
    qs = torch.cat([q, q], dim=2).to(DEVICE)[:, :, :64]  # non-contiguous q
    dev = [t.to(DEVICE) for t in (tables, cu, lens)]
    got = paged_attention_triton(qs, kv[:, 0], kv[:, 1], *dev, block_size=5, scale=0.125, max_q=4)
    torch.testing.assert_close(got.cpu().double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real-size shapes: too slow for the interpreter")
@pytest.mark.parametrize("window", [None, 256])
def test_real_sizes_cuda(window):
    # A long prefill chunk over a cached prefix among many decodes, Qwen2.5-0.5B heads (14 / 2, dim 64).
    q_lens = [300] + [1] * 40 + [0, 17]
    seq_lens = [2300] + [37 * i + 1 for i in range(40)] + [100, 17]
    run_case(q_lens, seq_lens, heads=14, kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16,
             window=window)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_capture_and_replay():
    # Captured once, replayed after the metadata tensors change in place (what the runner does per step).
    q, k, v, tables, cu, lens = [t.cuda() for t in make_case([1] * 4, [5, 40, 1, 0], 8, 2, 128, 16,
                                                                torch.bfloat16)]
    out = torch.empty_like(q)

    def step():
        paged_attention_triton(q, k, v, tables, cu, lens, block_size=16, scale=128 ** -0.5, max_q=1, out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_lens in ([6, 41, 2, 0], [1, 3, 0, 0]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), cu.cpu(), lens.cpu(), 16, 128 ** -0.5, None)
        torch.testing.assert_close(out.cpu().double(), ref, atol=2e-2, rtol=2e-2)


def test_compiles_for_sm90_without_spills():
    # The compiled path (no GPU needed: triton bundles ptxas) in a fresh interpreter without TRITON_INTERPRET.
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(here / "triton_compile_check.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_bad_metadata_is_a_clear_error():
    q, k, v, tables, cu, lens = make_case([1, 1], [3, 4], 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="metadata shapes"):
        paged_attention_triton(q, k, v, tables, cu[:-1], lens, block_size=16, scale=0.125, max_q=1)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_triton(q[:, :3], k, v, tables, cu, lens, block_size=16, scale=0.125, max_q=1)
    with pytest.raises(ValueError, match="integer"):
        paged_attention_triton(q, k, v, tables.float(), cu, lens, block_size=16, scale=0.125, max_q=1)
