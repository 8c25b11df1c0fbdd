"""levante.quant.packed: int8/int4 packed weights against dense references, in-situ
quantisation of tiny models, and GGUF 4-bit formats mapped onto int4 without loss.

Tolerances (float32 unless said):
* a packed weight's matmul equals ``x @ w_hat.T`` with its own dequantised ``w_hat`` to
  1e-5 relative through PyTorch's kernel (few rows) and the dense path (many rows); the
  native W8A8 kernel (few rows, where it runs) also rounds x to int8 in blocks of 32, which
  costs up to ~0.5% relative on Gaussian data: 1% there (see tests/test_native_kernels.py);
* round-to-nearest error on Gaussian weights: int8 per row < 1% (measured 0.7%), int4 in
  groups of 32 < 8.5% (measured 7.0%), relative Frobenius norm;
* Q4_0, Q4_1 and Q4_K tensors of real GGUF files unpack to exactly the values
  ``dequantize`` gives; Q5_0/Q6_K/Q8_0 requantised per row to int8 stay within 2% of them
  (measured 0.8-1.9%).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from levante import LLM, SamplingParams
from levante.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from levante.layers.linear import LinearBase
from levante.loader.gguf import GGUFFile
from levante.loader.sources import DEFAULT_MODEL, is_installed, resolve_alias
from levante.quant.gguf_blocks import GGUFTensor, dequantize
from levante.kernels import native
from levante.quant.packed import (GGUFRows, Int4Weight, Int8Weight, Q5Weight, int4_supported, pack, pack_int4,
                                  quantize_int4, quantize_int8, unpack_int4)

needs_int4 = pytest.mark.skipif(not int4_supported(), reason="no CPU int4 kernels in this PyTorch")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# -- kernels against dense references ---------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 17, 64])  # kernel path and dense (prefill) path
@pytest.mark.parametrize("shape", [(144, 64), (1152, 896)])
def test_int8_matmul_matches_its_dequantized_weight(shape, rows):
    w = gaussian(*shape)
    packed = quantize_int8(w)
    x = torch.randn(2, rows, shape[1])
    got = packed.matmul(x)
    assert got.shape == (2, rows, shape[0])
    native_kernel = packed.layout == "t16" and 2 * rows < packed.dense_from_rows
    assert relative_error(got, x @ packed.dequantize(torch.float32).t()) < (0.01 if native_kernel else 1e-5)
    assert relative_error(got, x @ w.t()) < (0.015 if native_kernel else 0.01)


@needs_int4
@pytest.mark.parametrize("rows", [1, 3, 50, 64])
@pytest.mark.parametrize("shape", [(144, 64), (1152, 896)])
def test_int4_matmul_matches_its_dequantized_weight(shape, rows):
    w = gaussian(*shape)
    packed = quantize_int4(w, group_size=32)
    x = torch.randn(2, rows, shape[1])
    got = packed.matmul(x)
    assert got.shape == (2, rows, shape[0])
    native_kernel = packed.layout == "q4t16" and 2 * rows < packed.dense_from_rows
    assert relative_error(got, x @ packed.dequantize(torch.float32).t()) < (0.01 if native_kernel else 1e-5)
    assert relative_error(got, x @ w.t()) < 0.085


@needs_int4
def test_int4_range_search_beats_plain_min_max():
    w = gaussian(256, 512)
    groups = w.view(256, -1, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    plain = (((groups - low) / scale).round().clamp(0, 15) * scale + low).view_as(w)
    assert relative_error(quantize_int4(w).dequantize(torch.float32), w) < 0.93 * relative_error(plain, w)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_bfloat16_activations(kind):
    if kind == "int4" and not int4_supported():
        pytest.skip("no CPU int4 kernels")
    w = gaussian(512, 256)
    packed = quantize_int8(w, torch.bfloat16) if kind == "int8" else quantize_int4(w, 32, torch.bfloat16)
    reference = packed.dequantize(torch.float32)
    for rows in (1, 64):
        x = torch.randn(rows, 256)
        got = packed.matmul(x.bfloat16())
        assert got.dtype == torch.bfloat16
        assert relative_error(got, x @ reference.t()) < 0.01


@needs_int4
def test_int4_packing_round_trips_and_matches_one_shot_packing():
    """Packed a chunk of rows at a time (4096 + a tail) = packed at once; unpacking inverts it."""
    codes = torch.randint(0, 16, (4096 + 64 + 16, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(codes)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
    assert torch.equal(unpack_int4(packed, 64), codes)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_rows_are_rows_of_the_dequantized_weight(kind):
    if kind == "int4" and not int4_supported():
        pytest.skip("no CPU int4 kernels")
    w = gaussian(144, 64)  # two 64-row blocks and a 16-row tail in the int4 layout
    packed = quantize_int8(w) if kind == "int8" else quantize_int4(w)
    index = torch.tensor([[0, 143], [65, 130], [63, 128]])
    assert torch.equal(packed.rows(index, torch.float32), packed.dequantize(torch.float32)[index])


# -- GGUF formats -------------------------------------------------------------------------------

def synthetic_gguf(qtype: T, rows: int = 64, cols: int = 256) -> GGUFTensor:
    values = gaussian(rows, cols, seed=2).numpy()
    raw = gguf.quants.quantize(values, qtype)
    return GGUFTensor(qtype, torch.from_numpy(np.ascontiguousarray(raw)), (rows, cols))


@needs_int4
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_q4_0_and_q4_1_map_exactly(qtype):
    tensor = synthetic_gguf(qtype)
    packed = pack([tensor], "auto", torch.float32)
    assert isinstance(packed, Int4Weight)
    assert torch.equal(packed.dequantize(torch.float32), tensor.dequantize())


def real_tensors(alias: str, wanted: set[T]) -> dict[T, GGUFTensor]:
    """The first 2-D tensor of each wanted type in a packaged GGUF model."""
    if not is_installed(alias):
        pytest.skip(f"{alias} not installed")
    found = {}
    for _name, qtype, raw, shape in GGUFFile(resolve_alias(alias)).raw_tensors():
        if qtype in wanted and qtype not in found and len(shape) == 2:
            found[qtype] = GGUFTensor(qtype, raw, shape)
    return found


@needs_int4
@pytest.mark.parametrize("alias, qtype", [(DEFAULT_MODEL, T.Q4_K), ("gemma3:270m", T.Q4_K),
                                          ("smollm2:135m", T.Q4_1)])
def test_real_4bit_tensors_map_exactly(alias, qtype):
    tensor = real_tensors(alias, {qtype})[qtype]
    weight = tensor.dequantize()
    packed = pack([tensor], "auto", torch.float32)
    assert isinstance(packed, Int4Weight) and packed.shape == tensor.shape
    assert torch.equal(packed.dequantize(torch.float32), weight)
    x = torch.randn(3, tensor.shape[1])
    tolerance = 0.01 if packed.layout == "q4t16" else 1e-5  # the native kernel rounds x to int8
    assert relative_error(packed.matmul(x), x @ weight.t()) < tolerance
    aten = packed.in_layout("aten")  # PyTorch's kernel, exact to float32
    assert torch.equal(aten.dequantize(torch.float32), weight)
    assert relative_error(aten.matmul(x), x @ weight.t()) < 1e-5


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q6_K, T.Q8_0])
def test_real_tensors_requantized_to_int8(qtype):
    tensor = real_tensors(DEFAULT_MODEL, {qtype})[qtype]
    if tensor.shape[0] > 8192:  # the vocabulary-sized ones: a slice is enough
        tensor = tensor.row_slice(0, 8192)
    weight = tensor.dequantize()
    packed = pack([tensor], "auto", torch.float32)
    if qtype == T.Q5_0 and native.available():  # kept exactly, 5 bits (tests/test_native_kernels.py)
        assert isinstance(packed, Q5Weight) and torch.equal(packed.dequantize(torch.float32), weight)
        packed = packed.to_int8(torch.float32)  # what pack() gives without the native kernels
    assert isinstance(packed, Int8Weight)
    assert relative_error(packed.dequantize(torch.float32), weight) < 0.02
    x = torch.randn(3, tensor.shape[1])
    assert relative_error(packed.matmul(x), x @ weight.t()) < 0.02


def test_fused_shards_of_mixed_types_settle_on_the_more_precise_form():
    q4, q8 = synthetic_gguf(T.Q4_0, rows=64), synthetic_gguf(T.Q8_0, rows=32)
    packed = pack([q4, q8], "auto", torch.float32)
    assert isinstance(packed, Int8Weight) and packed.shape == (96, 256)
    weight = torch.cat([q4.dequantize(), q8.dequantize()])
    assert relative_error(packed.dequantize(torch.float32), weight) < 0.01
    dense = pack([q4, torch.zeros(16, 256)], "auto", torch.float32)
    assert isinstance(dense, torch.Tensor) and torch.equal(dense[:64], q4.dequantize())


def test_embedding_rows_from_gguf_blocks_are_exact():
    tensor = synthetic_gguf(T.Q8_0, rows=100, cols=64)
    table = GGUFRows(tensor)
    index = torch.tensor([[3, 99], [0, 3]])
    assert torch.equal(table.rows(index, torch.float32), dequantize(tensor.raw, T.Q8_0, (100, 64))[index])


# -- whole models -------------------------------------------------------------------------------

def prompt_logits_and_greedy(llm: LLM, ids: list[int]):
    params = SamplingParams(max_tokens=8, temperature=0, return_prompt_logits=True, ignore_eos=True)
    out = llm.generate([ids], params)[0]
    return out.metrics["prompt_logits"], out.outputs[0].token_ids


TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n Bonjour, ça va?"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # tied and untied head
def test_tiny_model_isq_int8_stays_close(tiny_model, arch):
    """Relative RMS error of the prompt logits < 5% (measured 2-2.6% on the tiny random
    models, whose three layers all quantise), top-1 agreement >= 90%, greedy text equal
    for its first four tokens."""
    folder = str(tiny_model(arch))
    dense = LLM(folder, dtype="float32", quantization="none", warmup=False)
    isq = LLM(folder, dtype="float32", quantization="int8", warmup=False)
    ids = dense.tokenizer.encode(TEXT)
    want_logits, want_tokens = prompt_logits_and_greedy(dense, ids)
    logits, tokens = prompt_logits_and_greedy(isq, ids)
    assert relative_error(logits, want_logits) < 0.05
    assert (logits.argmax(-1) == want_logits.argmax(-1)).float().mean() >= 0.9
    assert tokens[:4] == want_tokens[:4]
    model = isq.engine.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(isinstance(m.packed, Int8Weight) and m.weight.numel() == 0 for m in linears)
    assert isinstance(model.lm_head.packed, Int8Weight)
    if arch == "qwen2":  # tied: the embedding looks rows up in the head's packed weight
        assert model.model.embed_tokens.packed is model.lm_head.packed


@needs_int4
def test_tiny_model_isq_int4_runs_and_correlates(tiny_model):
    """4-bit on a 64-wide random model is coarse (measured 25-32% relative RMS error);
    this checks the whole int4 path runs and tracks the dense model."""
    folder = str(tiny_model("qwen3"))
    dense = LLM(folder, dtype="float32", quantization="none", warmup=False)
    isq = LLM(folder, dtype="float32", quantization="int4", warmup=False)
    ids = dense.tokenizer.encode(TEXT)
    want_logits, _ = prompt_logits_and_greedy(dense, ids)
    logits, tokens = prompt_logits_and_greedy(isq, ids)
    assert relative_error(logits, want_logits) < 0.45
    assert len(tokens) == 8
    packed = [m.packed for m in isq.engine.model.modules() if isinstance(m, (LinearBase, ParallelLMHead))]
    assert packed and all(isinstance(p, Int4Weight) for p in packed)
    embedding = isq.engine.model.model.embed_tokens
    assert type(embedding) is VocabParallelEmbedding and isinstance(embedding.packed, Int8Weight)


def test_auto_keeps_safetensors_dense_and_rejects_unknown_modes(tiny_model):
    folder = str(tiny_model("llama"))
    llm = LLM(folder, dtype="float32", warmup=False)
    assert llm.engine.quantization is None
    assert all(m.packed is None for m in llm.engine.model.modules() if isinstance(m, LinearBase))
    from levante.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="unknown quantization"):
        LLM(folder, dtype="float32", quantization="int3", warmup=False)


def test_cli_takes_quantization_and_isq():
    from levante.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench"]).quantization == "auto"
    assert parser.parse_args(["bench", "--isq", "int4"]).quantization == "int4"
    assert parser.parse_args(["run", "--quantization", "none", "hi"]).quantization == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--isq", "int3"])


# -- the default model --------------------------------------------------------------------------

CLEAR_LEAD = 0.25  # logits; bfloat16 steps near logit 20 are 0.125


@pytest.mark.slow
def test_default_model_auto_agrees_with_dequantized():
    """Teacher-forced top-1 over 300 tokens, packed ("auto") vs dequantised ("none"), both in
    the default dtype: through the prefill (dense) path, and in chunks of 8 tokens through
    the int8/int4 kernels that decoding uses.

    Top-1 flips happen at near-ties, so the margin is thin: measured 98.3% (prefill) and
    98.7% (chunks of 8) in bfloat16, 98.0% in float32; bfloat16 alone, "none" in chunks of
    8 vs whole, already flips 1.3%. The mean KL divergence (measured 0.0012-0.0017 nats)
    is the steadier measure of how little the requantisation changes. With the native
    kernels (Q5_0 kept exact, activations rounded to int8 in blocks of 32 in the body, to
    ~15 bits in the head): 98.7% / KL 0.0014 (prefill), 98.0% / KL 0.0015 (chunks of 8).

    How many near-ties flip depends on the CPU (its bfloat16 matmuls): 97.0% on an AVX-512
    BF16 EPYC, where all 9 flips sat at a dense top-1 lead of at most 0.125 (six were exact
    ties in bfloat16). So the strict check is on the positions with a clear lead: there,
    every top-1 must agree; overall agreement and KL bound the rest.
    """
    from test_default_model import TEXT as LONG_TEXT

    dense = LLM(DEFAULT_MODEL, quantization="none", warmup=False)
    ids = dense.tokenizer.encode(LONG_TEXT)[:301]
    params = SamplingParams(max_tokens=1, temperature=0, return_prompt_logits=True)
    want = dense.generate([ids], params)[0].metrics["prompt_logits"][:300].float()
    del dense
    packed = LLM(DEFAULT_MODEL, quantization="auto", warmup=False, enable_prefix_caching=False)
    assert packed.engine.quantization == "auto"
    model = packed.engine.model
    assert isinstance(model.model.embed_tokens.packed, GGUFRows)
    assert isinstance(model.lm_head.packed, Int8Weight)
    for chunk in (1024, 8):
        packed.engine.scheduler.max_num_batched_tokens = chunk
        got = packed.generate([ids], params)[0].metrics["prompt_logits"][:300].float()
        agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        want_logprobs, got_logprobs = want.log_softmax(-1), got.log_softmax(-1)
        kl = (want_logprobs.exp() * (want_logprobs - got_logprobs)).sum(-1).mean().item()
        top2 = want.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > CLEAR_LEAD
        clear_flips = (got.argmax(-1) != want.argmax(-1))[clear].sum().item()
        print(f"chunk {chunk}: top-1 agreement over 300 tokens {agreement:.4f}, mean KL {kl:.5f}, "
              f"flips at a clear lead {clear_flips} of {clear.sum().item()}")
        assert clear_flips == 0
        assert agreement >= 0.95
        assert kl < 0.005
