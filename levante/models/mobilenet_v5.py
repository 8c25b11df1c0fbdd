"""MobileNet-v5, Gemma 3n's vision tower (timm's `mobilenetv5_300m_enc`; transformers builds it through timm).

    pixels -> stem (3x3 stride-2 conv, RMS norm, GELU) -> 4 stages of blocks -> multi-scale fusion adapter
    (the last two stages' outputs, upsampled to the larger, concatenated, an inverted-residual FFN, pooled to
    `msfa_output_resolution`, RMS norm) -> [batch, 2048, side, side]

Blocks (MobileNet-v4's): edge residual ("er": a full 3x3 expansion conv, then a 1x1 projection), universal
inverted residual ("uir": optional depthwise convs at the start and in the middle around a 1x1 expansion
and a 1x1 projection), and mobile multi-query attention ("mqa": one key and one value head, optionally
computed from a strided depthwise conv, shared by all query heads). Norms are RMS norms over channels;
convolutions pad as TensorFlow's "same". `model_args` of the config may set `channel_multiplier` and
`msfa_output_resolution` (timm's keyword arguments). Parameter names are timm's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The stages of mobilenetv5_300m_enc: block type, r(epeats), k(ernel) / a (start kernel), s(tride),
# e(xpansion), h(eads), v (key/value stride), d (key/value dim), c(hannels).
ARCH_300M = [
    ["er_r1_k3_s2_e4_c128", "er_r1_k3_s1_e4_c128", "er_r1_k3_s1_e4_c128"],
    ["uir_r1_a3_k5_s2_e6_c256", "uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256",
     "uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256"],
    ["uir_r1_a5_k5_s2_e6_c640"] + ["uir_r1_a5_k0_s1_e4_c640"] * 7 + ["uir_r1_a0_k0_s1_e1_c640"]
    + ["mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640"] * 14,
    ["uir_r1_a5_k5_s2_e6_c1280"] + ["mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280"] * 19,
]
OUT_CHANNELS = 2048
EPS = 1e-6


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def parse_block(spec: str) -> dict:
    """'uir_r1_a3_k5_s2_e6_c256' -> {'type': 'uir', 'a': 3, 'k': 5, 's': 2, 'e': 6.0, 'c': 256, ...}."""
    kind, *options = spec.split("_")
    out = {"type": kind}
    for option in options:
        out[option[0]] = float(option[1:]) if option[0] == "e" else int(option[1:])
    return out


def same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Pad as TensorFlow's 'same': output = ceil(input / stride), the odd pixel at the end."""
    pads = []
    for size in (x.size(-1), x.size(-2)):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of [batch, channels, height, width], in float32."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(dim=1, keepdim=True) + EPS) * self.weight.float().view(1, -1, 1, 1)
        return y.to(x.dtype)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class Conv(nn.Module):
    """A conv with 'same' padding: `conv(x)` with the padding done first."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel, kernel),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_channels), requires_grad=False) if bias else None
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(same_padding(x, self.kernel, self.stride), self.weight, self.bias, self.stride,
                        groups=self.groups)


class ConvNorm(nn.Module):
    """conv -> RMS norm -> GELU (`act`), timm's ConvNormAct; the conv's parameters as `conv.weight`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True, bias: bool = False):
        super().__init__()
        self.conv = Conv(in_channels, out_channels, kernel, stride, groups, bias)
        self.bn = RMSNorm2d(out_channels)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return _gelu(x) if self.act else x


class LayerScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class EdgeResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, block: dict):
        super().__init__()
        mid = make_divisible(in_channels * block["e"])
        self.conv_exp = Conv(in_channels, mid, block["k"], block["s"])
        self.bn1 = RMSNorm2d(mid)
        self.conv_pwl = Conv(mid, out_channels, 1)
        self.bn2 = RMSNorm2d(out_channels)
        self.skip = in_channels == out_channels and block["s"] == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pwl(_gelu(self.bn1(self.conv_exp(x)))))
        return out + x if self.skip else out


class UniversalInvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, block: dict, layer_scale: bool = True,
                 skip: bool = True):
        super().__init__()
        start, mid_kernel, stride = block.get("a", 0), block.get("k", 0), block.get("s", 1)
        mid = make_divisible(in_channels * block["e"])
        self.dw_start = ConvNorm(in_channels, in_channels, start, 1 if mid_kernel else stride, in_channels,
                                 act=False) if start else None
        self.pw_exp = ConvNorm(in_channels, mid, 1)
        self.dw_mid = ConvNorm(mid, mid, mid_kernel, stride, mid) if mid_kernel else None
        self.pw_proj = ConvNorm(mid, out_channels, 1, act=False)
        self.layer_scale = LayerScale(out_channels) if layer_scale else None
        self.skip = skip and in_channels == out_channels and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.dw_start is None else self.dw_start(x)
        out = self.pw_exp(out)
        out = out if self.dw_mid is None else self.dw_mid(out)
        out = self.pw_proj(out)
        out = out if self.layer_scale is None else self.layer_scale(out)
        return out + x if self.skip else out


class _Projection(nn.Module):
    """Key or value: [strided depthwise conv -> RMS norm ->] 1x1 conv to one head."""

    def __init__(self, channels: int, dim: int, kernel: int, stride: int):
        super().__init__()
        if stride > 1:
            self.down_conv = Conv(channels, channels, kernel, stride, groups=channels)
            self.norm = RMSNorm2d(channels)
        else:
            self.down_conv = self.norm = None
        self.proj = Conv(channels, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_conv is not None:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class _Output(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = Conv(in_channels, out_channels, 1)


class MultiQueryAttention2d(nn.Module):
    def __init__(self, channels: int, block: dict):
        super().__init__()
        self.heads, self.dim = block["h"], block["d"]
        self.query = nn.Module()
        self.query.proj = Conv(channels, self.heads * self.dim, 1)
        self.key = _Projection(channels, self.dim, block["k"], block.get("v", 1))
        self.value = _Projection(channels, self.dim, block["k"], block.get("v", 1))
        self.output = _Output(self.heads * self.dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        q = self.query.proj(x).reshape(batch, self.heads, self.dim, -1).transpose(-1, -2)  # [B, heads, HW, d]
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, P, d]: one head for all queries
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d]
        out = out.transpose(1, 2).reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        return self.output.proj(out)


class MobileAttention(nn.Module):
    def __init__(self, channels: int, block: dict):
        super().__init__()
        self.norm = RMSNorm2d(channels)
        self.attn = MultiQueryAttention2d(channels, block)
        self.layer_scale = LayerScale(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale(self.attn(self.norm(x)))


class MultiScaleFusionAdapter(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.ffn = UniversalInvertedResidual(in_channels, out_channels, {"e": 2.0}, layer_scale=False, skip=False)
        self.norm = RMSNorm2d(out_channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]  # the first is the largest
        x = torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest")
                       for f in features], dim=1)
        x = self.ffn(x)
        side = self.resolution
        if tuple(size) != (side, side):
            if size[0] % side or size[1] % side:
                x = F.interpolate(x, size=(side, side), mode="bilinear")
            else:
                kernel = (size[0] // side, size[1] // side)
                x = F.avg_pool2d(x, kernel_size=kernel, stride=kernel)
        return self.norm(x)


class MobileNetV5Encoder(nn.Module):
    def __init__(self, model_args: dict | None = None):
        super().__init__()
        args = dict(model_args or {})
        multiplier = float(args.get("channel_multiplier", 1.0))
        resolution = int(args.get("msfa_output_resolution", 16))
        stem = 64 if multiplier < 1.0 else make_divisible(64 * multiplier)
        self.conv_stem = ConvNorm(3, stem, 3, 2, bias=True)
        channels, stage_channels, stages = stem, [], []
        for stage in ARCH_300M:
            blocks = []
            for spec in stage:
                block = parse_block(spec)
                out = make_divisible(block["c"] * multiplier)
                if block["type"] == "er":
                    blocks.append(EdgeResidual(channels, out, block))
                elif block["type"] == "uir":
                    blocks.append(UniversalInvertedResidual(channels, out, block))
                else:
                    blocks.append(MobileAttention(channels, block))
                channels = out
            stages.append(nn.Sequential(*blocks))
            stage_channels.append(channels)
        self.blocks = nn.ModuleList(stages)
        self.msfa = MultiScaleFusionAdapter(sum(stage_channels[-2:]), OUT_CHANNELS, resolution)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] -> [batch, 2048, side, side]: the last two stages fused."""
        x = self.conv_stem(pixels)
        features = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i >= len(self.blocks) - 2:
                features.append(x)
        return self.msfa(features)
