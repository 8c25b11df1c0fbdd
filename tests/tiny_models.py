"""Tiny random checkpoints of each architecture, saved with transformers' `save_pretrained`."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384


def _tokenizer(folder: Path):
    """A small byte-level BPE tokenizer trained on a fixed text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 4, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog. " * 4, "def add(a, b):\n    return a + b\n",
            "Bonjour, ça va? 你好，世界。 🙂"]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    fast.save_pretrained(folder)


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.1, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
    if arch == "mistral":  # every layer within a window shorter than the test prompts
        return tf.MistralConfig(**common, sliding_window=16, architectures=["MistralForCausalLM"])
    if arch == "phi3":  # LongRoPE; the 8-token pretraining length makes every test sequence "long"
        factors = torch.Generator().manual_seed(3)
        return tf.Phi3Config(**common, original_max_position_embeddings=8, sliding_window=24,
                             rope_parameters=_longrope(8, factors), architectures=["Phi3ForCausalLM"])
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                architectures=["MixtralForCausalLM"])
    if arch == "qwen3_moe":  # layer 1 keeps a dense MLP; routing weights not renormalised
        return tf.Qwen3MoeConfig(**common, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                 norm_topk_prob=False, mlp_only_layers=[1], architectures=["Qwen3MoeForCausalLM"])
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   architectures=["Gemma3ForCausalLM"])
    raise ValueError(arch)


def _longrope(half_head: int, generator: torch.Generator) -> dict:
    """LongRoPE parameters with random per-frequency factors (1 to 4 long, 1 to 1.5 short)."""
    return {"rope_type": "longrope", "rope_theta": 10000.0,
            "long_factor": (1 + 3 * torch.rand(half_head, generator=generator)).tolist(),
            "short_factor": (1 + 0.5 * torch.rand(half_head, generator=generator)).tolist()}


def build(arch: str, folder: Path, **changes) -> Path:
    """Save a tiny random `arch` model (float32) with a tokenizer into `folder`; `changes` set
    config attributes (e.g. a variant llama.cpp can run)."""
    import transformers as tf

    config = _config(arch)
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    cls = tf.Gemma3ForCausalLM if arch == "gemma3" else tf.AutoModelForCausalLM
    model = cls.from_config(config) if cls is tf.AutoModelForCausalLM else cls(config)
    with torch.no_grad():  # norms start at 1 (or 0 for gemma): make them random so they are tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):  # MoE routers start at zero: every expert tied
                p.normal_(0, 0.5)
    model.to(torch.float32).save_pretrained(folder)
    _tokenizer(folder)
    return folder


def load_reference(folder: Path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
