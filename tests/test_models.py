"""Each architecture against transformers: logits over a ragged batch and greedy continuations.

Tolerance: float32 on both sides, same weights; the only differences are the order
of floating-point operations (fused q/k/v and gate/up matmuls, SDPA vs eager
softmax, RoPE tables). Observed max |diff| is ~2e-6 on logits of magnitude ~1-10;
1e-4 leaves margin for other BLAS builds while still catching any real bug (a
wrong mask, scale, norm offset or RoPE shows up at 1e-2 or more).
"""
import pytest
import torch

from levante import LLM, SamplingParams
from tiny_models import load_reference

ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "mixtral", "qwen3_moe"]
ATOL = 1e-4


def _prompts():
    g = torch.Generator().manual_seed(1)
    # 40 tokens is longer than the sliding windows of the tiny Gemma 3 and Mistral (16) and Phi-3 (24).
    return [torch.randint(3, 384, (40,), generator=g).tolist(), torch.randint(3, 384, (9,), generator=g).tolist()]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tiny_model):
    folder = tiny_model(request.param)
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=128)
    return llm, load_reference(folder)


def test_ragged_batch_logits_match_transformers(pair):
    llm, ref = pair
    prompts = _prompts()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = ref(torch.tensor([prompt])).logits[0]
        ours = output.metrics["prompt_logits"]
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_greedy_continuation_matches_transformers(pair):
    llm, ref = pair
    prompts = _prompts()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                                    min_new_tokens=32, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected
