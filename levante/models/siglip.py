"""SigLIP vision tower: patch convolution + learned position embeddings, pre-norm encoder
layers (full bidirectional attention, GELU MLP), post-layernorm. No pooling head: the
VLM's projector takes the patch rows.

The patch convolution runs in float32 whatever the model's dtype (its weights stay float32),
then the rows are cast to the model's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.distributed import tp_size
from levante.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, patch = int(config["hidden_size"]), int(config["patch_size"])
        channels = int(config.get("num_channels", 3))
        self.patch_size = patch
        self.patch_embedding = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch, padding="valid",
                                         dtype=torch.float32)
        self.patch_embedding.requires_grad_(False)
        self.num_patches = (int(config["image_size"]) // patch) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, hidden)
        self.position_embedding.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, channels, size, size] -> [images, patches, hidden] in the model's dtype."""
        dtype = self.position_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(torch.float32))  # [images, hidden, grid, grid]
        patches = patches.flatten(2).transpose(1, 2).to(dtype)
        if patches.size(1) != self.num_patches:
            raise ValueError(f"the tower takes {self.num_patches} patches per image, got {patches.size(1)}")
        return patches + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        self.head_dim = hidden // heads
        self.num_heads = heads // tp_size()
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias=True)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv_proj(hidden).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
        act = config.get("hidden_act", "gelu_pytorch_tanh")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported vision activation {act!r}")
        self.act = _ACTIVATIONS[act]
        self.fc1 = ColumnParallelLinear(hidden, inner, bias=True)
        self.fc2 = RowParallelLinear(inner, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = int(config["hidden_size"]), float(config.get("layer_norm_eps", 1e-6))
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = SiglipMLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class SiglipEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(int(config["num_hidden_layers"])))


class SiglipVisionModel(nn.Module):
    """Parameter names follow transformers' SiglipVisionModel (without its `vision_model.` level)."""

    def __init__(self, config: dict):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(int(config["hidden_size"]), eps=float(config.get("layer_norm_eps", 1e-6)))
        for module in (self.post_layernorm, *self.encoder.modules()):
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, size, size] -> last hidden state [images, patches, hidden]."""
        hidden = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            hidden = layer(hidden)
        return self.post_layernorm(hidden)
