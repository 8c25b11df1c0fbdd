"""Rotary position embeddings (neox layout: rotate the two halves of each head).

M-RoPE (Qwen2-VL family): positions are `[3, tokens]` (temporal, height, width) and
each frequency takes its angle from one of the three axes. `mrope_section` (from the
rope parameters) says how many frequencies each axis owns: in order, t then h then w
(Qwen2-VL, Qwen2.5-VL), or interleaved t h w t h w ... with t filling the tail
(Qwen3-VL, `mrope_interleaved`). 1-D positions take the plain path.
"""
from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import nn

from levante.config import RopeConfig
from levante.errors import ModelLoadError
from levante.kernels import native


def _inv_freq(dim: int, rope: RopeConfig, max_position: int,
              context: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scale for one rope type (as in transformers).
    `context`: the longest sequence the engine will run (LongRoPE's choice of factors)."""
    wavelengths = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / wavelengths
    extra = rope.extra
    if rope.rope_type in ("default", "mrope"):  # "mrope": old Qwen2-VL configs, default frequencies
        return inv_freq, 1.0
    if rope.rope_type == "longrope":
        return _longrope(wavelengths, rope, context or max_position)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        low, high = extra.get("low_freq_factor", 1.0), extra.get("high_freq_factor", 4.0)
        old_len = extra.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope.rope_type == "yarn":
        old_len = extra.get("original_max_position_embeddings") or max_position / rope.factor
        beta_fast, beta_slow = extra.get("beta_fast", 32), extra.get("beta_slow", 1)

        def correction_dim(rotations):
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = inv_freq / rope.factor * (1 - extrapolation) + inv_freq * extrapolation
        scale = extra.get("attention_factor") or (0.1 * math.log(rope.factor) + 1.0)
        return inv, scale
    raise ModelLoadError(
        f"unsupported rope type {rope.rope_type!r} (supported: default, linear, llama3, yarn, longrope)")


def _longrope(wavelengths: torch.Tensor, rope: RopeConfig, context: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): each frequency stretched by its own factor, the long set when the
    context exceeds the pretraining length, else the short one, and cos/sin scaled to keep
    attention's entropy. The set is chosen once for the whole context, as vLLM and llama.cpp
    do: transformers switches when a sequence crosses the length, which would leave keys
    cached under the other set."""
    original = rope.extra["original_max_position_embeddings"]
    factors = rope.extra["long_factor"] if context > original else rope.extra["short_factor"]
    if len(factors) != len(wavelengths):
        raise ModelLoadError(f"longrope factors have {len(factors)} entries, the rotary dimension "
                             f"needs {len(wavelengths)}")
    scale = rope.extra.get("attention_factor")
    if scale is None:
        scale = math.sqrt(1 + math.log(rope.factor) / math.log(original)) if rope.factor > 1 else 1.0
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * wavelengths), scale


# Per thread, the cos/sin rows of the positions the last forward used: every layer of a step
# rotates the same positions, so the lookup is done once per step and rope variant.
_step_rows = threading.local()
# (settings, positions, device) -> the cos/sin table the layers holding it share; gone with them.
_tables: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class RotaryEmbedding(nn.Module):
    """Rotates the first `rotary_dim` entries of each head (all of them unless the rope
    parameters give a `partial_rotary_factor`, as Phi-4-mini's do); the rest pass through."""

    def __init__(self, head_dim: int, rope: RopeConfig, max_position: int, context: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * rope.extra.get("partial_rotary_factor", 1.0))
        inv_freq, self.attention_scale = _inv_freq(self.rotary_dim, rope, max_position, context)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.cos_sin: torch.Tensor | None = None  # [positions, head_dim], cos half then sin half
        section = rope.extra.get("mrope_section")
        self.register_buffer("mrope_axis", None if not section else
                             _mrope_axes(section, head_dim // 2, bool(rope.extra.get("mrope_interleaved"))),
                             persistent=False)
        # Layers with equal settings share one cos/sin lookup per step (see _rows).
        self._variant = (head_dim, self.attention_scale, tuple(inv_freq.tolist()),
                         None if self.mrope_axis is None else tuple(self.mrope_axis.tolist()))

    def _cache(self, needed: int, device) -> torch.Tensor:
        """The cos/sin table of at least `needed` positions on `device`: one table for all layers of
        equal settings (a model's 24-64 layers would otherwise each build and hold the same one)."""
        cache = self.cos_sin
        if cache is None or cache.size(0) < needed or cache.device != device:
            length = max(4096, 1 << (needed - 1).bit_length())
            key = (self._variant, length, str(device))
            cache = _tables.get(key)
            if cache is None:
                t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
                freqs = torch.outer(t, self.inv_freq)
                cache = (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scale).to(device=device)
                _tables[key] = cache
            self.cos_sin = cache
        return cache

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, max_position: int | None = None):
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim].

        `max_position` (known to the runner) saves a device sync on `positions.max()`.
        """
        rows = self._rows(positions, q.device, max_position)  # [tokens, rotary_dim]: cos half, sin half
        if k is None:  # a layer that reads another layer's keys (KV sharing) rotates its queries only
            return self._rotated(q, rows), None
        return self._rotated(q, rows), self._rotated(k, rows)

    def _rotated(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        cos, sin = rows.unsqueeze(1).chunk(2, dim=-1)
        if self.rotary_dim < self.head_dim:  # the first rotary_dim entries turn, the rest pass
            turned, passed = x.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
            return torch.cat([_rotate(turned, cos, sin), passed], dim=-1)
        if native.rope_fits(x):  # a decode step's few rows: one call
            return native.rope(x, rows)
        return _rotate(x, cos, sin)

    def _rows(self, positions: torch.Tensor, device, max_position: int | None):
        memo = _step_rows.__dict__
        if memo.get("positions") is not positions:  # a new step (the memo holds it, so `is` is safe)
            memo.clear()
            memo["positions"] = positions
        key = (self._variant, device)
        if key not in memo:
            needed = (max_position if max_position is not None else int(positions.max())) + 1
            cache = self._cache(needed, device)
            if positions.dim() == 2:  # M-RoPE: [3, tokens]; each frequency reads its own axis
                table = cache[positions]  # [3, tokens, head_dim]
                axis = self.mrope_axis.view(1, 1, -1).expand(1, table.size(1), -1)
                memo[key] = table.gather(0, axis)[0]
            else:
                memo[key] = cache[positions]
        return memo[key]


def _mrope_axes(section: list[int], half: int, interleaved: bool) -> torch.Tensor:
    """For each of the head_dim entries (cos half then sin half), which position axis (0 t, 1 h, 2 w)."""
    if sum(section) != half:
        raise ModelLoadError(f"mrope_section {section} does not add up to head_dim / 2 = {half}")
    if interleaved:  # as transformers' Qwen3-VL: t everywhere, then h at 1, 4, 7, ... and w at 2, 5, 8, ...
        axes = torch.zeros(half, dtype=torch.long)
        for axis in (1, 2):
            axes[axis:section[axis] * 3:3] = axis
    else:
        axes = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(section)])
    return torch.cat([axes, axes])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


rotate = _rotate  # for vision towers that compute their own angles (layers/vision.py)
