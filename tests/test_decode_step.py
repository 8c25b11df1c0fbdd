"""The one-call decode step (layers/decode_step.py, kernels/cpu/decode_step.c) against the modules.

Same kernels, same roundings: every decode step's logits must equal the modules' bit for bit,
for biased q/k/v (Qwen2), q/k norms (Qwen3), a sliding window shorter than the context
(Mistral), int8 / int4 / Q5_0 weights, float32 and bfloat16, float and int8 KV caches, one and
two threads; steps it
does not take (several sequences, LoRA, MoE) run the modules.
"""
import pytest
import torch
from gguf import GGMLQuantizationType as T

from levante import LLM, SamplingParams
from levante.layers import decode_step
from levante.layers.decode_step import DecodeStep
from kernel_variants import kernel_variant  # noqa: F401
from tiny_gguf import convert

pytestmark = pytest.mark.usefixtures("kernel_variant")  # each variant this CPU runs (kernel_variants.py)

PROMPT = [5 + (i * 37) % 300 for i in range(40)]  # longer than Mistral's 16-token window


def _logits_by_step(llm, prompts, steps=12):
    """Each step's logits, with the one-call step off and then on (no prefix cache: same work both times)."""
    model = llm.engine.runner.model
    seen, compute = [], model.compute_logits

    def record(hidden):
        seen.append(compute(hidden).clone())
        return seen[-1]

    model.compute_logits = record
    calls = [0]
    run = DecodeStep.__call__

    def counted(self, *args):
        calls[0] += 1
        return run(self, *args)

    results = []
    try:
        DecodeStep.__call__ = counted
        for enabled in (False, True):
            decode_step.enabled = enabled
            seen.clear()
            outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
            results.append(([o.outputs[0].token_ids for o in outputs], list(seen)))
    finally:
        decode_step.enabled = True
        DecodeStep.__call__ = run
        model.compute_logits = compute
    return results, calls[0]


def _assert_same(results):
    (tokens_off, logits_off), (tokens_on, logits_on) = results
    assert tokens_on == tokens_off
    assert len(logits_on) == len(logits_off)
    for off, on in zip(logits_off, logits_on):
        assert torch.equal(off, on)


@pytest.mark.parametrize("arch, quantization, dtype, threads, kv", [
    ("qwen2", "int8", "bfloat16", 1, "auto"),
    ("qwen3", "int4", "float32", 2, "auto"),
    ("mistral", "int4", "bfloat16", 1, "auto"),
    ("qwen2", "int8", "bfloat16", 2, "int8"),  # an int8 cache, keys stored less Qwen2's key bias
    ("qwen3", "int4", "float32", 1, "int8"),
])
def test_one_call_step_equals_the_modules(tiny_model, arch, quantization, dtype, threads, kv):
    llm = LLM(str(tiny_model(arch)), dtype=dtype, quantization=quantization, num_threads=threads,
              enable_prefix_caching=False, kv_cache_dtype=kv, warmup=False)
    generator = torch.Generator().manual_seed(1)
    for module in llm.engine.runner.model.modules():  # checkpoints start their biases at zero
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.5)
    assert llm.engine.runner.model.model.decode_step() is not None
    results, calls = _logits_by_step(llm, [PROMPT])
    assert calls == 11  # every decode step after the prefill's token took it
    _assert_same(results)


def test_q5_0_weights_and_several_sequences(tiny_model, tmp_path):
    """Q5_0 GGUF matrices (exact 5-bit kernel); a step of two sequences runs the modules."""
    path = convert(tiny_model("llama"), tmp_path / "llama-q5_0.gguf", T.Q5_0)
    llm = LLM(str(path), dtype="bfloat16", enable_prefix_caching=False, warmup=False, prepared_cache=False)
    blocks = llm.engine.runner.model.model.layers
    assert {type(m.packed).__name__ for m in blocks.modules() if getattr(m, "packed", None) is not None} == {"Q5Weight"}
    results, calls = _logits_by_step(llm, [PROMPT])
    assert calls == 11
    _assert_same(results)
    results, calls = _logits_by_step(llm, [PROMPT, PROMPT[:30]], steps=4)
    assert calls == 0
    _assert_same(results)


def test_blocks_it_cannot_run_keep_the_modules(tiny_model):
    """A mixture-of-experts block, or dense weights: no one-call step."""
    assert LLM(str(tiny_model("qwen3_moe")), dtype="float32", quantization="int8",
               warmup=False).engine.runner.model.model.decode_step() is None
    assert LLM(str(tiny_model("qwen2")), dtype="float32",
               warmup=False).engine.runner.model.model.decode_step() is None
