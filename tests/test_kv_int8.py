"""The 8-bit KV cache (`kv_cache_dtype="int8"`, quant/kv_int8.py): the quantiser's rows, the option
through EngineArgs and the CLI, the cache's memory, and whole-engine runs against transformers (float32).

The engine with an int8 cache must stay close to the unquantised model (teacher-forced next-token
distributions of a long prompt and of its greedy continuation) while its paths agree with each other
on the same quantised values: the native kernel, the paged path's PyTorch version and the SDPA path.
Kernel cases: tests/test_native_attention.py; Gemma 3n KV sharing: test_gemma3n_text.py; speculative
decoding: test_speculative.py.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from levante import LLM, SamplingParams
from levante.engine.args import EngineArgs
from levante.engine.runner import PAGED_ENV
from levante.errors import InvalidRequest
from levante.layers.paged_attention import paged_attention_torch
from kernel_variants import kernel_variant  # noqa: F401
from levante.kernels import native
from levante.quant import kv_int8


def test_rows_hold_codes_then_a_scale_per_16_values():
    x = torch.randn(50, 3, 40) * torch.logspace(-3, 3, 50).view(-1, 1, 1)  # rows of very different sizes
    x[7, 1] = 0.0
    rows = kv_int8.quantize(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 40 + 2 * 3) == (50, 3, kv_int8.row_bytes(40))
    scale = rows[..., 40:].contiguous().view(torch.float16).float()  # blocks of 16, 16 and 8 values
    blocks = [x[..., :16], x[..., 16:32], x[..., 32:]]
    want = torch.stack([b.abs().amax(-1) / 127 for b in blocks], -1)
    assert torch.equal(scale, want.to(torch.float16).float())  # float16 scales
    assert rows[..., :16].abs().amax(-1).ge(126).sum() == 50 * 3 - 1  # a block's largest value: the code range's end
    back = kv_int8.dequantize(rows)
    assert back[7, 1].eq(0).all()
    step = torch.cat([scale[..., i:i + 1].expand(-1, -1, b.shape[-1]) for i, b in enumerate(blocks)], -1)
    assert ((back - x).abs() <= step * 0.51).all()  # round to nearest: half a step (the scale rounded to float16)
    assert kv_int8.cache_values(rows, torch.bfloat16).dtype == torch.bfloat16
    assert kv_int8.cache_values(x, torch.float64).dtype == torch.float64


@pytest.mark.usefixtures("kernel_variant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_store_writes_the_bytes_of_quantize(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 3, 40, generator=g) * torch.logspace(-6, 3, 37).view(-1, 1, 1)).to(dtype)
    x[3, 1] = 0
    qkv = torch.cat([torch.zeros(37, 5, 40, dtype=dtype), x], 1)[:, 5:]  # a strided view, as models split qkv
    offset = torch.randn(3, 40, generator=g) * 50
    for key_offset in (None, offset):
        cache = torch.zeros(100, 3, kv_int8.row_bytes(40), dtype=torch.int8)
        slots = torch.randperm(100, generator=g)[:37]
        kv_int8.store(cache, slots, qkv, key_offset)
        want = kv_int8.quantize(x.float() - (0 if key_offset is None else key_offset))
        assert torch.equal(cache[slots], want)
        assert cache[[i for i in range(100) if i not in set(slots.tolist())]].eq(0).all()


def test_a_key_offset_keeps_large_constant_channels_from_taking_the_int8_range():
    """Qwen2's key bias puts constants of ~145 into channels where keys are ~7: taken off before the keys
    are stored, the scores move by one amount per query (which softmax ignores) and the rest keeps its
    precision."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(256, 2, 64, generator=g) * 4, torch.randn(256, 2, 64, generator=g)
    offset = torch.zeros(2, 64)
    offset[:, [5, 37, 62]] = torch.tensor([145.0, -135.0, 120.0])
    keys = keys + offset
    q = torch.randn(4, 8, 64, generator=g)
    options = dict(block_size=16, scale=0.125, max_q=4)
    tables, cu, lens = torch.arange(16, dtype=torch.int32).view(1, -1), torch.tensor([0, 4], dtype=torch.int32), \
        torch.tensor([256], dtype=torch.int32)
    exact = paged_attention_torch(q, keys, values, tables, cu, lens, **options)
    errors = {}
    for name, key_offset in (("offset", offset), ("none", None)):
        k_cache, v_cache = (torch.zeros(256, 2, kv_int8.row_bytes(64), dtype=torch.int8) for _ in "kv")
        kv_int8.store(k_cache, torch.arange(256), keys, key_offset)
        kv_int8.store(v_cache, torch.arange(256), values)
        errors[name] = (paged_attention_torch(q, k_cache, v_cache, tables, cu, lens, **options) - exact).abs().max()
    assert errors["offset"] < 0.05 and errors["none"] > 8 * errors["offset"], errors  # measured: 0.034, 0.43


def test_option_through_engine_args_and_cli():
    assert EngineArgs(kv_cache_dtype="int8").engine_config().cache.dtype == torch.int8
    assert EngineArgs(kv_cache_dtype="q8_0").engine_config().cache.dtype == torch.int8
    assert EngineArgs(kv_cache_dtype="bfloat16").engine_config().cache.dtype == torch.bfloat16
    assert EngineArgs().engine_config().cache.kv_dtype(torch.float32) == torch.float32
    with pytest.raises(InvalidRequest, match="kv_cache_dtype 'fp4'.*int8"):
        EngineArgs(kv_cache_dtype="fp4").engine_config()
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser, "default")
    args = EngineArgs.from_cli_args(parser.parse_args(["--kv-cache-dtype", "int8"]))
    assert args.kv_cache_dtype == "int8" and args.options()["kv_cache_dtype"] == "int8"


def test_int8_is_refused_on_cuda_before_any_allocation():
    from torch import nn

    from levante.engine.runner import ModelRunner
    from levante.layers.attention import Attention

    with pytest.raises(InvalidRequest, match="CPU only"):
        ModelRunner(nn.ModuleList([Attention(4, 2, 8, 0.3)]), 4, 4, torch.int8, torch.device("cuda"))


@pytest.fixture(scope="module")
def qwen3(tiny_model):
    from tiny_models import load_reference

    folder = tiny_model("qwen3")
    return folder, load_reference(folder)


def test_blocks_fit_from_the_cache_memory(qwen3):
    """Per token and layer: float32 2 * kv_heads * head_dim * 4 bytes, int8 2 * kv_heads * (head_dim + 2 per 16)."""
    from levante.engine.runner import kv_bytes_per_token

    folder, _ = qwen3
    counts = {}
    for kv in ("float32", "int8"):
        llm = LLM(str(folder), dtype="float32", kv_cache_gb=0.01, warmup=False, kv_cache_dtype=kv)
        layers = [m for m in llm.engine.runner.attention_layers]
        row = {"float32": lambda d: 4 * d, "int8": kv_int8.row_bytes}[kv]
        want = sum(2 * m.num_kv_heads * row(m.head_dim) for m in layers)
        assert kv_bytes_per_token(llm.engine.model, llm.engine.runner.kv_cache[0][0].dtype) == want
        counts[kv] = (llm.engine.block_manager.num_blocks, want)
    (f32_blocks, f32_bytes), (i8_blocks, i8_bytes) = counts["float32"], counts["int8"]
    assert f32_blocks == int(0.01 * (1 << 30) // (f32_bytes * 16))
    assert i8_blocks == int(0.01 * (1 << 30) // (i8_bytes * 16)) > 3 * f32_blocks


def test_key_offsets_come_from_the_key_bias(tiny_model):
    """Qwen2 (a key bias): each layer's keys go into an int8 cache less it; Qwen3 (none): unshifted."""
    for arch, biased in (("qwen2", True), ("qwen3", False)):
        llm = LLM(str(tiny_model(arch)), dtype="float32", kv_cache_dtype="int8", num_kv_blocks=8, warmup=False)
        for module in llm.engine.model.modules():
            if hasattr(module, "key_bias"):
                bias = module.qkv_proj.bias
                if biased:
                    q_size = module.num_heads * module.head_dim
                    assert torch.equal(module.attn.key_offset.flatten(), bias[q_size:q_size + module.attn.key_offset.numel()])
                else:
                    assert bias is None and module.attn.key_offset is None


def _kl(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """KL(want || got) per row, in nats."""
    return torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)


def _run(folder, prompt, monkeypatch, paged: str | None):
    if paged is None:
        monkeypatch.delenv(PAGED_ENV, raising=False)
    else:
        monkeypatch.setenv(PAGED_ENV, paged)
    llm = LLM(str(folder), dtype="float32", kv_cache_dtype="int8", block_size=16, max_model_len=512,
              max_num_batched_tokens=128, warmup=False)
    k_cache = llm.engine.runner.kv_cache[0][0]
    layer = llm.engine.runner.attention_layers[0]
    assert k_cache.dtype == torch.int8 and k_cache.shape[-1] == kv_int8.row_bytes(layer.head_dim)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0, return_prompt_logits=True)
    first = llm.generate([prompt], params)[0]
    if paged is None:  # again, reading the prefix cache
        again = llm.generate([prompt], params)[0]
        assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    return first


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])  # gemma3: sliding-window layers (window 16)
def test_engine_stays_close_to_transformers_and_its_paths_agree(tiny_model, arch, monkeypatch):
    """A 300-token prompt prefilled in chunks of 128, then 16 greedy tokens, through the default CPU
    path (the kernel where it runs; run twice, the second reading the prefix cache) and the SDPA path
    (the paged path's PyTorch version: test_paged_attention.py's cases with int8 caches)."""
    from tiny_models import load_reference

    folder = tiny_model(arch)
    prompt = torch.randint(3, 384, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    runs = {paged: _run(folder, prompt, monkeypatch, paged) for paged in (None, "0")}
    default = runs[None]
    tokens = default.outputs[0].token_ids
    with torch.no_grad():
        expected = load_reference(folder)(torch.tensor([prompt + tokens])).logits[0]
    got = default.metrics["prompt_logits"]
    want = expected[:len(prompt)]
    kl = _kl(got, want)
    # Measured: KL ~2e-5 nats and logits within 0.05 (a 2x scale error or truncated codes fail these).
    assert 1e-7 < kl.mean() < 1e-4 and kl.max() < 1e-3, kl
    assert (got - want).abs().max() < 0.15
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    continuation = expected[len(prompt) - 1:-1].log_softmax(-1)
    chosen = torch.tensor([next(iter(p.values())).logprob for p in default.outputs[0].logprobs])
    assert (chosen - continuation[torch.arange(16), tokens]).abs().max() < 0.05
    assert (continuation.argmax(-1) == torch.tensor(tokens)).sum() >= 15
    # The SDPA path: the same cache bytes in layer 0; deeper, float noise of ~1e-6 between the paths may
    # move a value across a rounding boundary (one code), so the paths agree to ~1e-3, 50x below int8's error.
    assert runs["0"].outputs[0].token_ids == tokens
    torch.testing.assert_close(runs["0"].metrics["prompt_logits"], got, atol=3e-3, rtol=0)
