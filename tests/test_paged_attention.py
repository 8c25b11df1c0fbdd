"""Paged attention (layers/paged_attention.py) and the padded decode path (engine/cuda_graph.py).

On CPU: `paged_attention_torch` against a per-sequence float64 reference and against the SDPA
path; whole-engine runs of the default CPU path (the native kernel, tests/test_native_attention.py),
the paged path's PyTorch version and the padded static-buffer decode path (LEVANTE_PAGED_ATTENTION /
LEVANTE_PADDED_DECODE) against the SDPA path.
On CUDA (skipped here): CUDA graphs vs enforce_eager vs CPU float32.
"""
import math

import pytest
import torch
from torch import nn

from levante import LLM, SamplingParams
from levante.engine.cuda_graph import graph_batch_sizes
from levante.engine.runner import PADDED_DECODE_ENV, PAGED_ENV, ModelRunner
from levante.layers.attention import Attention, attention_metadata
from levante.layers.paged_attention import paged_attention, paged_attention_torch, triton_paged_attention_available


def _reference(q, k_cache, v_cache, tables, q_lens, seq_lens, block_size, scale, window):
    """One sequence at a time, float64, straight from the definition."""
    heads, kv_heads = q.size(1), k_cache.size(1)
    out, row = torch.zeros_like(q, dtype=torch.float64), 0
    for table, q_len, n in zip(tables, q_lens, seq_lens):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(n)]
        keys = k_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        values = v_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        for i in range(q_len):
            p = n - q_len + i
            allowed = torch.tensor([j <= p and (window is None or p - j < window) for j in range(n)])
            scores = torch.einsum("hd,nhd->hn", q[row + i].double(), keys) * scale
            scores = scores.masked_fill(~allowed, -math.inf)
            out[row + i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values)
        row += q_len
    return out


def _ragged_case(block_size=3, heads=4, kv_heads=2, dim=8, seed=0):
    """Decode rows, a prefill chunk after a prefix-cache hit, a whole prompt, an empty row."""
    g = torch.Generator().manual_seed(seed)
    q_lens = [1, 5, 1, 7, 0, 1]
    seq_lens = [9, 12, 1, 7, 0, 20]
    num_blocks = 40
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in seq_lens:
        count = -(-n // block_size)
        tables.append(perm[used:used + count])
        used += count
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [num_blocks + 99] * (width - len(t)) for t in tables], dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, tables, block_tables, cu, q_lens, seq_lens


@pytest.mark.parametrize("window", [None, 4])
def test_paged_attention_torch_matches_a_per_sequence_reference(window):
    q, k_cache, v_cache, tables, block_tables, cu, q_lens, seq_lens = _ragged_case()
    # Entries past a sequence's blocks point out of range: they must never be read.
    got = paged_attention_torch(q, k_cache, v_cache, block_tables, cu, torch.tensor(seq_lens, dtype=torch.int32),
                                block_size=3, scale=0.3, max_q=max(q_lens), sliding_window=window)
    want = _reference(q, k_cache, v_cache, tables, q_lens, seq_lens, 3, 0.3, window)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    out = torch.full_like(q, float("nan"))
    assert paged_attention(q, k_cache, v_cache, block_tables, cu, torch.tensor(seq_lens, dtype=torch.int32),
                           block_size=3, scale=0.3, max_q=max(q_lens), sliding_window=window, out=out) is out
    torch.testing.assert_close(out, got)


@pytest.mark.parametrize("window", [None, 4])
def test_paged_attention_torch_reads_int8_caches(window):
    """An int8 cache (quant/kv_int8.py) attends as its dequantised values do."""
    from levante.quant import kv_int8

    q, k_cache, v_cache, tables, block_tables, cu, q_lens, seq_lens = _ragged_case()
    k8, v8 = kv_int8.quantize(k_cache), kv_int8.quantize(v_cache)
    got = paged_attention_torch(q, k8, v8, block_tables, cu, torch.tensor(seq_lens, dtype=torch.int32),
                                block_size=3, scale=0.3, max_q=max(q_lens), sliding_window=window)
    want = _reference(q, kv_int8.dequantize(k8), kv_int8.dequantize(v8), tables, q_lens, seq_lens, 3, 0.3, window)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_triton_kernel_agrees_with_the_torch_reference(window):
    """Only where the kernel can run: CUDA, or the Triton interpreter on CPU (TRITON_INTERPRET=1)."""
    import os

    triton_attention = pytest.importorskip("levante.kernels.triton_attention")
    cuda = torch.cuda.is_available()
    if not triton_attention.triton_available() or not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no Triton kernel here")
    dev = "cuda" if cuda else "cpu"
    q, k_cache, v_cache, _, block_tables, cu, q_lens, seq_lens = _ragged_case(dim=64)
    # block_tables keeps out-of-range ids past each sequence's blocks: the kernel must not read them.
    args = [t.to(dev) for t in (q, k_cache, v_cache, block_tables, cu, torch.tensor(seq_lens, dtype=torch.int32))]
    options = dict(block_size=3, scale=0.125, max_q=max(q_lens), sliding_window=window)
    got = triton_attention.paged_attention_triton(*args, **options)
    want = paged_attention_torch(*args, **options)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_padding_rows_give_zeros_not_nan():
    q = torch.randn(3, 2, 4)
    cache = torch.full((9, 1, 4), float("nan"))  # never-written slots may hold anything
    cache[0:2] = torch.randn(2, 1, 4)
    out = paged_attention_torch(q, cache, cache.clone(), torch.tensor([[0], [0], [0]], dtype=torch.int32),
                                torch.arange(4, dtype=torch.int32), torch.tensor([2, 0, 0], dtype=torch.int32),
                                block_size=3, scale=0.5, max_q=1)
    assert torch.isfinite(out).all() and out[1:].abs().sum() == 0


@pytest.mark.parametrize("window", [None, 5])
def test_layer_paged_path_matches_the_sdpa_path(window):
    """The same step through Attention.forward: runner's SDPA metadata vs its paged metadata."""
    block_size, heads, kv_heads, dim = 4, 4, 2, 8
    layer = Attention(heads, kv_heads, dim, scale=dim ** -0.5, sliding_window=window)
    runner = ModelRunner(nn.ModuleList([layer]), num_blocks=32, block_size=block_size, dtype=torch.float32,
                         device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    q_lens, kv_lens = [1, 6, 1, 9, 3], [13, 6, 2, 17, 11]  # decode, whole prompt, prefix-cache hits
    tables, free = [], list(range(32))
    for n in kv_lens:
        tables.append([free.pop(int(torch.randint(len(free), (1,), generator=g))) for _ in range(-(-n // block_size))])
    runner.kv_cache[0][0].normal_(generator=g)
    runner.kv_cache[0][1].normal_(generator=g)
    tokens = sum(q_lens)
    q = torch.randn(tokens, heads, dim, generator=g)
    k = torch.randn(tokens, kv_heads, dim, generator=g)
    v = torch.randn(tokens, kv_heads, dim, generator=g)
    positions = [p for n, end in zip(q_lens, kv_lens) for p in range(end - n, end)]
    slots = [s for t, n, end in zip(tables, q_lens, kv_lens) for s in runner._slots(t, end - n, end)]
    sdpa_md = runner._metadata(q_lens, kv_lens, tables, slots)
    _, _, paged_md = runner._prepare_paged(list(range(tokens)), positions, [], q_lens, kv_lens, tables)
    assert paged_md.slot_mapping.tolist() == slots
    assert paged_md.uses_paged(layer) and not sdpa_md.uses_paged(layer)
    with attention_metadata(sdpa_md):
        want = layer(q, k, v)
    with attention_metadata(paged_md):
        got = layer(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert paged_md.key_slots is None  # the paged path never built the SDPA fields
    torch.testing.assert_close(paged_md.sdpa().key_slots, sdpa_md.key_slots)


def test_graph_batch_sizes():
    assert graph_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and graph_batch_sizes(256)[-1] == 256
    assert graph_batch_sizes(10) == [1, 2, 4, 8, 10]
    assert graph_batch_sizes(1) == [1]


def _ragged_prompts(count, seed=3):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 384, (12,), generator=g).tolist()
    return [(shared if i % 2 else []) + torch.randint(3, 384, (int(torch.randint(2, 40, (1,), generator=g)),),
                                                      generator=g).tolist() for i in range(count)]


def _generate(llm, prompts, max_tokens):
    """All prompts at once, each with its own length (so the batch shrinks raggedly)."""
    engine, done = llm.engine, {}
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=0))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[f"r{i}"] for i in range(len(prompts))]


def _sequences(prompts):
    from levante.engine.sequence import Sequence

    return [Sequence(f"probe{i}", 0, p, SamplingParams()) for i, p in enumerate(prompts)]


def _run(folder, prompts, max_tokens, **options):
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=128, **options)
    return llm, _generate(llm, prompts, max_tokens)


def _same(got, want):
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        chosen_a = [next(iter(p.values())).logprob for p in a.logprobs]
        chosen_b = [next(iter(p.values())).logprob for p in b.logprobs]
        torch.testing.assert_close(torch.tensor(chosen_a), torch.tensor(chosen_b), atol=1e-4, rtol=1e-4)


ENGINE_PROMPTS, ENGINE_MAX_TOKENS = _ragged_prompts(5), [20, 7, 30, 12, 25]


@pytest.fixture(scope="module")
def sdpa_outputs(tiny_model):
    """arch -> the SDPA path's outputs for ENGINE_PROMPTS, computed once per arch."""
    done = {}

    def outputs(arch):
        if arch not in done:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv(PAGED_ENV, "0")
                done[arch] = _run(str(tiny_model(arch)), ENGINE_PROMPTS, ENGINE_MAX_TOKENS)[1]
        return done[arch]

    return outputs


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])  # gemma3: sliding-window layers (window 16)
@pytest.mark.parametrize("kernel", ["default", "torch"])
def test_engine_paged_path_matches_sdpa_path(tiny_model, sdpa_outputs, monkeypatch, arch, kernel):
    """The CPU's default (the native kernel where it runs, else SDPA) and the paged path's PyTorch
    version against the SDPA path; run twice, the second time with the prompts' full blocks (they
    share a prefix) coming from the prefix cache."""
    from levante.kernels import native

    want = sdpa_outputs(arch)
    if kernel == "torch":
        monkeypatch.setenv(PAGED_ENV, "1")
        monkeypatch.setattr(native, "paged_attention_fits", lambda q, k_cache: False)
    else:
        monkeypatch.delenv(PAGED_ENV, raising=False)
    llm, got = _run(str(tiny_model(arch)), ENGINE_PROMPTS, ENGINE_MAX_TOKENS)
    assert llm.engine.runner.paged == (kernel == "torch" or native.available())
    assert llm.engine.runner.decode_graphs is None
    _same(got, want)
    hits = llm.engine.block_manager.match_prefix
    assert sum(len(hits(s)) for s in _sequences(ENGINE_PROMPTS)) >= 10
    _same(_generate(llm, ENGINE_PROMPTS, ENGINE_MAX_TOKENS), want)


def test_cpu_without_the_native_kernel_keeps_the_sdpa_path(tiny_model, monkeypatch):
    from levante.kernels import native

    monkeypatch.setattr(native, "paged_attention_supported", lambda dtype, head_dim: False)
    llm = LLM(str(tiny_model("qwen3")), dtype="float32", block_size=4, max_model_len=128)
    assert not llm.engine.runner.paged


def test_padded_decode_path_matches_normal_decode(tiny_model, monkeypatch):
    """Ragged batch of 5 padded to 8 (then 4, 2, 1 as sequences finish), run eagerly on CPU."""
    folder = str(tiny_model("qwen3"))
    prompts = _ragged_prompts(5, seed=4)
    max_tokens = [20, 7, 30, 12, 25]
    _, want = _run(folder, prompts, max_tokens, max_num_seqs=8)
    llm = _padded_llm(folder, monkeypatch)
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8] and not graphs.graphs
    sizes_used = []
    original = graphs._forward
    monkeypatch.setattr(graphs, "_forward", lambda size: sizes_used.append(size) or original(size))
    got = _generate(llm, prompts, max_tokens)
    _same(got, want)
    assert 8 in sizes_used and 1 in sizes_used
    # Padding rows write the spare slot past every block.
    assert llm.engine.runner.scratch_slot == llm.engine.runner.kv_cache[0][0].size(0) - 1


def _padded_llm(folder, monkeypatch) -> LLM:
    """The tiny model with the padded static-buffer decode path (eager on CPU), batches up to 8."""
    monkeypatch.setenv(PADDED_DECODE_ENV, "1")
    return LLM(folder, dtype="float32", block_size=4, max_model_len=128, max_num_seqs=8)


def _stand_in_graphs(monkeypatch, graphs, broken=False):
    """torch.cuda's graph API replaced: capture records the batch size, replay re-runs the padded forward."""
    import contextlib

    class StandIn:
        def pool(self):
            return "pool"

        def replay(self):
            size = next(s for s, g in graphs.graphs.items() if g is self)
            graphs.logits[:size].copy_(graphs._forward(size) + (1.0 if broken else 0.0))

    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandIn)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None, capture_error_mode=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_capture_bookkeeping_with_a_stand_in_for_cuda_graphs(tiny_model, monkeypatch):
    """capture(), verify() and replay through the static logits buffer, with torch.cuda's graph API
    replaced by a stand-in that re-runs the padded forward on replay (the capture itself needs a GPU)."""
    folder = str(tiny_model("qwen3"))
    prompts = _ragged_prompts(5, seed=6)
    max_tokens = [9, 4, 14, 6, 11]
    _, want = _run(folder, prompts, max_tokens, max_num_seqs=8)
    llm = _padded_llm(folder, monkeypatch)
    graphs = llm.engine.runner.decode_graphs
    _stand_in_graphs(monkeypatch, graphs)
    graphs.capture()
    assert list(graphs.graphs) == [8, 4, 2, 1] and graphs.logits.shape == (8, 384)
    got = _generate(llm, prompts, max_tokens)
    _same(got, want)


def test_a_replay_that_differs_from_eager_turns_graphs_off(tiny_model, monkeypatch):
    folder = str(tiny_model("qwen3"))
    llm = _padded_llm(folder, monkeypatch)
    graphs = llm.engine.runner.decode_graphs
    _stand_in_graphs(monkeypatch, graphs, broken=True)
    with pytest.raises(RuntimeError, match="differs from the eager forward"):
        graphs.capture()
    assert graphs.seq_lens.abs().sum() == 0  # the static buffers are left as padding

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager_and_cpu(tiny_model):
    folder = str(tiny_model("qwen3"))
    prompts = _ragged_prompts(6, seed=5)
    max_tokens = [20, 7, 30, 12, 25, 3]
    _, cpu = _run(folder, prompts, max_tokens)
    graphs_llm, graphs = _run(folder, prompts, max_tokens, device="cuda", max_num_seqs=8)
    if triton_paged_attention_available():
        assert graphs_llm.engine.runner.decode_graphs is not None and graphs_llm.engine.runner.decode_graphs.graphs
    _, eager = _run(folder, prompts, max_tokens, device="cuda", max_num_seqs=8, enforce_eager=True)
    _same(graphs, eager)
    _same(eager, cpu)


def test_fill_tables_rows_beyond_the_batch_stay_zero():
    """The CUDA-graph staging table has rows for the padded size: the batch's tables go in its first
    rows (row loop for few, one masked assignment for many), the rest stays zero."""
    import numpy as np

    from levante.engine.kv_cache import fill_tables

    rng = np.random.default_rng(0)
    for count in (3, 20):
        tables = [list(rng.integers(0, 1000, size=rng.integers(1, 9))) for _ in range(count)]
        table = np.zeros((count + 5, 9), dtype=np.int64)
        fill_tables(table, tables)
        want = np.zeros_like(table)
        for row, blocks in zip(want, tables):
            row[:len(blocks)] = blocks
        assert (table == want).all()
