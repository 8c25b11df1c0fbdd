"""Mistral, Phi-3, Mixtral and Qwen3-MoE from GGUF files written as llama.cpp's converter writes them
(tests/tiny_gguf.py): against llama.cpp, the reference for GGUF numerics, and transformers.

Float32 files: the same numbers as both (observed max |diff| ~1e-5 on logits of magnitude
~3; 1e-4 as in test_models). Q4_0 files: the weights stay quantised (experts too, each its
own packed matrix cut from the stacked tensor). The quantised matmuls round activations to
8 bits in blocks (llama.cpp always; ours where the native kernels run, kernels/native.py), so
only the top token and the size of the difference are held against llama.cpp, over both prompts'
positions (observed: the top token agrees at >= 95% of positions, |ours - llama.cpp| / |llama.cpp|
is 1-2% with the native kernels; without them, where PyTorch has no int4 kernels either (AVX2),
the 4-bit blocks become per-row int8 codes: 90-100% and 2.5-4.6%; a misplaced expert or shard
gives ~100%).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from levante import LLM, SamplingParams
from levante.layers.moe import SparseMoE
from levante.quant.packed import Int4Weight, Int8Weight, int4_fits
from tiny_gguf import convert
from tiny_models import load_reference

ATOL = 1e-4
OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=128, prepared_cache=False)
# Variants llama.cpp runs as transformers does: it ignores Mistral's and Phi-3's sliding windows
# (a Mistral file is a plain "llama" one), and its Qwen3-MoE has experts in every layer and
# renormalises their weights.
FAMILIES = {
    "mistral": {"sliding_window": None},
    "phi3": {"sliding_window": None},
    "mixtral": {},
    "qwen3_moe": {"norm_topk_prob": True, "mlp_only_layers": []},
}


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 384, (40,), generator=g).tolist(), torch.randint(3, 384, (9,), generator=g).tolist()]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_model, tmp_path_factory):
    folder = tiny_model(request.param, **FAMILIES[request.param])
    files = tmp_path_factory.mktemp(f"gguf-{request.param}")
    return folder, convert(folder, files / "f32.gguf"), convert(folder, files / "q4_0.gguf", T.Q4_0)


def prompt_logits(llm: LLM, prompts) -> list[torch.Tensor]:
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    return [output.metrics["prompt_logits"] for output in outputs]


def llama_cpp_logits(path, prompts) -> list[torch.Tensor]:
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 K/V cache (llama.cpp's default is float16), so that only the matmuls may differ.
    model = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, type_k=0, type_v=0, verbose=False)
    logits = []
    for prompt in prompts:
        model.reset()
        model.eval(prompt)
        logits.append(torch.from_numpy(np.array(model.scores[:len(prompt)])))
    model.close()
    return logits


def test_float32_file_matches_llama_cpp_and_transformers(family):
    folder, f32, _ = family
    prompts = _prompts()
    llm = LLM(str(f32), **OPTIONS)
    reference = load_reference(folder)
    for ours, theirs, prompt in zip(prompt_logits(llm, prompts), llama_cpp_logits(f32, prompts), prompts):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, output in zip(prompts, greedy):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                          min_new_tokens=16, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected


def test_quantized_file_stays_packed(family):
    _, _, q4 = family
    prompts = _prompts()
    llm = LLM(str(q4), **OPTIONS)
    layer = llm.engine.model.model.layers[0]
    projections = [layer.self_attn.qkv_proj, layer.self_attn.o_proj]
    if isinstance(layer.mlp, SparseMoE):
        assert not layer.mlp.gate.packed  # the router stays dense (llama.cpp keeps it F32 too)
        projections += [linear for expert in layer.mlp.experts for linear in (expert.gate_up_proj, expert.down_proj)]
    else:
        projections += [layer.mlp.gate_up_proj, layer.mlp.down_proj]
    # 4-bit where this machine has int4 kernels for the shape, else int8 codes of the same values
    assert all(isinstance(linear.packed, Int4Weight if int4_fits(linear.packed.shape) else Int8Weight)
               for linear in projections)
    ours, theirs = torch.cat(prompt_logits(llm, prompts)), torch.cat(llama_cpp_logits(q4, prompts))
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    difference = (ours - theirs).norm() / theirs.norm()
    assert agree >= 0.85 and difference < 0.06, f"top token agrees at {agree:.3f}, relative difference {difference:.4f}"
