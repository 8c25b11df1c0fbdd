"""Tensor parallelism over gloo on this CPU: 2 ranks (rank 0 here, one spawned worker)
against 1 rank, same float32 weights.

Splitting a matmul's input dimension (o_proj, down_proj) sums partial products in another
order, so logits differ by float rounding only (observed ~2e-6); 1e-4 as in test_models.
"""
import pytest
import torch

from levante import LLM, SamplingParams
from levante.errors import ModelLoadError

ATOL = 1e-4
OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=128)


def _prompts():
    g = torch.Generator().manual_seed(1)
    # 40 tokens: longer than the tiny Gemma 3's sliding window (16); two lengths: a ragged batch.
    return [torch.randint(3, 384, (40,), generator=g).tolist(), torch.randint(3, 384, (9,), generator=g).tolist()]


def _run(llm):
    prompts = _prompts()
    logits = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    return [o.metrics["prompt_logits"] for o in logits], [o.outputs[0].token_ids for o in greedy]


def _compare(folder, **options):
    ref_logits, ref_tokens = _run(LLM(str(folder), **OPTIONS, **options))
    with LLM(str(folder), **OPTIONS, **options, tensor_parallel_size=2) as llm:
        assert llm.engine.model.model.layers[0].self_attn.num_heads == 2  # half of the 4 heads
        logits, tokens = _run(llm)
        procs = llm.engine.tensor_parallel.procs
    assert all(p.poll() is not None for p in procs), "workers outlive close()"
    for ours, ref in zip(logits, ref_logits):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert tokens == ref_tokens


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_tp2_matches_tp1(tiny_model, arch):
    _compare(tiny_model(arch))


def test_tp2_replicates_a_single_kv_head(tmp_path):
    """One kv head, two ranks: each rank keeps a copy of it (vLLM's rule)."""
    import transformers as tf

    from tiny_models import _tokenizer

    config = tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                            initializer_range=0.1, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                            architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    _tokenizer(tmp_path)
    _compare(tmp_path)


def test_indivisible_split_is_a_clear_error(tiny_model):
    with pytest.raises(ModelLoadError, match="does not divide the model's 4 attention heads"):
        LLM(str(tiny_model("qwen2")), **OPTIONS, tensor_parallel_size=3)
    with pytest.raises(ModelLoadError, match="at least 1"):
        LLM(str(tiny_model("qwen2")), **OPTIONS, tensor_parallel_size=0)


@pytest.mark.slow
def test_tp2_quantized_int4_matches_tp1(tiny_model):
    """In-situ int4 under TP: each rank packs its rows of every weight and of the (tied,
    vocabulary-split) embedding and head. int4 groups run along the input dimension in 32s,
    which the row-parallel split keeps whole, so both sides quantize identically."""
    _compare(tiny_model("qwen2"), quantization="int4")
