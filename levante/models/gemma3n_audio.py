"""Gemma 3n's audio encoder (USM-style conformer), as transformers' Gemma3nAudioEncoder.

    log-mel [frames, bins] -> two stride-2 convolutions (each: pad, conv, cumulative group norm, ReLU)
      -> linear to the width -> N conformer blocks -> every `conf_reduction_factor`-th row

A conformer block: half-step feed-forward, chunked local self-attention (relative positions, logit
soft-cap), a causal depthwise light convolution, another half-step feed-forward, a norm. Activations
are clipped to +-gradient_clipping throughout (1e10: a no-op in practice, kept to match).
Chunked attention: queries in chunks of `conf_attention_chunk_size` see keys from
`conf_attention_context_left - 1` steps back to `conf_attention_context_right` ahead.
Masks follow transformers: `mask` True marks padding frames.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from levante.layers.norms import RMSNorm


class CumulativeGroupNorm(nn.Module):
    """Group norm over (frequency, channel) whose statistics accumulate over time: frame t is normalised by
    the mean and variance of frames 0..t. Input [batch, time, freq, channels]."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.float()
        count = torch.cumsum(torch.full((x.size(1),), x.size(2) * x.size(3), dtype=torch.float32,
                                        device=x.device), 0).view(1, -1, 1, 1)
        mean = torch.cumsum(x.sum(dim=(2, 3), keepdim=True), dim=1) / count
        variance = torch.cumsum((x - mean).pow(2).sum(dim=(2, 3), keepdim=True), dim=1) / count
        return ((x - mean) * torch.rsqrt(variance + self.eps) * self.weight.float()).to(dtype)


class SubsampleConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], stride: list[int], eps: float):
        super().__init__()
        # Time is padded at the end only (kernel - 1), frequency by one on each side.
        self.padding = (1, 1, 0, kernel[0] - 1)
        self.conv = nn.Conv2d(in_channels, out_channels, tuple(kernel), tuple(stride), bias=False)
        self.norm = CumulativeGroupNorm(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, channels, time, freq] -> the same, subsampled."""
        x = self.conv(F.pad(x, self.padding).to(self.conv.weight.dtype))
        return F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class SubsampleConvProjection(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        channels, kernels, strides = cfg["sscp_conv_channel_size"], cfg["sscp_conv_kernel_size"], \
            cfg["sscp_conv_stride_size"]
        eps = cfg["sscp_conv_group_norm_eps"]
        self.conv_0 = SubsampleConvBlock(1, channels[0], kernels[0], strides[0], eps)
        self.conv_1 = SubsampleConvBlock(channels[0], channels[1], kernels[1], strides[1], eps)
        freq = cfg["input_feat_size"]
        for kernel, stride in zip(kernels, strides):
            freq = (freq + 2 - kernel[1]) // stride[1] + 1
        self.input_proj_linear = nn.Linear(channels[1] * freq, cfg["hidden_size"], bias=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[batch, frames, bins] -> [batch, frames / 4, hidden]."""
        x = self.conv_1(self.conv_0(mel.unsqueeze(1)))
        batch, _, time, _ = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(batch, time, -1))


class RelativePositionEmbedding(nn.Module):
    """Transformer-XL style: content scores plus scores against sinusoids of the relative distance."""

    def __init__(self, hidden: int, heads: int, max_backward: int, max_forward: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.max_backward, self.max_forward = max_backward, max_forward
        self.pos_proj = nn.Linear(hidden, hidden, bias=False)
        timescales = hidden // 2
        increment = math.log(1.0e4) / max(timescales - 1, 1)
        self.register_buffer("inv_timescales", torch.exp(torch.arange(timescales) * -increment).float(),
                             persistent=False)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """queries [B, U, W, N, H], keys [B, U, C, N, H] -> logits [B, N, U, W, C]."""
        batch, blocks, width, heads, dim = queries.shape
        context = keys.size(2)
        distance = torch.arange(self.max_backward, -self.max_forward - 1, -1, device=queries.device).float()
        angles = distance.unsqueeze(-1) * self.inv_timescales.to(queries.device)
        timing = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(queries.dtype)
        span = distance.numel()
        sin_emb = self.pos_proj(timing).view(span, heads, dim).permute(1, 2, 0)  # [N, H, F]
        q = queries.permute(0, 3, 1, 2, 4)  # [B, N, U, W, H]
        content = torch.matmul(q, keys.permute(0, 3, 1, 4, 2))  # [B, N, U, W, C]
        position = torch.matmul(q.reshape(batch, heads, blocks * width, dim), sin_emb)
        position = position.view(batch, heads, blocks, width, span)
        # relative shift: row w of distances [L .. -R] becomes keys [w - L .. w + R] of the context
        position = F.pad(position, (0, context + 1 - span)).reshape(batch, heads, blocks, width * (context + 1))
        position = position[..., : width * context].reshape(batch, heads, blocks, width, context)
        return content + position


class AudioAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, heads = cfg["hidden_size"], cfg["conf_num_attention_heads"]
        self.heads, self.head_dim = heads, hidden // heads
        self.chunk = cfg["conf_attention_chunk_size"]
        self.max_future = cfg["conf_attention_context_right"]
        self.max_past = max(0, cfg["conf_attention_context_left"] - 1)
        self.context = self.chunk + self.max_past + self.max_future
        self.softcap = float(cfg["conf_attention_logit_cap"])
        self.relative_position_embedding = RelativePositionEmbedding(hidden, heads, self.max_past, self.max_future)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim), requires_grad=False)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.q_scale = self.head_dim ** -0.5 / F.softplus(torch.tensor(0.0)).item()
        chunk_rows = torch.arange(self.chunk).unsqueeze(1)
        context_cols = torch.arange(self.context).unsqueeze(0)  # row w sees context c in [w, w + past + future]
        self.register_buffer("local_mask", (context_cols >= chunk_rows)
                             & (context_cols <= chunk_rows + self.max_past + self.max_future), persistent=False)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [B, U, chunk, ...], zero-padded at the end."""
        blocks = -(-x.size(1) // self.chunk)
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, blocks * self.chunk - x.size(1)))
        return x.reshape(x.size(0), blocks, self.chunk, *x.shape[2:])

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [B, U, context, ...]: each chunk with `max_past` steps before and `max_future` after."""
        pad = (0, 0) * (x.dim() - 2) + (self.max_past, self.max_future + self.chunk - 1)
        x = F.pad(x, pad).unfold(1, self.context, self.chunk)  # [B, U, ..., context]
        return torch.movedim(x, -1, 2).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden], mask [B, T] (True: padding) -> [B, T, hidden]."""
        batch, time, _ = x.shape
        shape = (batch, time, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape) * (self.q_scale * F.softplus(self.per_dim_scale))
        k, v = self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        logits = self.relative_position_embedding(self._blocks(q), self._context(k))  # [B, N, U, W, C]
        logits = torch.tanh(logits / self.softcap) * self.softcap
        valid = self._context(~mask).unsqueeze(1).unsqueeze(-2) & self.local_mask  # [B, 1, U, W, C]
        logits = torch.where(valid, logits, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        values = self._context(v)  # [B, U, C, N, H]
        out = torch.einsum("bnuwc,bucnh->buwnh", probs, values)
        return out.reshape(batch, -1, self.heads * self.head_dim)[:, :time]


def _clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    return torch.clamp(x, -limit, limit)


class ConformerAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.clip = cfg["gradient_clipping"]
        self.pre_attn_norm = RMSNorm(hidden)
        self.attn = AudioAttention(cfg)
        self.post = nn.Linear(hidden, hidden, bias=False)
        self.post_norm = RMSNorm(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.pre_attn_norm(_clip(x, self.clip)), mask)
        return x + self.post_norm(_clip(self.post(out), self.clip))


class ConformerFeedForward(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.clip, self.residual_weight = cfg["gradient_clipping"], cfg["conf_residual_weight"]
        self.pre_layer_norm = RMSNorm(hidden)
        self.ffw_layer_1 = nn.Linear(hidden, hidden * 4, bias=False)
        self.ffw_layer_2 = nn.Linear(hidden * 4, hidden, bias=False)
        self.post_layer_norm = RMSNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(_clip(x, self.clip)))))
        return x + self.post_layer_norm(_clip(out, self.clip)) * self.residual_weight


class ConformerLightConv(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, eps, kernel = cfg["hidden_size"], cfg["rms_norm_eps"], cfg["conf_conv_kernel_size"]
        self.clip = cfg["gradient_clipping"]
        self.pre_layer_norm = RMSNorm(hidden, eps)
        self.linear_start = nn.Linear(hidden, hidden * 2, bias=False)
        self.depthwise_conv1d = nn.Conv1d(hidden, hidden, kernel, groups=hidden, bias=False)
        self.conv_norm = RMSNorm(hidden, eps)
        self.linear_end = nn.Linear(hidden, hidden, bias=False)
        self.causal_padding = kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        out = self.depthwise_conv1d(F.pad(out.transpose(1, 2), (self.causal_padding, 0))).transpose(1, 2)
        return x + self.linear_end(F.silu(self.conv_norm(_clip(out, self.clip))))


class ConformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.clip = cfg["gradient_clipping"]
        self.ffw_layer_start = ConformerFeedForward(cfg)
        self.attention = ConformerAttention(cfg)
        self.lconv1d = ConformerLightConv(cfg)
        self.ffw_layer_end = ConformerFeedForward(cfg)
        self.norm = RMSNorm(cfg["hidden_size"])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.ffw_layer_start(x), mask)
        x = self.lconv1d(x * (~mask).unsqueeze(-1).to(x.dtype))
        return self.norm(_clip(self.ffw_layer_end(x), self.clip))


# transformers' Gemma3nAudioConfig defaults.
AUDIO_DEFAULTS = {
    "input_feat_size": 128, "hidden_size": 1536, "rms_norm_eps": 1e-6, "gradient_clipping": 1e10,
    "conf_attention_chunk_size": 12, "conf_attention_context_left": 13, "conf_attention_context_right": 0,
    "conf_attention_logit_cap": 50.0, "conf_num_attention_heads": 8, "conf_num_hidden_layers": 12,
    "conf_conv_kernel_size": 5, "conf_reduction_factor": 4, "conf_residual_weight": 0.5,
    "sscp_conv_channel_size": [128, 32], "sscp_conv_group_norm_eps": 1e-3,
    "sscp_conv_kernel_size": [[3, 3], [3, 3]], "sscp_conv_stride_size": [[2, 2], [2, 2]],
    "vocab_size": 128, "vocab_offset": 262272,
}


class AudioEncoder(nn.Module):
    def __init__(self, audio_config: dict):
        super().__init__()
        cfg = {**AUDIO_DEFAULTS, **{k: v for k, v in audio_config.items() if v is not None}}
        self.subsample_conv_projection = SubsampleConvProjection(cfg)
        self.conformer = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg["conf_num_hidden_layers"]))
        self.reduction = cfg["conf_reduction_factor"]
        self.time_stride = math.prod(stride[0] for stride in cfg["sscp_conv_stride_size"])

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, frames, bins], mask [B, frames] (True: padding) -> (rows [B, T, hidden], their mask)."""
        x = self.subsample_conv_projection(mel)
        index = (torch.arange(x.size(1), device=mask.device) * self.time_stride).clamp(max=mask.size(1) - 1)
        mask = mask[:, index]
        for block in self.conformer:
            x = block(x, mask)
        x, mask = x[:, ::self.reduction], mask[:, ::self.reduction]
        return x.masked_fill(mask.unsqueeze(-1), 0.0), mask
