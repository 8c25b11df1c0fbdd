"""Llama: embeddings, N pre-norm decoder blocks (attention + SwiGLU MLP), norm, head.

Qwen2 (biased q/k/v) and Qwen3 (per-head RMSNorm on q and k) are this same figure
with one switch each; their files subclass these modules. Mistral and Phi-3 are it
as their configs set it (a sliding window, LongRoPE), and so are Mixtral and Qwen3-MoE,
whose configs make some blocks' MLP a mixture of experts (layers/moe.py).
"""
from __future__ import annotations

import torch
from torch import nn

from levante.config import FULL, SLIDING, ModelConfig
from levante.distributed import tp_size
from levante.layers import mlp
from levante.layers.attention import Attention, get_attention_metadata
from levante.layers.decode_step import BlockParts, DecodeStep
from levante.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from levante.layers.linear import QKVParallelLinear, RowParallelLinear
from levante.layers.moe import SparseMoE
from levante.layers.norms import RMSNorm
from levante.layers.rotary import RotaryEmbedding


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str = FULL, qkv_bias: bool = False,
                 qk_norm: bool = False, norm_unit_offset: bool = False):
        super().__init__()
        tp = tp_size()
        self.num_heads = config.num_heads // tp
        self.num_kv_heads = max(1, config.num_kv_heads // tp)
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_heads,
                                          config.num_kv_heads, bias=qkv_bias or config.attention_bias)
        self.o_proj = RowParallelLinear(config.num_heads * self.head_dim, config.hidden_size,
                                        bias=config.attention_bias and not qkv_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None
        rope = config.rope.get(layer_type) or config.rope[FULL]
        self.rotary_emb = RotaryEmbedding(self.head_dim, rope, config.max_position_embeddings, config.max_model_len)
        window = config.sliding_window if layer_type == SLIDING else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              config.attention_scale, sliding_window=window)

    def key_bias(self) -> torch.Tensor | None:
        """[kv_heads, head_dim]: the key projection's bias (Qwen2), which an int8 KV cache takes off the
        keys it stores (engine/runner.py, quant/kv_int8.py); None without one."""
        bias = self.qkv_proj.bias
        if bias is None:
            return None
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return bias.detach()[q_size:q_size + kv_size].float().view(self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k, get_attention_metadata().max_position)
        return self.o_proj(self.attn(q, k, v))


class GatedMLP(mlp.GatedMLP):
    """The dense MLP, as wide as the config says."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)


def feed_forward(config: ModelConfig, layer_idx: int) -> nn.Module:
    """A block's MLP: a mixture of experts where the config makes this layer sparse, else dense."""
    if layer_idx in config.moe_layers:
        return SparseMoE(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                         config.moe_intermediate_size, config.hidden_act, config.norm_topk_prob)
    return GatedMLP(config)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, **attention_options):
        super().__init__()
        self.self_attn = SelfAttention(config, config.layer_types[layer_idx], **attention_options)
        self.mlp = feed_forward(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def decode_parts(self) -> BlockParts | None:
        """This block's modules for layers/decode_step.py (None: its MLP is not a SiLU-gated one)."""
        attn, feed = self.self_attn, self.mlp
        if not isinstance(feed, mlp.GatedMLP) or not feed.act.silu:
            return None
        return BlockParts(self.input_layernorm, attn.qkv_proj, attn.q_norm, attn.k_norm, attn.rotary_emb, attn.attn,
                          attn.o_proj, self.post_attention_layernorm, feed.gate_up_proj, feed.down_proj)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, **attention_options):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, **attention_options) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._decode_step: tuple[torch.Tensor | None, DecodeStep | None] = (None, None)  # (for which cache, step)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        step = self.decode_step() if hidden.shape[0] == 1 else None
        if step is not None:
            metadata = get_attention_metadata()
            if step.takes(hidden, positions, metadata):  # one sequence's decode token: one native call
                return self.norm(step(hidden, metadata))
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)

    def decode_step(self) -> DecodeStep | None:
        """The blocks as one native decode call (layers/decode_step.py), built once per KV cache;
        None where it does not apply to them."""
        cache = self.layers[0].self_attn.attn.k_cache
        if cache is None:
            return None
        built_for, step = self._decode_step
        if built_for is not cache:
            step = DecodeStep.build([layer.decode_parts() for layer in self.layers])
            self._decode_step = (cache, step)
        return step


class CausalLM(nn.Module):
    """A decoder plus its head; subclasses pick the decoder's options."""

    attention_options: dict = {}
    # checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = self.build_decoder(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def build_decoder(self, config: ModelConfig) -> nn.Module:
        return DecoderModel(config, **self.attention_options)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap


class LlamaForCausalLM(CausalLM):
    pass
