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
from levante.quant import kv_int8


def test_rows_hold_codes_then_their_scale():
    x = torch.randn(50, 3, 24) * torch.logspace(-3, 3, 50).view(-1, 1, 1)  # rows of very different sizes
    x[7, 1] = 0.0
    rows = kv_int8.quantize(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 24 + kv_int8.SCALE_BYTES)
    scale = rows[..., 24:].contiguous().view(torch.float32)
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127)
    assert rows[..., :24].abs().amax(-1).eq(127).sum() == 50 * 3 - 1  # each row's largest value: code ±127
    back = kv_int8.dequantize(rows)
    assert back[7, 1].eq(0).all()
    assert ((back - x).abs() <= scale / 2 * (1 + 1e-5)).all()  # round to nearest: half a step at most
    assert kv_int8.cache_values(rows, torch.bfloat16).dtype == torch.bfloat16
    assert kv_int8.cache_values(x, torch.float64).dtype == torch.float64


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
    """Per token: float32 2 * kv_heads * head_dim * 4 bytes a layer, int8 2 * kv_heads * (head_dim + 4)."""
    from levante.engine.runner import kv_bytes_per_token

    folder, _ = qwen3
    counts = {}
    for kv in ("float32", "int8"):
        llm = LLM(str(folder), dtype="float32", kv_cache_gb=0.01, warmup=False, kv_cache_dtype=kv)
        layers = [m for m in llm.engine.runner.attention_layers]
        want = sum(2 * m.num_kv_heads * (m.head_dim * 4 if kv == "float32" else m.head_dim + 4) for m in layers)
        assert kv_bytes_per_token(llm.engine.model, llm.engine.runner.kv_cache[0][0].dtype) == want
        counts[kv] = (llm.engine.block_manager.num_blocks, want)
    (f32_blocks, f32_bytes), (i8_blocks, i8_bytes) = counts["float32"], counts["int8"]
    assert f32_blocks == int(0.01 * (1 << 30) // (f32_bytes * 16))
    assert i8_blocks == int(0.01 * (1 << 30) // (i8_bytes * 16)) > 3 * f32_blocks


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
    assert k_cache.dtype == torch.int8 and k_cache.shape[-1] == llm.engine.runner.attention_layers[0].head_dim + 4
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
    # The same quantised values through the SDPA path.
    assert runs["0"].outputs[0].token_ids == tokens
    torch.testing.assert_close(runs["0"].metrics["prompt_logits"], got, atol=1e-4, rtol=0)
