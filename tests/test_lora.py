"""LoRA adapters (PEFT folders) against PEFT's merged model, several adapters in one batch.

Reference: PEFT merges each adapter into a float32 copy of the tiny base (W + scaling * B @ A);
levante keeps the base weights and adds each row's low-rank update. Same tolerance as the
architecture tests (tests/test_models.py): the adapters move logits by ~5, a wrong scaling,
shard or row grouping by far more than 1e-4.
"""
import pytest
import torch

from levante import LLM, SamplingParams
from levante.errors import InvalidRequest, ModelLoadError
from tiny_lora import ATTENTION, MLP, build_adapter, merged_reference
from tiny_models import load_reference

ATOL = 1e-4
ADAPTERS = {
    # plain LoRA on attention: scaling alpha / r
    "attn": dict(seed=1, r=4, lora_alpha=8, target_modules=ATTENTION),
    # rsLoRA (alpha / sqrt(r)) on the MLP and part of q/k/v, with per-module rank and alpha
    "mlp": dict(seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules=MLP + ["q_proj", "v_proj"],
                rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 4}),
}


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 384, (37,), generator=g).tolist(), torch.randint(3, 384, (9,), generator=g).tolist()]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """arch -> (base folder, {adapter name: folder})"""
    built = {}

    def get(arch):
        if arch not in built:
            base = tiny_model(arch)
            root = tmp_path_factory.mktemp(f"lora-{arch}")
            built[arch] = base, {name: build_adapter(base, root / name, **options)
                                 for name, options in ADAPTERS.items()}
        return built[arch]

    return get


@pytest.fixture(scope="module", params=["llama", "gemma3"])  # qwen2 (biased q/k/v): the tensor-parallel test
def served(request, adapters):
    base, folders = adapters(request.param)
    llm = LLM(str(base), dtype="float32", num_kv_blocks=64, block_size=4,
              lora={name: str(f) for name, f in folders.items()})
    return llm, base, folders


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_logits_match_peft_merged(served, name):
    llm, base, folders = served
    reference = merged_reference(base, folders[name])
    prompts = _prompts()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True, lora=name))
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
            base_logits = load_reference(base)(torch.tensor([prompt])).logits[0]
        assert (expected - base_logits).abs().max() > 0.5  # the adapter does change the model
        torch.testing.assert_close(output.metrics["prompt_logits"], expected, atol=ATOL, rtol=0)


def test_greedy_continuation_matches_peft_merged(served):
    llm, base, folders = served
    prompt = _prompts()[0]
    for name, folder in folders.items():
        with torch.no_grad():
            expected = merged_reference(base, folder).generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                pad_token_id=0)[0, len(prompt):].tolist()
        output = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, lora=name))[0]
        assert output.outputs[0].token_ids == expected, name


def test_batch_mixing_base_and_two_adapters_equals_each_alone(adapters):
    base, folders = adapters("llama")
    llm = LLM(str(base), dtype="float32", num_kv_blocks=64, block_size=4, enable_prefix_caching=False,
              lora={name: str(f) for name, f in folders.items()})
    first, second = _prompts()
    requests = [(first, None), (first, "attn"), (second, "mlp"), (second, None), (first, "mlp"), (second, "attn")]

    def params(name):
        return SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, lora=name)

    alone = [llm.generate(prompt, params(name))[0].outputs[0].token_ids for prompt, name in requests]
    together = llm.generate([p for p, _ in requests], [params(name) for _, name in requests])
    assert [o.outputs[0].token_ids for o in together] == alone
    assert len({tuple(t) for t in alone[:2]}) == 2  # same prompt, base and adapter: different answers


def test_prefix_cache_never_crosses_adapters(adapters):
    base, folders = adapters("llama")
    llm = LLM(str(base), dtype="float32", num_kv_blocks=64, block_size=4, lora={"attn": str(folders["attn"])})
    prompt = _prompts()[0]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    adapted = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, lora="attn")
    first_base = llm.generate(prompt, greedy)[0]
    first_adapted = llm.generate(prompt, adapted)[0]
    assert first_adapted.num_cached_tokens == 0  # the base's blocks hold other keys
    again = llm.generate(prompt, adapted)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first_adapted.outputs[0].token_ids
    assert llm.generate(prompt, greedy)[0].outputs[0].token_ids == first_base.outputs[0].token_ids


def test_quantized_base_stays_packed_under_adapters(adapters):
    base, folders = adapters("llama")
    llm = LLM(str(base), dtype="float32", num_kv_blocks=64, quantization="int8", lora={"mlp": str(folders["mlp"])})
    layer = llm.engine.model.model.layers[0].mlp.gate_up_proj
    packed = layer.packed
    assert packed is not None and layer.lora
    prompt = _prompts()[0]
    logits = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True,
                                                 lora="mlp"))[0].metrics["prompt_logits"]
    assert layer.packed is packed  # the base's int8 weights are as they were packed
    with torch.no_grad():
        merged = merged_reference(base, folders["mlp"])(torch.tensor([prompt])).logits[0]
        plain = load_reference(base)(torch.tensor([prompt])).logits[0]
    # int8 rounding moves logits a little; without the adapter they would sit as far as `plain`
    assert (logits - merged).abs().mean() < 0.1 * (merged - plain).abs().mean()


def test_load_and_unload_at_run_time(adapters):
    base, folders = adapters("llama")
    llm = LLM(str(base), dtype="float32", num_kv_blocks=64)
    prompt = _prompts()[1]
    adapted = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, lora="attn")
    with pytest.raises(InvalidRequest, match="unknown LoRA adapter 'attn'"):
        llm.generate(prompt, adapted)
    assert not llm.engine.requests  # a refused batch leaves nothing behind
    llm.load_lora("attn", str(folders["attn"]))
    with pytest.raises(InvalidRequest, match="already loaded"):
        llm.load_lora("attn", str(folders["mlp"]))
    tokens = llm.generate(prompt, adapted)[0].outputs[0].token_ids
    llm.engine.add_request("running", prompt, adapted)
    with pytest.raises(InvalidRequest, match="in use by 1"):
        llm.unload_lora("attn")
    llm.engine.abort_request("running")
    llm.unload_lora("attn")
    assert all(not m.lora for m in llm.engine.model.modules() if hasattr(m, "lora"))
    llm.load_lora("attn", str(folders["attn"]))  # loaded again: a new id, the same answers
    assert llm.generate(prompt, adapted)[0].outputs[0].token_ids == tokens


def test_bad_adapters_are_refused_by_name(adapters, tmp_path):
    base, folders = adapters("llama")
    llm = LLM(str(base), dtype="float32", num_kv_blocks=64, max_lora_rank=4, max_loras=1)
    with pytest.raises(ModelLoadError, match="rank 8 .* above the limit of 4"):
        llm.load_lora("mlp", str(folders["mlp"]))
    with pytest.raises(ModelLoadError, match="not a PEFT adapter folder"):
        llm.load_lora("x", str(base))
    dora = build_adapter(base, tmp_path / "dora", seed=3, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ModelLoadError, match="DoRA"):
        llm.load_lora("dora", str(dora))
    head = build_adapter(base, tmp_path / "head", seed=4, r=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ModelLoadError, match="lm_head.*not supported"):
        llm.load_lora("head", str(head))
    assert all(not m.lora for m in llm.engine.model.modules() if hasattr(m, "lora"))  # nothing half-attached
    llm.load_lora("attn", str(folders["attn"]))
    with pytest.raises(InvalidRequest, match="--max-loras"):
        llm.load_lora("attn2", str(folders["attn"]))


def test_tensor_parallel_ranks_keep_their_shard_of_each_adapter(adapters):
    """Two ranks (gloo): B split by rows on q/k/v and gate/up, A by columns on o_proj and down_proj;
    the worker follows run-time loads and every step's adapter rows."""
    base, folders = adapters("qwen2")
    options = dict(dtype="float32", block_size=4, num_kv_blocks=64)
    prompts = _prompts()
    requests = [(prompts[0], "attn"), (prompts[1], None), (prompts[1], "mlp"), (prompts[0], "mlp")]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, return_prompt_logits=True, lora=name)
              for _, name in requests]
    single = LLM(str(base), **options, lora={name: str(f) for name, f in folders.items()})
    expected = single.generate([p for p, _ in requests], params)
    with LLM(str(base), **options, lora={"attn": str(folders["attn"])}, tensor_parallel_size=2) as llm:
        llm.load_lora("mlp", str(folders["mlp"]))
        outputs = llm.generate([p for p, _ in requests], params)
        llm.unload_lora("mlp")
        assert llm.generate(prompts[1], params[1])[0].outputs[0].token_ids == expected[1].outputs[0].token_ids
    for ours, ref in zip(outputs, expected):
        torch.testing.assert_close(ours.metrics["prompt_logits"], ref.metrics["prompt_logits"], atol=ATOL, rtol=0)
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
