"""Gemma 3n text decoder against transformers' Gemma3nForCausalLM (float32): AltUp, LAuReL, per-layer
embeddings, activation sparsity, per-layer MLP widths, sliding and full layers, and KV sharing in the paged
engine (blocks counted for producing layers only, prefix caching, chunked prefill, preemption, a device map
that puts the sharing layers on another device than their producers)."""
from __future__ import annotations

import pytest
import torch

import tiny_gemma3n as tiny

PROMPTS = [
    [tiny.BOS] + list(range(20, 27)),
    [tiny.BOS] + [(7 * i) % 280 + 10 for i in range(29)],  # past the sliding window (5) many times
    [tiny.BOS, 40, 41],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_text(tmp_path_factory.mktemp("gemma3n_text"))


@pytest.fixture(scope="module")
def reference(folder):
    return tiny.load_reference(folder, text_only=True)


def _memo(reference) -> dict:
    """The reference's answers, per prompt: several engines are checked against the same ones."""
    if not hasattr(reference, "answers"):
        reference.answers = {}
    return reference.answers


def _expected_logits(reference, ids):
    answers, key = _memo(reference), ("logits", tuple(ids))
    if key not in answers:
        with torch.no_grad():
            answers[key] = reference(torch.tensor([ids])).logits[0]
    return answers[key]


def _expected_continuation(reference, ids, n):
    answers, key = _memo(reference), (n, tuple(ids))
    if key not in answers:
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                     pad_token_id=tiny.PAD)
        answers[key] = out[0, len(ids):].tolist()
    return answers[key]


@pytest.fixture(scope="module")
def llm(folder):
    """Chunked prefill (6 tokens a step): the long prompt is cut across steps, beside the others' decode."""
    from levante import LLM

    return LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=128, max_num_batched_tokens=6)


def test_ragged_batch_logits_match_transformers(llm, reference):
    from levante import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    worst = 0.0
    for ids, output in zip(PROMPTS, outputs):
        expected = _expected_logits(reference, ids)
        got = output.metrics["prompt_logits"]
        assert len(got) == len(expected) - output.num_cached_tokens
        worst = max(worst, (got - expected[len(expected) - len(got):]).abs().max().item())
    assert worst <= 1e-4, worst


def test_greedy_continuations_match_transformers(llm, reference):
    from levante import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for ids, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == _expected_continuation(reference, ids, 16)


def test_sharing_layers_hold_no_cache(llm):
    from levante.engine.runner import cache_owning_layers, kv_bytes_per_token

    model, runner = llm.engine.model, llm.engine.runner
    layers = model.model.layers
    assert len(runner.kv_cache) == len(layers) - tiny.NUM_KV_SHARED
    # layer 4 (sliding) reads layer 3, the last sliding layer before the shared ones; layer 5 (full) reads 2
    for consumer, producer in ((4, 3), (5, 2)):
        attn = layers[consumer].self_attn.attn
        assert attn.kv_producer is layers[producer].self_attn.attn
        assert attn.k_cache is layers[producer].self_attn.attn.k_cache
    assert len(cache_owning_layers(model)) == 4
    per_layer = 2 * 2 * 16 * 4  # k and v, 2 kv heads, head_dim 16, float32
    assert kv_bytes_per_token(model, torch.float32) == 4 * per_layer


def test_int8_kv_cache_is_shared_and_stays_close(folder, reference):
    """An 8-bit cache (quant/kv_int8.py): the sharing layers read their producers' int8 rows (chunked prefill,
    sliding and full layers); the prompts' next-token distributions stay within a small KL of transformers'."""
    from levante import LLM, SamplingParams

    llm = LLM(str(folder), dtype="float32", kv_cache_dtype="int8", block_size=4, num_kv_blocks=128,
              max_num_batched_tokens=6, warmup=False)
    layers = llm.engine.model.model.layers
    assert layers[4].self_attn.attn.k_cache is layers[3].self_attn.attn.k_cache
    assert layers[4].self_attn.attn.k_cache.dtype == torch.int8
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))
    for ids, output in zip(PROMPTS, outputs):
        expected = _expected_logits(reference, ids)
        got = output.metrics["prompt_logits"]
        expected = expected[len(expected) - len(got):]
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        assert kl.max() < 1e-3 and (got - expected).abs().max() < 0.15, (kl.max(), (got - expected).abs().max())
        assert (got - expected).abs().max() > 1e-6  # the cache is quantised


def test_shared_layers_checkpoint_tensors_are_skipped(folder):
    """transformers' checkpoints carry no k/v weights for the sharing layers; Google's do: both load."""
    from safetensors.torch import load_file

    from levante.config import ModelConfig
    from levante.loader import hf
    from levante.models.registry import build_model, load_weights

    config = ModelConfig.from_hf_dict(hf.read_config(folder))
    model = build_model(config, torch.float32, torch.device("cpu"))
    weights = dict(load_file(folder / "model.safetensors"))
    weights["model.layers.5.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    weights["model.layers.5.self_attn.v_norm.weight"] = torch.zeros(16)
    load_weights(model, weights.items())


def test_kv_blocks_on_the_real_35_layer_config():
    """Gemma 3n E4B: 35 layers, the last 15 share: a token's cache is 20 layers' worth, so a KV budget holds
    35/20 = 1.75x the blocks a count over all layers would give."""
    import transformers as tf

    from levante.config import ModelConfig
    from levante.engine.runner import kv_bytes_per_token
    from levante.models.registry import build_model

    cfg = tf.Gemma3nTextConfig()  # transformers' defaults are E4B's
    assert (cfg.num_hidden_layers, cfg.num_kv_shared_layers, cfg.num_key_value_heads, cfg.head_dim) == (35, 15, 2, 256)
    raw = cfg.to_dict()
    # The attention geometry and layer pattern as E4B; the widths that do not touch the cache made tiny.
    raw.update(architectures=["Gemma3nForCausalLM"], vocab_size=16, vocab_size_per_layer_input=16, hidden_size=8,
               intermediate_size=8, hidden_size_per_layer_input=4, laurel_rank=2)
    model = build_model(ModelConfig.from_hf_dict(raw), torch.bfloat16, torch.device("cpu"))
    per_token = kv_bytes_per_token(model, torch.bfloat16)
    assert per_token == 20 * 2 * 2 * 256 * 2
    budget, block = 2 << 30, 16
    naive = budget // (35 * 2 * 2 * 256 * 2 * block)
    shared = budget // (per_token * block)
    assert (naive, shared) == (1872, 3276)  # 1404 blocks (22,464 tokens of 16-token blocks) more in 2 GiB


def test_prefix_cache_and_preemption_keep_results(folder, reference):
    """Few blocks: sequences get preempted and recomputed; a repeated prompt hits the prefix cache."""
    from levante import LLM, SamplingParams

    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=14, max_num_batched_tokens=8)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1][:17] + [3, 4, 5]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for ids, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == _expected_continuation(reference, ids, 16)
    assert llm.engine.scheduler.num_preemptions > 0
    again = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=1, return_prompt_logits=True))[0]
    assert again.num_cached_tokens > 0
    expected = _expected_logits(reference, PROMPTS[1])
    torch.testing.assert_close(again.metrics["prompt_logits"], expected[again.num_cached_tokens:],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("paged", [False, True], ids=["sdpa", "paged"])
def test_device_map_splits_sharing_layers_from_their_producers(folder, reference, monkeypatch, paged):
    """Layers 4 and 5 (which read layers 3 and 2) on the second device of the map: the shared keys and
    values are gathered where the producer's cache is and moved to the queries' device. On the CPU both
    devices are the CPU, so this runs the moving code with no-op moves."""
    from levante import LLM, SamplingParams
    from levante.engine.placement import layer_devices

    if paged:
        monkeypatch.setenv("LEVANTE_PAGED_ATTENTION", "1")
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=64, device_map="0:4;1:2")
    assert len(layer_devices(llm.engine.model)) == 6
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for ids, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == _expected_continuation(reference, ids, 16)


@pytest.mark.parametrize("qtype", [None, "Q8_0"])
def test_gguf_file_matches_transformers(folder, reference, tmp_path, qtype):
    """A GGUF written as llama.cpp's converter writes Gemma 3n (gguf's tensor names) loads and runs: F32 gives
    transformers' logits and greedy tokens; with Q8_0 matrices, the packed int8 weights track the same file
    dequantised."""
    import gguf

    from levante import LLM, SamplingParams

    path = tiny.write_gguf(folder, tmp_path / "tiny-gemma3n.gguf", qtype and gguf.GGMLQuantizationType[qtype])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, return_prompt_logits=True)
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64)
    assert llm.engine.model_config.architecture == "Gemma3nForCausalLM"
    outputs = llm.generate(PROMPTS, params)
    if qtype is None:
        for ids, output in zip(PROMPTS, outputs):
            expected = _expected_logits(reference, ids)
            got = output.metrics["prompt_logits"]
            assert (got - expected[len(expected) - len(got):]).abs().max().item() <= 1e-4
            assert output.outputs[0].token_ids == _expected_continuation(reference, ids, 16)
        return
    assert llm.engine.quantization is not None
    dense = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64, quantization="none")
    got = torch.cat([o.metrics["prompt_logits"] for o in outputs])
    want = torch.cat([o.metrics["prompt_logits"] for o in dense.generate(PROMPTS, params)])
    # int8 weights against float ones (as tests/test_quant.py measures ISQ int8): relative RMS < 5% where the
    # prompt's rows take a dense matmul (AVX-512 from 12 rows on); < 8% where every row count takes the W8A8
    # kernel, activations rounded to 8 bits in blocks of 32 as llama.cpp's (AVX2, NEON; observed 6.2%)
    assert ((got - want).norm() / want.norm()).item() < 0.08
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.8  # 0.88 observed with 8-bit activations


# -- MatFormer: a smaller model cut out of the checkpoint ---------------------------------------------------

SLICES = """Name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped
Main model,6,0.1,0%,"[96, 128, 96, 128, 96, 96]",
Small,5,0.05,0%,"[2 * 32, 96, 8 * 8, 96, 4_8]","[1]"
Skips a producer,5,0.05,0%,"[96, 96, 128, 96, 96]","[2]"
"""


def _sliced_reference(folder, kept, widths):
    """transformers' Gemma 3n with the slice's config and the checkpoint's tensors cut by hand."""
    import transformers as tf
    from safetensors.torch import load_file

    cfg = tiny.text_config(num_hidden_layers=len(kept), intermediate_size=widths,
                           layer_types=[tiny.LAYER_TYPES[i] for i in kept],
                           activation_sparsity_pattern=[[0.95, 0.95, 0.0, 0.0, 0.0, 0.0][i] for i in kept])
    model = tf.Gemma3nForCausalLM(cfg).eval()
    state, size = {}, cfg.hidden_size_per_layer_input
    for name, tensor in load_file(folder / "model.safetensors").items():
        parts = name.split(".")
        if parts[1] == "layers":
            if int(parts[2]) not in kept:
                continue
            new = kept.index(int(parts[2]))
            parts[2] = str(new)
            if parts[3] == "mlp":
                tensor = tensor[:, :widths[new]] if parts[4] == "down_proj" else tensor[:widths[new]]
        elif parts[1] == "embed_tokens_per_layer":
            tensor = tensor.view(tensor.size(0), -1, size)[:, kept].reshape(tensor.size(0), -1)
        elif parts[1] == "per_layer_model_projection":
            tensor = tensor.view(-1, size, tensor.size(-1))[kept].reshape(-1, tensor.size(-1))
        state[".".join(parts)] = tensor
    model.load_state_dict(state, strict=False)
    return model


def test_matformer_slice_matches_the_cut_model(folder, tmp_path):
    from levante import LLM, SamplingParams

    table = tmp_path / "slices.csv"
    table.write_text(SLICES)
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=64, matformer_config=str(table),
              matformer_slice="Small")
    layers = llm.engine.model.model.layers
    assert len(layers) == 5 and [layer.mlp.down_proj.weight.shape[1] for layer in layers] == [64, 96, 64, 96, 48]
    reference = _sliced_reference(folder, [0, 2, 3, 4, 5], [64, 96, 64, 96, 48])
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                   return_prompt_logits=True))
    for ids, output in zip(PROMPTS, outputs):
        expected = _expected_logits(reference, ids)
        torch.testing.assert_close(output.metrics["prompt_logits"], expected[output.num_cached_tokens:],
                                   atol=1e-4, rtol=0)
        assert output.outputs[0].token_ids == _expected_continuation(reference, ids, 16)


def test_matformer_errors_are_clear(folder, tmp_path):
    from levante import LLM
    from levante.errors import ModelLoadError

    table = tmp_path / "slices.csv"
    table.write_text(SLICES)
    for name, message in [("Skips a producer", r"skips layer\(s\) \[2\], whose KV cache later layers read"),
                          ("E9B", "no slice named 'E9B'")]:
        with pytest.raises(ModelLoadError, match=message):
            LLM(str(folder), dtype="float32", num_kv_blocks=16, matformer_config=str(table), matformer_slice=name)
    with pytest.raises(ModelLoadError, match="needs both"):
        LLM(str(folder), dtype="float32", num_kv_blocks=16, matformer_slice="Small")
