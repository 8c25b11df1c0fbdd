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


def assert_logits_match(llm, ref, prompts):
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = ref(torch.tensor([prompt])).logits[0]
        ours = output.metrics["prompt_logits"]
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def assert_greedy_matches(llm, ref, prompts, max_tokens: int = 32):
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens,
                                    min_new_tokens=max_tokens, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected


def test_ragged_batch_logits_match_transformers(pair):
    assert_logits_match(*pair, _prompts())


def test_greedy_continuation_matches_transformers(pair):
    assert_greedy_matches(*pair, _prompts())


def test_phi3_short_factors_and_partial_rotary(tiny_model):
    """Phi-4-mini's RoPE on half of each head, and a context (--max-model-len) within the
    pretraining length, where LongRoPE keeps its short factors (the shared tiny Phi-3 runs
    past its 8-token pretraining length, on the long ones)."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 64, "long_factor": [4.0, 3.0, 2.0, 1.5],
            "short_factor": [1.0, 1.25, 1.5, 1.75]}
    folder = tiny_model("phi3", original_max_position_embeddings=64, rope_parameters=rope)
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=64)
    ref = load_reference(folder)
    assert_logits_match(llm, ref, _prompts())
    assert_greedy_matches(llm, ref, _prompts(), max_tokens=16)  # 40 + 16 tokens: within 64


@pytest.mark.parametrize("context", [8, 9, 4096])
def test_longrope_frequencies_match_transformers_rope_init(context):
    """inv_freq and the cos/sin scale for a context at, just past and far past the pretraining
    length, from a config in the classic layout (`rope_scaling`; "su" is LongRoPE's first name,
    in early Phi-3 configs)."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from levante.config import FULL, ModelConfig
    from levante.layers.rotary import RotaryEmbedding

    factors = torch.Generator().manual_seed(0)
    scaling = {"type": "longrope", "long_factor": (1 + 3 * torch.rand(8, generator=factors)).tolist(),
               "short_factor": (1 + torch.rand(8, generator=factors)).tolist()}
    raw = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 10, "hidden_size": 64,
           "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 10000.0,
           "max_position_embeddings": 4096, "original_max_position_embeddings": 8, "rope_scaling": scaling}
    expected, scale = ROPE_INIT_FUNCTIONS["longrope"](Phi3Config(**raw), seq_len=context)
    for kind in ("longrope", "su"):
        ours = ModelConfig.from_hf_dict(raw | {"rope_scaling": scaling | {"type": kind}})
        rotary = RotaryEmbedding(ours.head_dim, ours.rope[FULL], ours.max_position_embeddings, context)
        assert torch.equal(rotary.inv_freq, expected)
        assert rotary.attention_scale == pytest.approx(scale, rel=1e-12)


def test_layers_share_one_rotary_table(tiny_model):
    """Layers of equal rope settings hold one cos/sin table (not one each: 24-64 copies of up to
    tens of MiB at a long context), grown for all of them past 4,096 positions."""
    llm = LLM(str(tiny_model("llama")), dtype="float32", max_model_len=8192, warmup=False)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))
    rotary = [layer.self_attn.rotary_emb for layer in llm.engine.runner.model.model.layers]
    first = rotary[0]._cache(10, torch.device("cpu"))
    assert len(rotary) > 1 and all(r._cache(10, torch.device("cpu")) is first for r in rotary)
    grown = rotary[0]._cache(5000, torch.device("cpu"))
    assert all(r._cache(5000, torch.device("cpu")) is grown for r in rotary) and grown.shape[0] == 8192
