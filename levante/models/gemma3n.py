"""Gemma 3n (text): the Gemma 3 block wrapped in AltUp, with LAuReL, per-layer embeddings and KV sharing.

    ids -> embed (x sqrt(hidden)) -> AltUp streams: [embed, proj_1(embed), ..., proj_{n-1}(embed)]
        (each projection rescaled to the embedding's RMS)
    per-layer inputs: per-layer token table (x sqrt(p)) + norm(projection of embed), x 1/sqrt(2)
    N blocks, each:
        predict: the router (tanh of a projection of the active stream) mixes the streams
        active -> norm -> [attention -> norm] + active, + LAuReL(normed) (low-rank residual), / sqrt(2)
               -> [norm -> MLP (gate sparsified by a Gaussian top-k on the first layers) -> norm] +
        correct: the innovation (output - prediction) goes back into every stream, weighted by the router
        the active stream, scaled, gates the layer's per-layer input; projected and normed, it is added
        to the other streams
    unembed: streams 1.. projected back and rescaled, all averaged -> norm -> tied head, soft-capped

Attention: q/k norm with a scale, v-norm without, no 1/sqrt(d) scaling, sliding and full layers with their
own RoPE. KV sharing: the last `num_kv_shared_layers` layers compute queries only and attend to the cache
of the last earlier layer of the same type (layers/attention.py `kv_producer`), so they hold no KV blocks.

MatFormer: `intermediate_size` may differ per layer, and `matformer_slice` cuts a smaller model out of a
larger checkpoint (the FFN widths of a slice and the layers it skips, as mistral.rs's `matformer`
option reads Google's slicing table): the kept layers are renumbered and each FFN keeps its first rows.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import FULL, SLIDING, ModelConfig
from levante.layers.activation import GatedActivation
from levante.layers.attention import Attention, get_attention_metadata
from levante.layers.embedding import VocabParallelEmbedding
from levante.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   ReplicatedLinear, RowParallelLinear)
from levante.layers.norms import RMSNorm
from levante.layers.rotary import RotaryEmbedding
from levante.models.llama import CausalLM
from levante.quant.gguf_blocks import GGUFTensor


class Gemma3nSettings:
    """The Gemma 3n fields of a (text) config.json, with transformers' Gemma3nTextConfig defaults."""

    def __init__(self, config: ModelConfig):
        raw, n = config.raw, config.num_layers
        sizes = raw.get("intermediate_size", config.intermediate_size)
        self.intermediate_sizes = [int(s) for s in sizes] if isinstance(sizes, list) else [int(sizes)] * n
        sparsity = raw.get("activation_sparsity_pattern")
        if sparsity is None:
            sparsity = [0.95] * min(10, n) + [0.0] * (n - 10) if n > 10 else [0.0] * n
        elif not isinstance(sparsity, list):
            sparsity = [float(sparsity)] * n
        self.activation_sparsity = [float(s) for s in sparsity]
        self.per_layer_size = int(raw.get("hidden_size_per_layer_input", 256))
        self.per_layer_vocab = int(raw.get("vocab_size_per_layer_input", 262144))
        self.laurel_rank = int(raw.get("laurel_rank", 64))
        self.altup_inputs = int(raw.get("altup_num_inputs", 4))
        self.altup_active = int(raw.get("altup_active_idx", 0))
        self.altup_correct_scale = bool(raw.get("altup_correct_scale", True))
        clip = raw.get("altup_coef_clip", 120.0)
        self.altup_coef_clip = None if clip is None else float(clip)
        self.kv_producers = kv_producers(config.layer_types, int(raw.get("num_kv_shared_layers", 0)))


def kv_producers(layer_types: list[str], num_shared: int) -> list[int | None]:
    """For each layer, the layer whose KV cache it reads (None: its own): the last `num_shared`
    layers read the last earlier layer of their attention type, as transformers' kv_sharing_modes."""
    n = len(layer_types)
    first_shared = n - num_shared
    out: list[int | None] = [None] * n
    for i in range(max(first_shared, 0), n):
        earlier = [j for j in range(first_shared) if layer_types[j] == layer_types[i]]
        if not earlier:
            raise ValueError(f"KV-sharing layer {i} ({layer_types[i]}) has no earlier layer of its type to read")
        out[i] = earlier[-1]
    return out


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.mean(x ** 2, dim=-1, keepdim=True) ** 0.5


def _rescaled(x: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """`x` scaled to the given RMS per row (transformers' AltUp (un)embedding, floor 1e-5 on the mean square)."""
    return x * target_rms / torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True).clamp(min=1e-5))


class AltUp(nn.Module):
    """Alternating updates: several hidden streams, one computed through the block per layer."""

    def __init__(self, hidden: int, num_inputs: int, active: int, eps: float, coef_clip: float | None):
        super().__init__()
        self.num_inputs, self.active, self.coef_clip = num_inputs, active, coef_clip
        self.correct_output_scale = nn.Parameter(torch.zeros(hidden), requires_grad=False)
        # Tiny matrices (n x n, hidden x n): plain float layers, never quantised.
        self.correction_coefs = nn.Linear(num_inputs, num_inputs, bias=False)
        self.prediction_coefs = nn.Linear(num_inputs, num_inputs ** 2, bias=False)
        self.modality_router = nn.Linear(hidden, num_inputs, bias=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.router_norm = RMSNorm(hidden, eps)
        self.router_input_scale = hidden ** -1.0

    def router(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, hidden] -> [tokens, num_inputs] mixing weights."""
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        """[n, tokens, hidden] -> predictions of the same shape."""
        modalities = self.router(streams[self.active])
        n = self.num_inputs
        coefs = self.prediction_coefs(modalities).reshape(-1, n, n).transpose(1, 2)  # [tokens, n, n]
        predictions = torch.matmul(streams.permute(1, 2, 0), coefs).permute(2, 0, 1)
        return (predictions + streams).contiguous()

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """Spread the active stream's innovation over all streams, weighted by the router."""
        modalities = self.router(activated)
        innovation = activated - predictions[self.active]
        weight = self.correction_coefs.weight
        if self.coef_clip is not None:  # as mistral.rs (transformers clips it while training)
            weight = weight.clamp(-self.coef_clip, self.coef_clip)
        coefs = (F.linear(modalities, weight) + 1.0).transpose(0, 1).unsqueeze(-1)  # [n, tokens, 1]
        return (innovation.unsqueeze(0) * coefs + predictions).contiguous()

    def scale_output(self, x: torch.Tensor) -> torch.Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x))), a low-rank side path."""

    def __init__(self, hidden: int, rank: int, eps: float):
        super().__init__()
        self.linear_left = ReplicatedLinear(hidden, rank)
        self.linear_right = ReplicatedLinear(rank, hidden)
        self.post_laurel_norm = RMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class Gemma3nMLP(nn.Module):
    """GELU-gated MLP of this layer's width; on sparse layers the gate keeps only the values above
    mean + std * Phi^-1(sparsity) of its row (Gaussian top-k), shifted down by that cutoff."""

    def __init__(self, hidden: int, intermediate: int, hidden_act: str, sparsity: float):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2)
        self.down_proj = RowParallelLinear(intermediate, hidden)
        self.act = GatedActivation(hidden_act)
        self.std_multiplier = (torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(sparsity)).item()
                               if sparsity > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.std_multiplier is not None:
            gate, up = gate_up.chunk(2, dim=-1)
            multiplier = torch.tensor(self.std_multiplier, dtype=torch.float32).to(gate.dtype)
            cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * multiplier
            gate_up = torch.cat([F.relu(gate - cutoff), up], dim=-1)
        return self.down_proj(self.act(gate_up))


class Gemma3nAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, kv_producer: Attention | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        layer_type = config.layer_types[layer_idx]
        eps = config.rms_norm_eps
        self.shares_kv = kv_producer is not None
        if self.shares_kv:  # checkpoints may carry k/v weights for these layers; they are never used
            self.q_proj = ColumnParallelLinear(config.hidden_size, self.num_heads * self.head_dim)
        else:
            self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads)
            self.k_norm = RMSNorm(self.head_dim, eps)
            self.v_norm = RMSNorm(self.head_dim, eps, scale=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope.get(layer_type) or config.rope[FULL],
                                          config.max_position_embeddings)
        window = config.sliding_window if layer_type == SLIDING else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, 1.0, sliding_window=window,
                              kv_producer=kv_producer)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.shares_kv:
            q, k, v = self.q_proj(hidden), None, None
        else:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
            k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
            v = self.v_norm(v.view(-1, self.num_kv_heads, self.head_dim))
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        q, k = self.rotary_emb(positions, q, k, get_attention_metadata().max_position)
        return self.o_proj(self.attn(q, k, v))


class Gemma3nDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, settings: Gemma3nSettings, layer_idx: int,
                 kv_producer: Attention | None):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.active = settings.altup_active
        self.correct_scale = settings.altup_correct_scale
        self.self_attn = Gemma3nAttention(config, layer_idx, kv_producer)
        self.mlp = Gemma3nMLP(hidden, settings.intermediate_sizes[layer_idx], config.hidden_act,
                              settings.activation_sparsity[layer_idx])
        norm = lambda: RMSNorm(hidden, eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.altup = AltUp(hidden, settings.altup_inputs, settings.altup_active, eps, settings.altup_coef_clip)
        self.laurel = Laurel(hidden, settings.laurel_rank, eps)
        self.per_layer_input_gate = ReplicatedLinear(hidden, settings.per_layer_size)
        self.per_layer_projection = ReplicatedLinear(settings.per_layer_size, hidden)
        self.post_per_layer_input_norm = norm()
        self.act = GatedActivation(config.hidden_act).act

    def forward(self, positions: torch.Tensor, streams: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        """streams [n, tokens, hidden], per_layer_input [tokens, per_layer_size] -> new streams."""
        predictions = self.altup.predict(streams)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        attn = self.post_attention_layernorm(self.self_attn(positions, normed))
        hidden = (active + attn + self.laurel(normed)) / math.sqrt(2)
        hidden = hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        corrected = self.altup.correct(predictions, hidden)
        first = corrected[self.active]
        if self.correct_scale:
            first = self.altup.scale_output(first)
        gated = self.act(self.per_layer_input_gate(first)) * per_layer_input
        corrected[1:] += self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return corrected


class Gemma3nTextModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        settings = self.settings = Gemma3nSettings(config)
        hidden, n, per_layer = config.hidden_size, config.num_layers, settings.per_layer_size
        self.num_layers, self.per_layer_size, self.hidden_size = n, per_layer, hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        self.embed_scale = hidden ** 0.5
        self.embed_tokens_per_layer = VocabParallelEmbedding(settings.per_layer_vocab, n * per_layer)
        self.per_layer_embed_scale = per_layer ** 0.5
        self.per_layer_model_projection = ReplicatedLinear(hidden, n * per_layer)
        self.per_layer_projection_norm = RMSNorm(per_layer, config.rms_norm_eps)
        self.altup_projections = nn.ModuleList(ReplicatedLinear(hidden, hidden)
                                               for _ in range(1, settings.altup_inputs))
        self.altup_unembed_projections = nn.ModuleList(ReplicatedLinear(hidden, hidden)
                                                       for _ in range(1, settings.altup_inputs))
        layers: list[Gemma3nDecoderLayer] = []
        for i in range(n):
            producer = settings.kv_producers[i]
            layers.append(Gemma3nDecoderLayer(config, settings, i,
                                              None if producer is None else layers[producer].self_attn.attn))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        return hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)  # scale rounded to the dtype first

    def per_layer_inputs(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """[tokens, layers, per_layer_size]: the token's per-layer rows plus a projection of its embedding."""
        in_table = input_ids < self.settings.per_layer_vocab  # image and audio ids take row 0
        rows = self.embed_tokens_per_layer(torch.where(in_table, input_ids, torch.zeros_like(input_ids)))
        rows = (rows * torch.tensor(self.per_layer_embed_scale, dtype=rows.dtype)).view(
            -1, self.num_layers, self.per_layer_size)
        projected = self.per_layer_model_projection(embeds)
        projected = projected * torch.tensor(self.hidden_size ** -0.5, dtype=embeds.dtype)
        projected = self.per_layer_projection_norm(projected.view(-1, self.num_layers, self.per_layer_size))
        return (projected + rows) * torch.tensor(2 ** -0.5, dtype=embeds.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        home = self.per_layer_model_projection.weight.device  # where the parts outside the layers live
        embeds = (self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds).to(home)
        per_layer = self.per_layer_inputs(input_ids.to(home), embeds)
        target = _rms(embeds)
        streams = torch.stack([embeds] + [_rescaled(proj(embeds), target) for proj in self.altup_projections])
        for i, layer in enumerate(self.layers):
            streams = layer(positions, streams, per_layer[:, i])
        streams = streams.to(home)  # a device map may leave the last layers elsewhere
        target = _rms(streams[0])
        unembedded = [streams[0]] + [_rescaled(proj(streams[i + 1]), target)
                                     for i, proj in enumerate(self.altup_unembed_projections)]
        return self.norm(torch.stack(unembedded).mean(dim=0))


_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SHARED_KV_PARTS = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")


class Gemma3nForCausalLM(CausalLM):
    checkpoint_prefixes = [("model.language_model.", "model.")]

    def __init__(self, config: ModelConfig):
        if "tie_word_embeddings" not in config.raw:
            config.tie_word_embeddings = True  # Gemma3nTextConfig's default
        super().__init__(config)
        kept = config.raw.get("matformer_kept_layers")
        self.kept_layers = None if kept is None else {old: new for new, old in enumerate(kept)}

    def build_decoder(self, config: ModelConfig) -> nn.Module:
        return Gemma3nTextModel(config)

    def adapt_checkpoint_tensor(self, name: str, tensor):
        """Checkpoint tensors as this model takes them: the k/v projections and norms of KV-sharing layers
        dropped (Google's checkpoints carry them, unused); under a MatFormer slice (loader/matformer.py)
        skipped layers dropped, kept ones renumbered, the per-layer tables cut to the kept layers and each
        FFN to its first `intermediate_size` units."""
        match = _LAYER_TENSOR.match(name)
        if match is not None:
            index, rest = int(match.group(1)), match.group(2)
            if self.kept_layers is not None:
                if index not in self.kept_layers:
                    return None
                index = self.kept_layers[index]
                name = f"model.layers.{index}.{rest}"
            layer = self.model.layers[index]
            if layer.self_attn.shares_kv and rest.startswith(_SHARED_KV_PARTS):
                return None
            if self.kept_layers is not None and rest.startswith("mlp."):
                return name, self._cut_ffn(rest, _dense(tensor), self.model.settings.intermediate_sizes[index])
            return name, tensor
        if self.kept_layers is not None and name in ("model.embed_tokens_per_layer.weight",
                                                     "model.per_layer_model_projection.weight"):
            return name, self._kept_per_layer(name, _dense(tensor))
        return name, tensor

    @staticmethod
    def _cut_ffn(rest: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
        return tensor[:, :width] if rest.startswith("mlp.down_proj") else tensor[:width]

    def _kept_per_layer(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        kept = torch.tensor(sorted(self.kept_layers), dtype=torch.long)
        size = self.model.per_layer_size
        if name.endswith("embed_tokens_per_layer.weight"):  # [vocab, layers * size]
            return tensor.view(tensor.size(0), -1, size)[:, kept].reshape(tensor.size(0), -1)
        return tensor.view(-1, size, tensor.size(-1))[kept].reshape(-1, tensor.size(-1))  # [layers * size, hidden]


def _dense(tensor):
    """A GGUF block tensor dequantised (slicing cuts through its blocks); dense tensors as they are."""
    return tensor.dequantize() if isinstance(tensor, GGUFTensor) else tensor
