"""Tiny random sentence-embedding checkpoints, saved by sentence-transformers itself.

Each folder is what `SentenceTransformer.save` writes (modules.json, 1_Pooling/,
2_Dense/, ...), so the pipeline levante reads is the real on-disk format.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import VOCAB, _tokenizer

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.1, bos_token_id=2, eos_token_id=1, pad_token_id=0)
QWEN3_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


def _randomize_norms(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def _save(model, modules_after, folder: Path, prompts: dict[str, str]) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Transformer

    base = folder.parent / (folder.name + "-base")
    model.to(torch.float32).save_pretrained(base)
    _tokenizer(base)
    st = SentenceTransformer(modules=[Transformer(str(base)), *modules_after], prompts=prompts, device="cpu")
    st.save(str(folder))
    return folder


def build_embedding_gemma(folder: Path) -> Path:
    """Gemma 3 text, bidirectional, mean pooling, two Dense stages (64 -> 128 -> 64), Normalize."""
    import transformers as tf
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling

    config = tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                 use_bidirectional_attention=True, architectures=["Gemma3TextModel"],
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    model = tf.Gemma3TextModel(config)
    _randomize_norms(model)
    stages = [Pooling(64, pooling_mode="mean"),
              Dense(64, 128, bias=False, activation_function=torch.nn.Identity()),
              Dense(128, 64, bias=False, activation_function=torch.nn.Identity()), Normalize()]
    return _save(model, stages, folder, {"query": "task: search result | query: ",
                                         "document": "title: none | text: "})


def build_qwen3_embedding(folder: Path) -> Path:
    """Qwen3, causal, last-token pooling, Normalize; config.json names Qwen3ForCausalLM (#1707)."""
    import transformers as tf
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    config = tf.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = tf.Qwen3Model(config)
    _randomize_norms(model)
    _save(model, [Pooling(64, pooling_mode="lasttoken"), Normalize()], folder,
          {"query": QWEN3_QUERY_PROMPT, "document": ""})
    config_path = folder / "config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "architectures": ["Qwen3ForCausalLM"]}, indent=2))
    return folder


def load_reference(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)
