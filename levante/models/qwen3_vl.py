"""Qwen3-VL: a ViT (learned position table resampled to each image, 2-D RoPE, LayerNorm
blocks, full attention per image) feeding a Qwen3 decoder with interleaved M-RoPE.

DeepStack: features taken after a few early vision blocks (`deepstack_visual_indexes`),
each through its own merger, are added to the image tokens' hidden states after the
first decoder layers. `encode_images` returns them beside the main rows, as one row of
width hidden * (1 + len(deepstack)) per image token, so the engine caches and slices
them like any encoder rows; `merge_image_rows` splits them back.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.layers.conv import PatchEmbed
from levante.layers.linear import ReplicatedLinear
from levante.layers.vision import rope_2d
from levante.models.qwen2_5_vl import (QwenVLBase, VisionAttention, VLDecoderModel, vision_activation,
                                       vision_positions)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.linear_fc1 = ReplicatedLinear(dim, hidden, bias=True)
        self.linear_fc2 = ReplicatedLinear(hidden, dim, bias=True)
        self.act = vision_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        dim = vc["hidden_size"]
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, vc["num_heads"])
        self.mlp = VisionMLP(dim, vc["intermediate_size"], vc.get("hidden_act", "gelu_pytorch_tanh"))

    def forward(self, x: torch.Tensor, cos_sin, cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm (before, or for DeepStack after, concatenating each merge x merge block), MLP."""

    def __init__(self, dim: int, out_dim: int, merge: int, norm_after_shuffle: bool):
        super().__init__()
        self.hidden = dim * merge * merge
        self.norm_after_shuffle = norm_after_shuffle
        self.norm = nn.LayerNorm(self.hidden if norm_after_shuffle else dim, eps=1e-6)
        self.linear_fc1 = ReplicatedLinear(self.hidden, self.hidden, bias=True)
        self.linear_fc2 = ReplicatedLinear(self.hidden, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.hidden)) if self.norm_after_shuffle else self.norm(x).view(-1, self.hidden)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3VisionTransformer(nn.Module):
    def __init__(self, vc: dict, out_dim: int):
        super().__init__()
        dim = vc["hidden_size"]
        self.merge = vc.get("spatial_merge_size", 2)
        self.head_dim = dim // vc["num_heads"]
        self.theta = float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        patch = vc.get("patch_size", 16)
        kernel = (vc.get("temporal_patch_size", 2), patch, patch)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = PatchEmbed(vc.get("in_channels", 3), dim, kernel, bias=True)
        self.pos_embed = nn.Embedding(vc["num_position_embeddings"], dim)
        self.side = int(vc["num_position_embeddings"] ** 0.5)
        self.blocks = nn.ModuleList(VisionBlock(vc) for _ in range(vc["depth"]))
        self.merger = PatchMerger(dim, out_dim, self.merge, norm_after_shuffle=False)
        self.deepstack_indexes = list(vc.get("deepstack_visual_indexes", []))
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(dim, out_dim, self.merge, norm_after_shuffle=True) for _ in self.deepstack_indexes)

    def _position_table(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The learned square table resampled to (h, w) bilinearly (align_corners), in merge-block order."""
        t, h, w = grid
        weight = self.pos_embed.weight

        def axis(n: int):
            src = torch.arange(n, dtype=torch.float32, device=weight.device) * (self.side - 1) / max(n - 1, 1)
            low = src.floor()
            frac = src - low
            low = low.long().clamp(0, self.side - 1)
            return low, (low + 1).clamp(max=self.side - 1), 1 - frac, frac

        r0, r1, wr0, wr1 = axis(h)
        c0, c1, wc0, wc1 = axis(w)
        table = weight.float()

        def at(rows, cols):
            return table[(rows[:, None] * self.side + cols[None, :]).reshape(-1)].view(h, w, -1)

        grid_embed = (at(r0, c0) * (wr0[:, None] * wc0[None, :])[..., None]
                      + at(r0, c1) * (wr0[:, None] * wc1[None, :])[..., None]
                      + at(r1, c0) * (wr1[:, None] * wc0[None, :])[..., None]
                      + at(r1, c1) * (wr1[:, None] * wc1[None, :])[..., None])
        m = self.merge
        blocks = grid_embed.view(h // m, m, w // m, m, -1).transpose(1, 2).reshape(h * w, -1)
        return blocks.repeat(t, 1).to(weight.dtype)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]], dtype: torch.dtype) -> torch.Tensor:
        x = self.patch_embed.proj(patches, dtype)
        x = x + torch.cat([self._position_table(g) for g in grids]).to(x.dtype)
        positions = torch.cat([vision_positions(g, self.merge) for g in grids]).to(x.device)
        cos_sin = rope_2d(positions, self.head_dim, self.theta)
        cu = [0]
        for t, h, w in grids:
            cu.extend(cu[-1] + h * w * (i + 1) for i in range(t))
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos_sin, cu)
            if i in self.deepstack_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_indexes.index(i)](x))
        return torch.cat([self.merger(x), *deepstack], dim=-1)


class DeepStackDecoderModel(VLDecoderModel):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
                deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for i, layer in enumerate(self.layers):
            hidden = layer(positions, hidden)
            if deepstack is not None and i < len(deepstack[1]):
                index, features = deepstack[0], deepstack[1][i]
                hidden = hidden.index_add(0, index, features.to(hidden.dtype))
        return self.norm(hidden)


class Qwen3VLForConditionalGeneration(QwenVLBase):
    attention_options = {"qk_norm": True}

    def __init__(self, config: ModelConfig):
        # transformers' Qwen3-VL always interleaves the M-RoPE axes, whatever the config says.
        config = dataclasses.replace(config, rope={
            kind: dataclasses.replace(rope, extra={**rope.extra, "mrope_interleaved": True})
            for kind, rope in config.rope.items()})
        super().__init__(config)

    def build_decoder(self, config: ModelConfig) -> nn.Module:
        return DeepStackDecoderModel(config, **self.attention_options)

    def build_vision(self, vc: dict, out_dim: int) -> nn.Module:
        return Qwen3VisionTransformer(vc, vc.get("out_hidden_size", out_dim))

    def merge_image_rows(self, embeds: torch.Tensor, token_index: torch.Tensor, rows: torch.Tensor):
        """Main rows replace the placeholders' embeddings; the DeepStack parts go to `forward`."""
        parts = rows.to(embeds.dtype).split(embeds.size(-1), dim=-1)
        return embeds.index_copy(0, token_index, parts[0]), {"deepstack": (token_index, list(parts[1:]))}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
                deepstack=None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds, deepstack)
