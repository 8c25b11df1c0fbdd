"""Dequantisation of GGUF block formats in PyTorch.

A quantised GGUF row is a run of fixed-size blocks; each block holds ``block_size``
values as packed integers plus one or more float16 scales. The formats follow
llama.cpp's ``ggml-quants.c``; the arithmetic is done in the same order as
``gguf.quants`` (scale first, then ``scale * q - min``) so that results match the
reference bit for bit, only vectorised in torch and done a chunk of blocks at a time
to stay in cache.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from levante.errors import ModelLoadError

# Values dequantised per step: small enough to keep intermediates in cache.
_CHUNK_VALUES = 1 << 20


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 stored at byte ``offset`` of every block, as float32 of shape (n, 1)."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _unpack(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Split each byte into ``8 // bits`` fields, llama.cpp's way.

    Bytes are taken ``group`` at a time; field j of a group's bytes gives ``group``
    consecutive values, placed after those of field j - 1.
    """
    n = packed.shape[0]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8).view(1, 1, -1, 1)
    fields = packed.reshape(n, -1, 1, group) >> shifts
    return (fields & ((1 << bits) - 1)).reshape(n, -1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 2:], 4, 16).float() - 8
    return _half(blocks, 0) * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 4:], 4, 16).float()
    return _half(blocks, 0) * q + _half(blocks, 2)


def _five_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 quants: low nibbles from ``qs``, fifth bit i from bit i of ``qh``."""
    return (_unpack(qs, 4, 16) | (_unpack(qh, 1, 1) << 4)).float()


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _five_bits(blocks[:, 2:6], blocks[:, 6:]) - 16
    return _half(blocks, 0) * q


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _five_bits(blocks[:, 4:8], blocks[:, 8:])
    return _half(blocks, 0) * q + _half(blocks, 2)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _half(blocks, 0) * blocks[:, 2:].view(torch.int8).float()


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    scale = (_half(blocks, 80) * (scales & 0xF).float()).view(n, 16, 1)
    minimum = (_half(blocks, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = _unpack(blocks[:, 16:80], 2, 32).float().view(n, 16, 16)
    return (scale * q - minimum).view(n, 256)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low, high = _unpack(packed[:, :8], 4, 8), _unpack(packed[:, 8:], 2, 4)
    scale = (low | (high << 4)).float() - 32
    scale = (_half(blocks, 108) * scale).view(n, 16, 1)
    # A cleared high bit means "subtract 4" (llama.cpp stores the bit inverted).
    missing_high = _unpack(blocks[:, :32], 1, 32) ^ 1
    q = _unpack(blocks[:, 32:96], 2, 32).float() - (missing_high << 2).float()
    return (scale * q.view(n, 16, 16)).view(n, 256)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K block's 12 packed bytes."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: value = d * scale * q - dmin * min, over eight groups of 32."""
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    scale = (_half(blocks, 0) * scales).view(n, 8, 1)
    minimum = (_half(blocks, 2) * mins).view(n, 8, 1)
    return (scale * q.float().view(n, 8, 32) - minimum).view(n, 256)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_affine(blocks, _unpack(blocks[:, 16:], 4, 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 48:], 4, 32) | (_unpack(blocks[:, 16:48], 1, 32) << 4)
    return _k_affine(blocks, q)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].view(torch.int8).float()
    scale = (_half(blocks, 208) * scales).view(n, 16, 1)
    q = _unpack(blocks[:, :128], 4, 64) | (_unpack(blocks[:, 128:192], 2, 32) << 4)
    return (scale * (q.float() - 32).view(n, 16, 16)).view(n, 256)


_BLOCK_DEQUANTIZERS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
_FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}

SUPPORTED_TYPES: frozenset[T] = frozenset(_FLOAT_TYPES) | frozenset(_BLOCK_DEQUANTIZERS)


def as_bytes(raw: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A flat uint8 view of ``raw``, sharing its memory."""
    if isinstance(raw, torch.Tensor):
        return raw.contiguous().reshape(-1).view(torch.uint8)
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # A read-only memmap is fine: nothing here writes to the input.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat)


def byte_count(qtype: T, shape: tuple[int, ...]) -> int:
    """How many bytes a tensor of ``shape`` takes when stored as ``qtype``."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def dequantize(raw: torch.Tensor | np.ndarray, qtype: T | int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 values of the GGUF tensor stored in ``raw`` (its bytes) as ``qtype``.

    ``shape`` is the row-major logical shape (GGUF's ``ne`` reversed).
    """
    qtype = T(qtype)
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ModelLoadError(f"GGUF tensor type {qtype.name} is not supported (supported: {supported})")
    shape = tuple(int(d) for d in shape)
    data = as_bytes(raw)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block_size or data.numel() != byte_count(qtype, shape):
        raise ModelLoadError(
            f"GGUF tensor of type {qtype.name} and shape {shape} cannot be stored in {data.numel()} bytes"
        )
    if qtype in _FLOAT_TYPES:
        return data.view(_FLOAT_TYPES[qtype]).float().reshape(shape)
    blocks = data.view(-1, type_size)
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    step = max(1, _CHUNK_VALUES // block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = _BLOCK_DEQUANTIZERS[qtype](blocks[start : start + step])
    return out.reshape(shape)


# Formats whose values are ``scale * q + offset`` with q in 0..15 over groups of 32: they
# map onto a 4-bit groupwise-affine weight without requantising.
INT4_AFFINE_TYPES: frozenset[T] = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})


def _q4_0_affine(blocks: torch.Tensor):
    d = _half(blocks, 0)
    return _unpack(blocks[:, 2:], 4, 16), d, -8 * d


def _q4_1_affine(blocks: torch.Tensor):
    return _unpack(blocks[:, 4:], 4, 16), _half(blocks, 0), _half(blocks, 2)


def _q4_k_affine(blocks: torch.Tensor):
    scales, mins = _k_scales(blocks[:, 4:16])
    return _unpack(blocks[:, 16:], 4, 32), _half(blocks, 0) * scales, -(_half(blocks, 2) * mins)


_AFFINE = {T.Q4_0: _q4_0_affine, T.Q4_1: _q4_1_affine, T.Q4_K: _q4_k_affine}


def int4_affine(raw: torch.Tensor, qtype: T | int, shape: tuple[int, int]):
    """The 4-bit codes of a Q4_0/Q4_1/Q4_K matrix and, per group of 32, the scale and offset
    with ``value = scale * q + offset`` (the same float32 products ``dequantize`` forms).

    Returns ``q`` uint8 ``[rows, cols]``, ``scale`` and ``offset`` float32 ``[rows, cols // 32]``.
    """
    qtype = T(qtype)
    rows, cols = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    q, scale, offset = _AFFINE[qtype](as_bytes(raw).view(-1, type_size))
    groups = cols // 32
    return q.reshape(rows, cols), scale.reshape(rows, groups), offset.reshape(rows, groups)


@dataclass
class GGUFTensor:
    """A GGUF weight still in its block format: ``raw`` holds each row's blocks as bytes,
    shape ``shape[:-1] + (bytes_per_row,)``. Dequantised only when, and where, asked."""

    qtype: T
    raw: torch.Tensor
    shape: tuple[int, ...]

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int) -> int:
        return self.shape[dim]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, self.shape)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``index`` (any shape) of a matrix: ``[*index.shape, cols]``."""
        picked = self.raw.index_select(0, index.reshape(-1))
        return dequantize(picked, self.qtype, (picked.shape[0], self.shape[-1])).view(*index.shape, -1)

    def row_slice(self, start: int, length: int) -> "GGUFTensor":
        return GGUFTensor(self.qtype, self.raw.narrow(0, start, length), (length, *self.shape[1:]))

    def narrow(self, dim: int, start: int, length: int):
        """Rows stay quantised; so does a cut across columns on block boundaries (a row-parallel
        shard); any other cut dequantises (blocks run along a row)."""
        if dim == 0:
            return self.row_slice(start, length)
        block, size = GGML_QUANT_SIZES[self.qtype]
        if dim == self.dim() - 1 and self.dim() == 2 and start % block == 0 and length % block == 0:
            raw = self.raw.narrow(1, start // block * size, length // block * size)
            return GGUFTensor(self.qtype, raw, (self.shape[0], length))
        return self.dequantize().narrow(dim, start, length)
