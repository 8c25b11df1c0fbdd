"""Patch embeddings: a convolution whose kernel equals its stride, kept in float32.

Vision towers cut an image into non-overlapping patches and project each one, which
PyTorch models write as `Conv2d`/`Conv3d(kernel_size=stride)`. On CPU, reduced-precision
convolutions are slow or unsupported (#1650), so the weight stays float32 whatever the
model dtype and the projection runs in float32 before casting to the model's dtype. With
kernel == stride the convolution is one matmul over flattened patches; the weight keeps
the checkpoint's conv shape so it loads as saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """`[num_patches, in_channels * prod(kernel)]` flattened patches -> `[num_patches, out_channels]`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...], bias: bool = False):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel, dtype=torch.float32),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_channels, dtype=torch.float32), requires_grad=False) \
            if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = _load_float32

    def forward(self, patches: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        weight = self.weight.view(self.out_channels, -1)
        return F.linear(patches.to(torch.float32), weight, self.bias).to(dtype)


def _load_float32(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    param.data.copy_(loaded.to(torch.float32))
