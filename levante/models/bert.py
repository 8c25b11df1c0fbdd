"""BERT (all-MiniLM and kin) and RoBERTa / XLM-R: embeddings (word + position + token type), N
post-LN encoder blocks (bidirectional attention, GELU MLP), no head. RoBERTa's positions start
after its padding id; a cross-encoder's pair has token types 0 (query) then 1 (document).

Module names follow the checkpoint's (`encoder.layer.N.attention.output.dense`),
so weights load by name; q/k/v are fused on load through `packed_modules_mapping`.
The runner sets `AttentionMetadata(causal=False)`: every token sees its whole text.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.errors import ModelLoadError
from levante.layers.attention import Attention
from levante.layers.embedding import VocabParallelEmbedding
from levante.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

ROBERTA_TYPES = ("roberta", "xlm-roberta")
ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def _layer_norm(config: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=float(config.raw.get("layer_norm_eps", 1e-12)))


def position_offset(config: ModelConfig) -> int:
    """Where positions start in the position table: RoBERTa and XLM-R count from the padding id + 1."""
    return int(config.raw.get("pad_token_id", 1)) + 1 if config.model_type in ROBERTA_TYPES else 0


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(int(config.raw.get("type_vocab_size", 2)), config.hidden_size)
        self.LayerNorm = _layer_norm(config)
        self.position_offset = position_offset(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`token_type_ids`: each token's segment (a cross-encoder's query 0, document 1); None: all 0."""
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        types = self.token_type_embeddings.weight[0] if token_type_ids is None else \
            self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(hidden + types)


class ResidualOutput(nn.Module):
    """A sub-layer's exit: project, add the residual, then LayerNorm (post-LN)."""

    def __init__(self, config: ModelConfig, in_features: int):
        super().__init__()
        self.dense = RowParallelLinear(in_features, config.hidden_size, bias=True)
        self.LayerNorm = _layer_norm(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_heads, bias=True)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, self.head_dim ** -0.5)
        self.output = ResidualOutput(config, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.qkv_proj(hidden).chunk(3, dim=-1))
        return self.output(self.attn(q, k, v), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported BERT activation '{config.hidden_act}'")
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = ResidualOutput(config, config.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden)
        return hidden


class BertModel(nn.Module):
    is_causal = False
    packed_modules_mapping = {
        "self.query": ("qkv_proj", "q"),
        "self.key": ("qkv_proj", "k"),
        "self.value": ("qkv_proj", "v"),
    }
    # Checkpoint tensors an encoder without its heads has no use for.
    unused_prefixes = ("pooler.", "cls.", "embeddings.position_ids")

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError("only absolute position embeddings are supported for BERT")
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids))
