"""A single sequence's decode token through all pre-norm blocks in one native call.

models/llama.py's block (norm, fused q/k/v with optional bias and q/k norms, RoPE, paged
attention, o_proj, norm, gate/up, SiLU, down, two residual adds) run by
kernels/cpu/decode_step.c with the same kernels and roundings, so the result is the same bit for
bit; what goes is the Python and PyTorch glue between the ~170 kernel calls of a token
(a fifth of the step on the default model). It applies where every piece is one the
kernels run: packed weights in native layouts, RMSNorms in the activations' dtype, full
RoPE, a KV cache of that dtype or int8 on the paged road, one rank, and a step of one token
without LoRA; anything else takes the modules as usual.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from levante.layers.attention import Attention, AttentionMetadata
from levante.layers.linear import LinearBase
from levante.layers.lora import current_lora_batch
from levante.layers.norms import RMSNorm
from levante.layers.rotary import RotaryEmbedding
from levante.kernels import native

enabled = True  # False: always the modules (for comparisons)


@dataclass
class BlockParts:
    """The modules of one pre-norm block, as a model hands them over."""
    input_norm: RMSNorm
    qkv: LinearBase
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    rotary: RotaryEmbedding
    attn: Attention
    o: LinearBase
    post_norm: RMSNorm
    gate_up: LinearBase
    down: LinearBase


def _norm_fits(norm: RMSNorm | None, dtype: torch.dtype) -> bool:
    return norm is None or (not norm.unit_offset and norm.weight is not None and norm.weight.dtype == dtype
                            and norm.weight.is_contiguous() and norm.weight.device.type == "cpu")


def _linear(linear: LinearBase, dtype: torch.dtype) -> native.DecodeLinear | None:
    """The layer's weight for the kernels, or None where it is not one they read."""
    packed = linear.packed
    described = getattr(packed, "decode_linear", None)
    if described is None or linear.tp_size != 1:
        return None
    bias = linear.bias
    if bias is not None and not (bias.dtype == dtype and bias.is_contiguous() and bias.device.type == "cpu"):
        return None
    out = described()
    if out is not None and bias is not None:
        out.bias = bias.data_ptr()
    return out


class DecodeStep:
    """The native step over `blocks` (see the module's docstring); `build` says whether it applies."""

    def __init__(self, parts: list[BlockParts], blocks, dtype: torch.dtype):
        self.parts, self.blocks, self.dtype = parts, blocks, dtype
        first = parts[0]
        self.hidden_size = first.input_norm.weight.numel()
        self.heads, self.kv_heads, self.head_dim = first.attn.num_heads, first.attn.num_kv_heads, first.attn.head_dim
        self.intermediate = first.gate_up.packed.shape[0] // 2
        size = native.library().lv_decode_scratch(self.hidden_size, self.heads, self.kv_heads, self.head_dim,
                                                  self.intermediate)
        self.scratch = torch.empty(size, dtype=dtype)
        self.positions = 0  # rows of every block's cos/sin table the pointers cover

    @classmethod
    def build(cls, parts: list[BlockParts | None]) -> DecodeStep | None:
        """The step for these blocks, or None where some piece is not one the kernels run."""
        if not parts or any(p is None for p in parts) or not native.available():
            return None
        dtype = parts[0].input_norm.weight.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            return None
        blocks = (native.DecodeBlock * len(parts))()
        shape, offsets = None, []
        for part, block in zip(parts, blocks):
            attn, rotary = part.attn, part.rotary
            if not all(_norm_fits(n, dtype) for n in (part.input_norm, part.post_norm, part.q_norm, part.k_norm)):
                return None
            if (part.q_norm is None) != (part.k_norm is None):
                return None
            if (attn.kv_producer is not None or attn.k_cache is None or attn.k_cache.dtype not in (dtype, torch.int8)
                    or attn.k_cache.device.type != "cpu" or not attn.k_cache.is_contiguous()
                    or not attn.v_cache.is_contiguous()
                    or not native.paged_attention_supported(attn.k_cache.dtype, attn.head_dim)):
                return None
            offset = attn.key_offset  # an int8 cache's keys are stored less it (float32 for the kernel)
            if offset is not None:
                if offset.device.type != "cpu" or offset.shape != (attn.num_kv_heads, attn.head_dim):
                    return None
                offset = offset.float().contiguous()
                offsets.append(offset)
            if rotary.rotary_dim != attn.head_dim or rotary.mrope_axis is not None:
                return None
            linears = [_linear(m, dtype) for m in (part.qkv, part.o, part.gate_up, part.down)]
            if any(lin is None for lin in linears):
                return None
            block_shape = (part.input_norm.weight.numel(), attn.num_heads, attn.num_kv_heads, attn.head_dim,
                           part.gate_up.packed.shape[0])
            if attn.num_kv_heads * attn.head_dim > block_shape[0]:
                return None  # the step keeps the rotated keys of an int8 cache in a hidden-sized buffer
            if shape not in (None, block_shape):
                return None
            shape = block_shape
            block.qkv, block.o, block.gate_up, block.down = linears
            block.input_norm, block.post_norm = part.input_norm.weight.data_ptr(), part.post_norm.weight.data_ptr()
            block.eps = part.input_norm.eps
            if part.post_norm.eps != part.input_norm.eps:
                return None
            if part.q_norm is not None:
                block.q_norm, block.k_norm = part.q_norm.weight.data_ptr(), part.k_norm.weight.data_ptr()
                block.qk_eps = part.q_norm.eps
                if part.k_norm.eps != part.q_norm.eps:
                    return None
            block.k_cache, block.v_cache = attn.k_cache.data_ptr(), attn.v_cache.data_ptr()
            block.kv_int8 = int(attn.k_cache.dtype == torch.int8)
            block.key_offset = offset.data_ptr() if block.kv_int8 and offset is not None else None
            block.window, block.scale = attn.sliding_window or 0, attn.scale
        step = cls(parts, blocks, dtype)
        step.offsets = offsets  # the blocks point into them
        return step

    def takes(self, hidden: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> bool:
        """Whether this step is one it runs: one token of one sequence on the paged road, no LoRA."""
        return (hidden.shape[0] == 1 and hidden.dtype == self.dtype and hidden.device.type == "cpu"
                and hidden.is_contiguous() and positions.dim() == 1 and md.block_tables is not None
                and md.causal and md.key_limits is None and md.block_tables.shape[0] == 1
                and md.block_tables.dtype == torch.int32 and md.block_tables.is_contiguous()
                and md.slot_mapping.device.type == "cpu" and enabled and native.small_ops
                and current_lora_batch() is None)

    def _cover(self, position: int) -> None:
        """Point every block at a cos/sin table that holds `position` (the tables grow by doubling)."""
        tables = [p.rotary._cache(position + 1, torch.device("cpu")) for p in self.parts]
        for block, table in zip(self.blocks, tables):
            block.cos_sin = table.data_ptr()
        self.positions = min(t.shape[0] for t in tables)

    def __call__(self, hidden: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        position = md.max_position
        if position >= self.positions:
            self._cover(position)
        hidden = hidden.clone()
        table = md.block_tables
        rc = native.library().lv_decode_blocks(
            ctypes.addressof(self.blocks), len(self.blocks), hidden.data_ptr(), self.hidden_size, self.heads,
            self.kv_heads, self.head_dim, self.intermediate, int(self.dtype == torch.bfloat16), position,
            int(md.slot_mapping[0]), table.data_ptr(), table.shape[1], md.block_size, self.scratch.data_ptr(),
            native.threads())
        if rc:
            raise RuntimeError(f"lv_decode_blocks failed ({rc})")
        return hidden
