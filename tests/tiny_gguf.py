"""Tiny HF checkpoints written as GGUF files the way llama.cpp's convert_hf_to_gguf.py writes
them: its architecture names (Mistral and Mixtral are "llama"), hyperparameter keys, tensor
names from the `gguf` package's own map, llama's Q/K row permutation, experts stacked into one
3-D tensor per matrix, Phi-3's LongRoPE factors as tensors, routers kept F32, and a gpt2 (byte
level BPE) vocabulary. Weights may be quantised with `gguf.quants`."""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
                 "Phi3ForCausalLM": "phi3", "Qwen3MoeForCausalLM": "qwen3moe"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")


def convert(folder: Path, path: Path, qtype: gguf.GGMLQuantizationType | None = None) -> Path:
    """Write the checkpoint in `folder` as the GGUF file `path`; matrices as `qtype` (else F32)."""
    config = json.loads((folder / "config.json").read_text())
    arch = ARCHITECTURES[config["architectures"][0]]
    writer = gguf.GGUFWriter(path, arch)
    _hyperparameters(writer, config, arch)
    _vocabulary(writer, folder, config)
    model_arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.get_tensor_name_map(model_arch, config["num_hidden_layers"])
    tensors = {}
    for hf_name, data in _tensors(folder, config, arch):
        name = hf_name if hf_name.startswith("rope_factors_") else \
            names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        quantized = qtype is not None and data.ndim >= 2 and ".ffn_gate_inp." not in name
        tensors[name] = (data, qtype) if quantized else data
    save(writer, tensors)
    return path


def save(writer: gguf.GGUFWriter, tensors: dict) -> None:
    """Add `tensors` (name -> float array, or (float array, qtype) to store it quantised) and write the file."""
    for name, data in tensors.items():
        if isinstance(data, tuple):
            writer.add_tensor(name, gguf.quants.quantize(*data), raw_dtype=data[1])
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_transformer_sizes(writer: gguf.GGUFWriter, config: dict, rope_theta: float) -> int:
    """The hyperparameters every decoder GGUF carries (layers, widths, heads, norm eps, RoPE base); the head size."""
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    return head_dim


def _hyperparameters(writer: gguf.GGUFWriter, config: dict, arch: str) -> None:
    head_dim = add_transformer_sizes(writer, config, config["rope_parameters"]["rope_theta"])
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if arch == "phi3":
        rope = config["rope_parameters"]
        original = config["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if rope["rope_type"] == "longrope":
            scale = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))


def _vocabulary(writer: gguf.GGUFWriter, folder: Path, config: dict) -> None:
    """The tokenizer.json's byte-level BPE as llama.cpp's "gpt2" model, padded to the embedding's rows."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    by_id = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    special = {added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    by_id.update({added["id"]: added["content"] for added in tokenizer["added_tokens"]})
    tokens, types = [], []
    for index in range(config["vocab_size"]):
        tokens.append(by_id.get(index, f"[PAD{index}]"))
        types.append(gguf.TokenType.CONTROL if index in special else
                     gguf.TokenType.NORMAL if index in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair
                             for pair in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama Q/K rows (the two halves of each head interleaved)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def _tensors(folder: Path, config: dict, arch: str):
    """(HF-style name, float32 array) in the converter's form; experts stacked per layer and matrix."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    experts = defaultdict(dict)
    for name, data in tensors.items():
        data = data.astype(np.float32)
        if match := _EXPERT.fullmatch(name):
            layer, block, expert, matrix = match.groups()
            experts[(layer, block, matrix)][int(expert)] = data
            continue
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            key = "num_attention_heads" if ".q_proj." in name else "num_key_value_heads"
            data = llama_cpp_permute(data, config[key])
        yield name, data
    for (layer, block, matrix), stack in experts.items():
        yield f"model.layers.{layer}.{block}.experts.{matrix}.weight", np.stack([stack[e] for e in sorted(stack)])
    if arch == "phi3" and config["rope_parameters"]["rope_type"] == "longrope":
        for kind in ("long", "short"):
            yield f"rope_factors_{kind}.weight", np.array(config["rope_parameters"][f"{kind}_factor"], np.float32)
