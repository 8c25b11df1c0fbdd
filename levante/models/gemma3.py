"""Gemma 3 (text): scaled embeddings, blocks with norms before and after both
attention and MLP, QK-norm, GELU-tanh MLP, and sliding-window layers (local RoPE)
interleaved with global ones."""
from __future__ import annotations

import torch
from torch import nn

from levante.config import ModelConfig
from levante.layers.embedding import VocabParallelEmbedding
from levante.layers.norms import RMSNorm
from levante.models.llama import CausalLM, GatedMLP, SelfAttention


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = SelfAttention(config, config.layer_types[layer_idx], qk_norm=True, norm_unit_offset=True)
        self.mlp = GatedMLP(config)
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(hidden)))
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma3TextModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size ** 0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # transformers rounds the scale to the weights' dtype before multiplying.
        return hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


class Gemma3ForCausalLM(CausalLM):
    def build_decoder(self, config: ModelConfig) -> nn.Module:
        return Gemma3TextModel(config)
