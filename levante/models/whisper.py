"""Whisper (encoder-decoder speech recognition), as the paper's figure draws it:

    log-mel [batch, mels, 3000] -> two convolutions (GELU; the second halves time) + positions ->
    N encoder blocks (pre-LN, attention both ways) -> LayerNorm = the memory [batch, 1500, d]
    tokens -> embeddings + learned positions -> N decoder blocks (pre-LN: causal self-attention over
    the KV cache, cross-attention over the memory, GELU MLP) -> LayerNorm -> logits (tied head)

Module names follow the checkpoint's (`model.decoder.layers.N.encoder_attn.q_proj`), so weights load by
name. The Transcriber (engine/transcriber.py) sets the attention metadata and the decoder's caches,
and runs the decoding loop.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.errors import ModelLoadError
from levante.layers.attention import Attention
from levante.layers.cross_attention import CrossAttention
from levante.layers.embedding import VocabParallelEmbedding
from levante.layers.linear import ReplicatedLinear
from levante.models.bert import ACTIVATIONS


def hf_config(raw: dict) -> dict:
    """A Whisper config.json in the names ModelConfig reads (the decoder's sizes)."""
    try:
        return {**raw, "hidden_size": raw["d_model"], "num_attention_heads": raw["decoder_attention_heads"],
                "num_hidden_layers": raw["decoder_layers"], "intermediate_size": raw["decoder_ffn_dim"],
                "max_position_embeddings": raw["max_target_positions"], "tie_word_embeddings": True}
    except KeyError as e:
        raise ModelLoadError(f"Whisper config is missing {e}") from None


class WhisperAttention(nn.Module):
    """Self-attention (`forward`, through the layer's KV cache when it has one) or cross-attention over
    the encoder's memory (`cross`, after `remember`). Keys have no bias, as Whisper's."""

    def __init__(self, d_model: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.q_proj = ReplicatedLinear(d_model, d_model, bias=True)
        self.k_proj = ReplicatedLinear(d_model, d_model, bias=False)
        self.v_proj = ReplicatedLinear(d_model, d_model, bias=True)
        self.out_proj = ReplicatedLinear(d_model, d_model, bias=True)
        scale = self.head_dim ** -0.5
        self.attn = CrossAttention(heads, self.head_dim, scale) if cross else \
            Attention(heads, heads, self.head_dim, scale)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(hidden).view(-1, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(self.attn(q, k, v))

    def cross(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.attn(self.q_proj(hidden)))

    def remember(self, memory: torch.Tensor) -> None:
        self.attn.remember(self.k_proj(memory), self.v_proj(memory))


class WhisperMLP(nn.Module):
    def __init__(self, config: ModelConfig, ffn: int):
        super().__init__()
        d_model = config.hidden_size
        self.fc1 = ReplicatedLinear(d_model, ffn, bias=True)
        self.fc2 = ReplicatedLinear(ffn, d_model, bias=True)
        act = config.raw.get("activation_function", "gelu")
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported Whisper activation '{act}'")
        self.act = ACTIVATIONS[act]


class WhisperEncoderLayer(WhisperMLP):
    def __init__(self, config: ModelConfig):
        super().__init__(config, int(config.raw["encoder_ffn_dim"]))
        d_model = config.hidden_size
        self.self_attn = WhisperAttention(d_model, int(config.raw["encoder_attention_heads"]))
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden))
        return hidden + self.fc2(self.act(self.fc1(self.final_layer_norm(hidden))))


class WhisperDecoderLayer(WhisperMLP):
    def __init__(self, config: ModelConfig):
        super().__init__(config, config.intermediate_size)
        d_model, heads = config.hidden_size, config.num_heads
        self.self_attn = WhisperAttention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = WhisperAttention(d_model, heads, cross=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden))
        hidden = hidden + self.encoder_attn.cross(self.encoder_attn_layer_norm(hidden))
        return hidden + self.fc2(self.act(self.fc1(self.final_layer_norm(hidden))))


class WhisperEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        raw, d_model = config.raw, config.hidden_size
        self.conv1 = nn.Conv1d(int(raw["num_mel_bins"]), d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(int(raw["max_source_positions"]), d_model)
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(int(raw["encoder_layers"])))
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [batch, mels, 2 * positions] -> [batch * positions, d] (rows of one input together)."""
        hidden = F.gelu(self.conv2(F.gelu(self.conv1(features)))).transpose(1, 2)
        hidden = (hidden + self.embed_positions.weight).reshape(-1, hidden.size(-1))
        for layer in self.layers:
            hidden = layer(hidden)
        return self.layer_norm(hidden)


class WhisperDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(WhisperDecoderLayer(config) for _ in range(config.num_layers))
        self.layer_norm = nn.LayerNorm(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.layer_norm(hidden)


class WhisperModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)


class WhisperForConditionalGeneration(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.raw.get("scale_embedding"):
            raise ModelLoadError("Whisper with scale_embedding is not supported")
        self.config = config
        self.model = WhisperModel(config)
        self.max_source_positions = int(config.raw["max_source_positions"])

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Log-mel features -> the memory, [batch, positions, d]; under bidirectional attention metadata."""
        return self.model.encoder(features).view(features.size(0), self.max_source_positions, -1)

    def remember(self, memory: torch.Tensor) -> None:
        """Project the memory for every decoder layer's cross-attention (once per batch of inputs)."""
        for layer in self.model.decoder.layers:
            layer.encoder_attn.remember(memory)

    def forget(self) -> None:
        for layer in self.model.decoder.layers:
            layer.encoder_attn.attn.forget()

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Tokens of every input of the batch (the same number each, one input's together) -> float32
        logits; under the decoder's attention metadata."""
        hidden = self.model.decoder(input_ids, positions)
        return F.linear(hidden, self.model.decoder.embed_tokens.weight).float()

    def self_attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.decoder.layers]

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The head is the token embedding (tied): a saved `proj_out.weight` is that matrix again."""
        for name, tensor in weights:
            if name != "proj_out.weight":
                yield name, tensor
