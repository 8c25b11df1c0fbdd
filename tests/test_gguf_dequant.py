"""levante.quant.gguf_blocks against gguf-py's numpy reference, bit for bit.

Both compute in float32 with the same operations in the same order (``d * q``, then
``- m`` or ``+ m``; no fused multiply-add on either side), so results are compared
with ``torch.equal``, not a tolerance.
"""
from __future__ import annotations

from collections import defaultdict

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from levante.errors import ModelLoadError
from levante.loader.sources import PACKAGED_MODELS, is_installed, resolve_alias
from levante.quant.gguf_blocks import SUPPORTED_TYPES, dequantize

GGUF_ALIASES = [alias for alias, model in PACKAGED_MODELS.items() if model.filename.endswith(".gguf")]
ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of the float16 scales inside one block, per type.
HALF_OFFSETS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    values = gguf.quants.dequantize(raw, qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def assert_matches_reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> None:
    ours = dequantize(raw, qtype, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.equal(ours, reference(raw, qtype, shape)), f"{qtype.name} {shape} differs from gguf"


def test_supported_types_are_the_documented_list():
    assert SUPPORTED_TYPES == set(ALL_TYPES)


@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_packaged_model_tensors_match_reference(alias):
    """The two smallest tensors of every type in each packaged model, and one
    multi-chunk matrix."""
    if not is_installed(alias):
        pytest.skip(f"{alias} not installed")
    reader = gguf.GGUFReader(resolve_alias(alias))
    by_type = defaultdict(list)
    for tensor in reader.tensors:
        by_type[tensor.tensor_type].append(tensor)
    assert set(by_type) <= SUPPORTED_TYPES
    for tensors in by_type.values():
        tensors.sort(key=lambda tensor: tensor.n_bytes)
    matrices = [t for t in reader.tensors if 2_000_000 < t.n_elements < 4_000_000]
    for tensor in [t for tensors in by_type.values() for t in tensors[:2]] + matrices[:1]:
        assert_matches_reference(tensor.data, tensor.tensor_type, tuple(reversed(tensor.shape.tolist())))


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every packed quant, with finite float16 scales of either sign."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in (T.F32, T.F16):
        return rng.standard_normal(n_blocks).astype(np.float32 if qtype == T.F32 else np.float16).view(np.uint8)
    if qtype == T.BF16:
        return (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in HALF_OFFSETS[qtype]:
        scales = (rng.uniform(1e-4, 1e-1, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size = GGML_QUANT_SIZES[qtype][0]
    rows, blocks_per_row = 48, 3
    raw = random_blocks(qtype, rows * blocks_per_row, rng)
    shape = (rows, blocks_per_row * block_size)
    assert_matches_reference(raw.reshape(rows, -1), qtype, shape)
    assert torch.equal(dequantize(torch.from_numpy(raw), qtype, shape), reference(raw.reshape(rows, -1), qtype, shape))


QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_random_weights_match_reference(qtype):
    """Realistic blocks: weights quantised by gguf-py itself (it has no K-quant quantiser)."""
    weights = np.random.default_rng(0).standard_normal((2, 8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, qtype)
    assert_matches_reference(raw, qtype, weights.shape)
    error = (dequantize(raw, qtype, weights.shape) - torch.from_numpy(weights)).abs().max()
    assert error < 0.5  # and it is a quantisation of the input, not noise


def test_chunked_path_matches_reference():
    """More blocks than one chunk holds, with a partial last chunk."""
    rng = np.random.default_rng(7)
    n_blocks = (1 << 20) // 32 * 2 + 5
    raw = random_blocks(T.Q4_0, n_blocks, rng)
    assert_matches_reference(raw, T.Q4_0, (n_blocks * 32,))


def test_unsupported_type_is_named():
    with pytest.raises(ModelLoadError, match="IQ2_XXS"):
        dequantize(np.zeros(66, dtype=np.uint8), T.IQ2_XXS, (256,))


def test_size_mismatch_is_an_error():
    with pytest.raises(ModelLoadError, match="Q8_0"):
        dequantize(np.zeros(33, dtype=np.uint8), T.Q8_0, (32,))
    with pytest.raises(ModelLoadError):
        dequantize(np.zeros(68, dtype=np.uint8), T.Q8_0, (2, 16, 2))  # rows not made of whole blocks
