"""Qwen2.5-VL: a ViT (window attention + a few full-attention blocks, 2-D RoPE, patch
merger) whose output rows replace the `<|image_pad|>` tokens of a Qwen2 decoder with
M-RoPE positions.

The engine calls `encode_images` for images it has not cached, scatters the rows into
`embed_input_ids(...)` and runs `forward(..., inputs_embeds=...)`; see multimodal/inputs.py.
Image preprocessing (resize, patchify, M-RoPE positions) lives in multimodal/qwen_vl.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig
from levante.errors import ModelLoadError
from levante.layers.conv import PatchEmbed
from levante.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from levante.layers.norms import RMSNorm
from levante.layers.rotary import rotate
from levante.layers.vision import rope_2d, segment_attention
from levante.models.llama import CausalLM, DecoderModel

if TYPE_CHECKING:
    from levante.multimodal.inputs import ImageInput


def vision_positions(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """(row, column) of each patch, [t*h*w, 2], in the processor's merge-block order."""
    t, h, w = grid
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    pos = torch.stack([rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)], dim=-1)
    return pos.repeat(t, 1)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = ReplicatedLinear(dim, 3 * dim, bias=True)
        self.proj = ReplicatedLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos_sin, cu_seqlens: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.size(0), 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = cos_sin
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return self.proj(segment_attention(q, k, v, cu_seqlens, self.head_dim ** -0.5))


VISION_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                      "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
                      "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}  # a Qwen-VL tower's hidden_act


def vision_activation(name: str):
    """The tower's activation (Qwen2.5-VL's and Qwen3-VL's alike), or a load error naming it."""
    if name not in VISION_ACTIVATIONS:
        raise ModelLoadError(f"unsupported vision activation {name!r}")
    return VISION_ACTIVATIONS[name]


class VisionGatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(dim, [hidden, hidden], bias=True)
        self.down_proj = RowParallelLinear(hidden, dim, bias=True)
        self.act = vision_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class VisionBlock(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        dim = vc["hidden_size"]
        self.norm1, self.norm2 = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
        self.attn = VisionAttention(dim, vc["num_heads"])
        self.mlp = VisionGatedMLP(dim, vc["intermediate_size"], vc.get("hidden_act", "silu"))

    def forward(self, x: torch.Tensor, cos_sin, cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each merge x merge block of patches concatenated and projected to the decoder width."""

    def __init__(self, out_dim: int, dim: int, merge: int):
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = RMSNorm(dim, 1e-6)
        self.mlp = nn.Sequential(ReplicatedLinear(self.hidden, self.hidden, bias=True), nn.GELU(),
                                 ReplicatedLinear(self.hidden, out_dim, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, vc: dict, out_dim: int):
        super().__init__()
        self.merge = vc.get("spatial_merge_size", 2)
        self.patch_size = vc.get("patch_size", 14)
        self.window_size = vc.get("window_size", 112)
        self.full_attention_blocks = set(vc.get("fullatt_block_indexes", []))
        self.head_dim = vc["hidden_size"] // vc["num_heads"]
        self.theta = float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        kernel = (vc.get("temporal_patch_size", 2), self.patch_size, self.patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = PatchEmbed(vc.get("in_channels", 3), vc["hidden_size"], kernel)
        self.blocks = nn.ModuleList(VisionBlock(vc) for _ in range(vc["depth"]))
        self.merger = PatchMerger(out_dim, vc["hidden_size"], self.merge)

    def _windows(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """Merged-unit order grouped by window, and the windows' cumulative patch counts."""
        side = self.window_size // self.merge // self.patch_size
        unit = self.merge * self.merge
        order, cu, offset = [], [0], 0
        for t, h, w in grids:
            gh, gw = h // self.merge, w // self.merge
            index = torch.arange(t * gh * gw).view(t, gh, gw)
            pad_h, pad_w = side - gh % side, side - gw % side
            padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
            nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
            padded = padded.view(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, side * side)
            for window in padded.reshape(-1, side * side):
                kept = window[window >= 0]
                if kept.numel():
                    order.append(kept + offset)
                    cu.append(cu[-1] + kept.numel() * unit)
            offset += t * gh * gw
        return torch.cat(order), cu

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]], dtype: torch.dtype) -> torch.Tensor:
        unit = self.merge * self.merge
        x = self.patch_embed.proj(patches, dtype)
        positions = torch.cat([vision_positions(g, self.merge) for g in grids]).to(x.device)
        cos, sin = rope_2d(positions, self.head_dim, self.theta)
        order, cu_windows = self._windows(grids)
        order = order.to(x.device)

        def permute(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, unit, *t.shape[1:])[order].flatten(0, 1)

        x, cos_sin = permute(x), (permute(cos), permute(sin))
        cu_full = [0]
        for t, h, w in grids:
            cu_full.extend(cu_full[-1] + h * w * (i + 1) for i in range(t))
        for i, block in enumerate(self.blocks):
            x = block(x, cos_sin, cu_full if i in self.full_attention_blocks else cu_windows)
        merged = self.merger(x)
        return merged[torch.argsort(order)]


class VLDecoderModel(DecoderModel):
    """The text decoder, fed embeddings the runner built (image rows scattered in)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


class QwenVLBase(CausalLM):
    """What both Qwen-VL families share: M-RoPE decoder, `encode_images` over pixel patches and grids."""

    uses_mrope = True  # the runner passes positions [3, tokens]

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.vision_config = config.raw.get("vision_config") or {}
        try:
            self.visual = self.build_vision(self.vision_config, config.hidden_size)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json vision_config is missing or has a bad value for {e}") from None

    def build_vision(self, vc: dict, out_dim: int) -> nn.Module:
        raise NotImplementedError

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One batched tower pass over all `images`; rows per image in placeholder order."""
        patches = torch.cat([img.tensors["pixel_values"] for img in images])
        grids = [tuple(int(v) for v in img.tensors["image_grid_thw"]) for img in images]
        device = self.model.embed_tokens.weight.device
        rows = self.visual(patches.to(device), grids, self.model.embed_tokens.dtype)
        return list(rows.split([img.length for img in images]))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)


class Qwen2_5_VLForConditionalGeneration(QwenVLBase):
    attention_options = {"qkv_bias": True}

    def build_decoder(self, config: ModelConfig) -> nn.Module:
        return VLDecoderModel(config, **self.attention_options)

    def build_vision(self, vc: dict, out_dim: int) -> nn.Module:
        return Qwen2_5_VisionTransformer(vc, vc.get("out_hidden_size", out_dim))
