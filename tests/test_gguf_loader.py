"""levante.loader.gguf: HF names, layouts and config against transformers' own GGUF
loader, and clear errors on broken files."""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from levante.errors import ModelLoadError, UnsupportedArchitecture
from levante.loader.gguf import GGUFFile
from levante.loader.sources import PACKAGED_MODELS, is_installed, resolve_alias
from levante.quant.gguf_blocks import dequantize
from tiny_gguf import llama_cpp_permute, save
from tokenizer_refs import transformers_model

GGUF_ALIASES = [alias for alias, model in PACKAGED_MODELS.items() if model.filename.endswith(".gguf")]
CONFIG_FIELDS = [
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
    "sliding_window", "layer_types", "query_pre_attn_scalar", "hidden_activation",
    "final_logit_softcapping", "attn_logit_softcapping",
]


def packaged_path(alias: str) -> Path:
    if not is_installed(alias):
        pytest.skip(f"{alias} not installed")
    return resolve_alias(alias)


@pytest.fixture(scope="module", autouse=True)
def free_the_reference():
    """transformers_model keeps the last reference it built (the default model's, shared with
    test_default_model.py); none is needed after this module."""
    yield
    transformers_model.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_matches_transformers_gguf_loader(alias):
    """Same parameter names, shapes and values as transformers' GGUF loading.

    Both sides dequantise bit-exactly (see test_gguf_dequant) and apply the same exact
    float32 fix-ups (``w - 1``, row permutations), so values must be equal, not close.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    path = packaged_path(alias)
    model = transformers_model(alias)
    expected = model.state_dict()
    ours = GGUFFile(path)
    config = ours.hf_config()

    seen = set()
    for name, tensor in ours.named_tensors():
        assert name in expected, name
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name
        seen.add(name)
    tied = {"lm_head.weight"} if config["tie_word_embeddings"] else set()
    assert seen | tied == set(expected)

    assert config["architectures"] == [type(model).__name__]
    for field in CONFIG_FIELDS:
        if hasattr(model.config, field):
            assert config[field] == getattr(model.config, field), field


def test_raw_tensors_agree_with_named_tensors():
    """The still-quantised view dequantises to exactly what named_tensors yields, Q/K
    rows of this llama model included (gemma3's shifted norms: see the synthetic test)."""
    ours = GGUFFile(packaged_path("smollm2:135m"))
    raw = {name: (qtype, data, shape) for name, qtype, data, shape in ours.raw_tensors()}
    assert len(raw) == ours.tensor_count
    for name, tensor in ours.named_tensors():
        qtype, data, shape = raw[name]
        assert data.dtype == torch.uint8 and data.shape[:-1] == shape[:-1]
        assert torch.equal(dequantize(data, qtype, shape), tensor), name


# -- small synthetic files ---------------------------------------------------------------


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], layers: int = 1, **fields) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list([f"t{i}" for i in range(12)])
    for key, value in fields.items():
        add = {str: writer.add_string, float: writer.add_float32, int: writer.add_uint32}[type(value)]
        add(key, value)
    save(writer, tensors)
    return path


def test_llama_qk_rows_are_unpermuted(tmp_path):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in [(8, 8), (4, 8), (4, 8)])
    path = write_gguf(tmp_path / "tiny.gguf", "llama", {
        "blk.0.attn_q.weight": llama_cpp_permute(q, 2),
        "blk.0.attn_k.weight": llama_cpp_permute(k, 1),
        "blk.0.attn_v.weight": v,
        "token_embd.weight": rng.standard_normal((12, 8)).astype(np.float32),
    })
    tensors = dict(GGUFFile(path).named_tensors())
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(tensors["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(k))
    assert torch.equal(tensors["model.layers.0.self_attn.v_proj.weight"], torch.from_numpy(v))
    config = GGUFFile(path).hf_config()
    assert config["tie_word_embeddings"] and config["vocab_size"] == 12 and config["head_dim"] == 4


def test_gemma3_norms_and_config(tmp_path):
    norm = np.full(8, 1.25, dtype=np.float32)
    path = write_gguf(tmp_path / "gemma.gguf", "gemma3", {
        "blk.0.attn_q_norm.weight": norm, "blk.0.post_ffw_norm.weight": norm, "output_norm.weight": norm,
        "blk.0.ffn_norm.weight": norm, "blk.0.attn_q.weight": np.ones((8, 8), dtype=np.float32),
        "blk.11.attn_q.weight": np.ones((8, 8), dtype=np.float32),  # the file holds 12 layers' tensors
    }, layers=12, **{"gemma3.attention.sliding_window": 4, "gemma3.rope.scaling.type": "linear",
                     "gemma3.rope.scaling.factor": 8.0})
    file = GGUFFile(path)
    tensors = dict(file.named_tensors())
    for name in ["model.layers.0.self_attn.q_norm.weight", "model.layers.0.post_feedforward_layernorm.weight",
                 "model.norm.weight", "model.layers.0.pre_feedforward_layernorm.weight"]:
        assert torch.equal(tensors[name], torch.full((8,), 0.25)), name
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], torch.ones(8, 8))
    raw = {name: (qtype, data) for name, qtype, data, _ in file.raw_tensors()}
    assert raw["model.norm.weight"][0] == gguf.GGMLQuantizationType.F32
    assert torch.equal(raw["model.norm.weight"][1].view(torch.float32), torch.full((8,), 0.25))
    config = file.hf_config()
    assert config["layer_types"][5] == config["layer_types"][11] == "full_attention"
    assert config["layer_types"].count("full_attention") == 2
    assert config["sliding_window"] == 4 and config["query_pre_attn_scalar"] == config["head_dim"] == 4
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    # llama.cpp scales only the global layers' RoPE; the local ones keep base 10000, unscaled.
    assert config["rope_parameters"] == {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0},
    }


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        GGUFFile(tmp_path / "absent.gguf")


def test_random_bytes_are_not_gguf(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFFile(path)


def test_truncated_real_model(tmp_path):
    source = packaged_path("smollm2:135m")
    path = tmp_path / "half.gguf"
    with source.open("rb") as stream:
        path.write_bytes(stream.read(source.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match="truncated") as error:
        GGUFFile(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_truncated_inside_metadata(tmp_path):
    source = packaged_path("smollm2:135m")
    path = tmp_path / "header-only.gguf"
    with source.open("rb") as stream:
        path.write_bytes(stream.read(100_000))  # cut through the token list
    with pytest.raises(ModelLoadError, match="truncated"):
        GGUFFile(path)


def corrupted_copy(tmp_path: Path, offset: int, value: bytes) -> Path:
    path = tmp_path / "corrupt.gguf"
    shutil.copyfile(packaged_path("smollm2:135m"), path)
    with path.open("r+b") as stream:
        stream.seek(offset)
        stream.write(value)
    return path


def test_corrupt_version(tmp_path):
    path = corrupted_copy(tmp_path, 4, (99).to_bytes(4, "little"))
    with pytest.raises(ModelLoadError, match="corrupt GGUF header.*version 99"):
        GGUFFile(path)


def test_corrupt_metadata_value_type(tmp_path):
    # The first key/value follows magic, version and the two counts (24 bytes).
    with packaged_path("smollm2:135m").open("rb") as stream:
        key_length = int.from_bytes(stream.read(32)[24:], "little")
    path = corrupted_copy(tmp_path, 32 + key_length, (0xBEEF).to_bytes(4, "little"))
    with pytest.raises(ModelLoadError, match="corrupt GGUF header or metadata"):
        GGUFFile(path)


def test_corrupt_key_length(tmp_path):
    path = corrupted_copy(tmp_path, 24, (1 << 40).to_bytes(8, "little"))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        GGUFFile(path)


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "other.gguf", "mamba", {"token_embd.weight": np.zeros((12, 8), np.float32)})
    file = GGUFFile(path)  # metadata stays readable, e.g. for the tokenizer
    assert file.architecture == "mamba" and file.field("tokenizer.ggml.tokens")[:2] == ["t0", "t1"]
    with pytest.raises(UnsupportedArchitecture, match="mamba.*gemma3, gemma3n, llama, phi3, qwen2, qwen3, qwen3moe"):
        file.hf_config()
    with pytest.raises(UnsupportedArchitecture):
        next(file.named_tensors())


def test_stacked_experts_come_out_one_by_one_still_quantized(tmp_path):
    """llama.cpp stacks a mixture's experts (ffn_*_exps, [experts, rows, cols]); a ``llama`` file
    with experts is Mixtral, and each expert comes back under its HF name as a view of the
    stack's blocks."""
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((4, 16, 32)).astype(np.float32)
    path = write_gguf(tmp_path / "moe.gguf", "llama", {
        "blk.0.ffn_gate_exps.weight": (stack, gguf.GGMLQuantizationType.Q8_0),
        "blk.0.ffn_gate_inp.weight": rng.standard_normal((4, 32)).astype(np.float32),
    }, **{"llama.expert_count": 4, "llama.expert_used_count": 2})
    file = GGUFFile(path)
    config = file.hf_config()
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 2, 16)
    quantized = dict(file.quantized_tensors())
    dense = dict(file.named_tensors())
    assert "model.layers.0.block_sparse_moe.gate.weight" in dense
    blocks = gguf.quants.quantize(stack, gguf.GGMLQuantizationType.Q8_0)
    for expert in range(4):
        name = f"model.layers.0.block_sparse_moe.experts.{expert}.w1.weight"
        assert quantized[name].qtype == gguf.GGMLQuantizationType.Q8_0 and quantized[name].shape == (16, 32)
        expected = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)[expert])
        assert torch.equal(quantized[name].dequantize(), expected) and torch.equal(dense[name], expected)
