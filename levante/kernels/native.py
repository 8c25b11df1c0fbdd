"""The native CPU kernels (cpu/*.c) for packed weights, attention and the decode step.

A decode step is a chain of matrix-vector products over int8/int4/5-bit weights. PyTorch's CPU
kernels for them turn every weight into a float and multiply in float, which is slower than
memory; the kernels quantise the activations to int8 in blocks of 32 (as llama.cpp does) and
multiply integers (AVX-512 VNNI, AVX2 or AVX-VNNI, NEON dot products), at memory speed.

One variant per ISA (kernels/isa.py picks the best this CPU runs, or LEVANTE_CPU_ISA's), built
at install (kernels/build.py; at first use where it was not) and bound from the header
(kernels/bindings.py). Where none runs (no variant for this CPU, no library and no compiler,
or LEVANTE_NATIVE_KERNELS=0), ``library()`` is None and the packed weights keep PyTorch's
kernels (nothing else changes). ``use(name)`` switches the variant in this process (tests run
every variant the machine can execute: the weight layouts are the same for all).

The library runs its own helper threads (``torch.get_num_threads() - 1`` of them, see
cpu/runtime.h), not OpenMP: on a machine shared with other work, a job must not wait at a
barrier for a helper that is not scheduled.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import subprocess

import torch

from levante.kernels import bindings, build, isa

logger = logging.getLogger("levante")

PRECISE_ROWS = 4  # up to this many rows of x, int8 products take x to ~15 bits (see int8_matmul)
BLOCK = 32  # activation values per scale; weights are padded to a multiple of it
TILE = 16  # weight rows per tile


def enabled_by_env() -> bool:
    return isa._enabled_by_env()


_forced: str | None = None  # use()'s variant, else isa.requested()


@functools.cache
def _load(name: str) -> ctypes.CDLL | None:
    """Variant `name`'s library (compiled first where it is not built), or None (logged at debug level)."""
    try:
        return bindings.bind(ctypes.CDLL(str(build.library_path(name))))
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        logger.debug("native kernels (%s) unavailable (%s %s); using PyTorch's kernels", name, error,
                     detail.decode(errors="replace")[-2000:])
        return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The chosen variant's kernels, or None where none runs here. Raises KernelChoiceError when
    LEVANTE_CPU_ISA names a variant this CPU cannot run."""
    name = _forced or isa.requested()
    if name == isa.SCALAR:
        logger.debug("native kernels: none (scalar: PyTorch's kernels)")
        return None
    return _load(name)


def available() -> bool:
    return library() is not None


def variant() -> str:
    """The variant in use: "avx512", "avx2", "avx2-vnni", "neon", or "scalar" (PyTorch's kernels)."""
    lib = library()
    return _name(lib) if lib is not None else isa.SCALAR


@functools.cache
def _name(lib: ctypes.CDLL) -> str:
    return lib.lv_variant().decode()


@contextlib.contextmanager
def use(name: str):
    """Run with variant `name` (or "scalar") in this process; raises KernelChoiceError where the CPU
    cannot run it, OSError where it cannot be built. Weights packed under one variant stay valid."""
    global _forced
    reason = isa.missing(name)
    if reason is not None:
        raise isa.KernelChoiceError(f"the {name} kernel variant does not run here: {reason}")
    if name != isa.SCALAR and _load(name) is None:
        raise OSError(f"the {name} kernel variant could not be built (is a C compiler installed?)")
    previous = _forced
    _forced = name
    library.cache_clear()
    try:
        yield
    finally:
        _forced = previous
        library.cache_clear()


def select(name: str) -> None:
    """Use variant `name` (or "scalar") in this process from now on (a tensor-parallel worker takes
    rank 0's); KernelChoiceError where this CPU cannot run it."""
    global _forced
    reason = isa.missing(name)
    if reason is not None:
        raise isa.KernelChoiceError(f"the {name} kernel variant does not run here: {reason}")
    _forced = name
    library.cache_clear()


def bf16_dot_supported() -> bool:
    """Whether the kernels' bfloat16 dot products (AVX512-BF16) run here: the bfloat16 attention path."""
    return available() and bool(library().lv_bf16_dot())


def max_rows() -> int:
    """Rows of x one matrix call of this variant takes (more go in several calls)."""
    return library().lv_max_rows()


# Rows of x from which dequantising a packed weight and a float matmul beat the variant's kernel,
# by layout (quant/packed.py). AVX-512: oneDNN's bfloat16/AMX matmuls take over early (crossovers
# measured there); AVX2 and NEON have no fast low-precision float matmul and their kernels take
# many rows of x at once (a prefill): the kernels take every size.
_DENSE_FROM_ROWS = {"avx512": {"t16": 12, "q5t16": 12, "q4t16": 80}}


def dense_from_rows(layout: str, default: int) -> int:
    """Rows from which a weight in `layout` is dequantised for a float matmul (`default`: PyTorch's layouts)."""
    if layout not in ("t16", "q4t16", "q5t16"):
        return default
    return _DENSE_FROM_ROWS.get(variant(), {}).get(layout, 1 << 30)


_threads: int | None = None


def set_threads(count: int | None) -> None:
    """Threads the kernels use (None: ``torch.get_num_threads()``, read at each call)."""
    global _threads
    _threads = count


def threads() -> int:
    return _threads or torch.get_num_threads()


@contextlib.contextmanager
def kernel_step(all_native: bool):
    """Around a forward whose packed matmuls all run here (``all_native``: few rows): PyTorch's
    own ops, small at that size, on one thread, and the kernels on all of them.

    Measured on 2 shared cores: with PyTorch on 2 threads as well, decode steps took 4-10x
    longer whenever other processes were busy (PyTorch's OpenMP team waits at every op's
    barrier for a worker that competes with the kernels' helper and everyone else for a
    core); with this, steps stay at their quiet-machine time.
    """
    count = torch.get_num_threads()
    if not all_native or count == 1 or not available():
        yield
        return
    set_threads(count)
    torch.set_num_threads(1)
    library().lv_set_spin(1)  # helpers wait spinning for the step's next kernel (cpu/runtime.h)
    try:
        yield
    finally:
        library().lv_set_spin(0)
        torch.set_num_threads(count)
        set_threads(None)


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# -- int8 ------------------------------------------------------------------------------------------

def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[N, K]`` -> layout t16 (uint8 ``[N16, K32]``, N and K padded; see cpu/levante.h)."""
    n, k = codes.shape
    n16, k32 = _padded(n, TILE), _padded(k, BLOCK)
    if available():  # one pass in C (the PyTorch version takes seconds for a vocabulary)
        codes = codes.contiguous()
        out = torch.empty(n16, k32, dtype=torch.uint8)
        if library().lv_w8_pack(codes.data_ptr(), n, k, k32, out.data_ptr(), threads()):
            raise RuntimeError("lv_w8_pack failed")
        return out
    return _pack_int8_torch(codes)


def _pack_int8_torch(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    n16, k32 = _padded(n, TILE), _padded(k, BLOCK)
    biased = torch.full((n16, k32), 128, dtype=torch.uint8)
    biased[:n, :k] = codes.view(torch.uint8) ^ 0x80
    return biased.view(n16 // TILE, TILE, k32 // 4, 4).transpose(1, 2).contiguous().view(n16, k32)


def unpack_int8(tiles: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The int8 codes ``[N, K]`` of a t16 weight (inverse of ``pack_int8``; plain PyTorch)."""
    n16, k32 = tiles.shape
    rows = tiles.view(n16 // TILE, k32 // 4, TILE, 4).transpose(1, 2).reshape(n16, k32)
    return (rows[:shape[0], :shape[1]] ^ 0x80).view(torch.int8)


def int8_rows(tiles: torch.Tensor, shape: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """int8 codes of rows ``index`` (1-D) of a t16 weight, ``[len(index), K]``."""
    n16, k32 = tiles.shape
    picked = tiles.view(n16 // TILE, k32 // 4, TILE, 4)[index // TILE, :, index % TILE]  # [n, K32 // 4, 4]
    return (picked.reshape(len(index), k32)[:, :shape[1]] ^ 0x80).view(torch.int8)


def unpack_int8_rows(tiles: torch.Tensor, shape: tuple[int, int], start: int, end: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Codes of rows ``start:end`` (start a multiple of 16) in ``dtype`` (float32 or bfloat16
    natively, others through float32)."""
    n, k = shape
    native = dtype in (torch.float32, torch.bfloat16)
    out = torch.empty(end - start, k, dtype=dtype if native else torch.float32)
    rc = library().lv_w8_unpack(tiles.data_ptr(), n, k, tiles.shape[1], start, end, out.data_ptr(),
                                int(out.dtype == torch.bfloat16), threads())
    if rc:
        raise RuntimeError(f"lv_w8_unpack failed ({rc})")
    return out if native else out.to(dtype)


_SIZES = {torch.float32: 4, torch.bfloat16: 2}


@functools.cache
def _variant_rows(lib: ctypes.CDLL) -> int:
    return lib.lv_max_rows()


def _max_rows() -> int:
    return _variant_rows(library())


def _rows_call(fn, x: torch.Tensor, out_features: int, *head, out_dtype: torch.dtype | None = None,
               tail: tuple = (), max_rows: int | None = None) -> torch.Tensor:
    """``fn(*head, x_rows, M, out_rows, ...)`` over chunks of at most ``max_rows`` rows of 2-D
    ``x``. The output is in ``out_dtype`` (float32 or bfloat16; default: x's). Lean on
    purpose (pointer arithmetic, no tensor slicing): it runs ~100 times per decode step."""
    x_size = _SIZES.get(x.dtype)
    if x_size is None:
        x, x_size = x.float(), 4
    if not x.is_contiguous():
        x = x.contiguous()
    rows, k = x.shape
    out = torch.empty((rows, out_features), dtype=out_dtype or x.dtype)
    out_size = _SIZES[out.dtype]
    x_at, out_at, count = x.data_ptr(), out.data_ptr(), _threads or torch.get_num_threads()
    max_rows = max_rows or _max_rows()
    for start in range(0, rows, max_rows):
        rc = fn(*head, x_at + start * k * x_size, k, x_size == 2, min(max_rows, rows - start),
                out_at + start * out_features * out_size, out_features, out_size == 2, count, *tail)
        if rc:
            raise RuntimeError(f"native kernel failed ({rc})")
    return out


def int8_matmul(tiles: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], x: torch.Tensor,
                out_dtype: torch.dtype | None = None, precise: bool | None = None) -> torch.Tensor:
    """``x @ (codes * scales[:, None]).T`` for 2-D ``x``; ``scales`` float32.

    ``precise`` (default: for up to 4 rows of x): x taken to ~15 bits (two int8 roundings,
    lv_w8a16), twice the integer work, which an int8 matrix-vector product has to spare
    (memory is its bound); otherwise 8 bits, like llama.cpp's Q8 activations.
    """
    n, k = shape
    if precise is None:
        precise = x.shape[0] <= PRECISE_ROWS
    fn = library().lv_w8a16 if precise else library().lv_w8a8
    return _rows_call(fn, x, n, tiles.data_ptr(), scales.data_ptr(), n, k, tiles.shape[1], out_dtype=out_dtype,
                      max_rows=_max_rows() // 2 if precise else None)


# -- int4 ------------------------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scale_dtype: torch.dtype):
    """Codes uint8 ``[N, K]`` (0..15, K a multiple of 32) with ``scale, offset`` ``[N, K // 32]``
    (value = scale * q + offset) -> layout q4t16: packed uint8 ``[N16, K // 2]``, scales and
    offsets ``[N16 // 16, K // 32, 16]`` each in ``scale_dtype`` (float16 or float32);
    padded rows have code 0, scale and offset 0."""
    n, k = codes.shape
    n16 = _padded(n, TILE)
    padded = torch.zeros(n16, k, dtype=torch.uint8)
    padded[:n] = codes
    groups = padded.view(n16 // TILE, TILE, k // 8, 2, 4)  # [tile, row, group of 8, half, 4]
    nibbles = groups[:, :, :, 0] | (groups[:, :, :, 1] << 4)  # [tile, row, group, 4]
    packed = nibbles.transpose(1, 2).contiguous().view(n16, k // 2)

    def per_tile(values):
        full = torch.zeros(n16, k // BLOCK, dtype=scale_dtype)
        full[:n] = values
        return full.view(n16 // TILE, TILE, -1).transpose(1, 2).contiguous()

    return packed, per_tile(scale), per_tile(offset)


def unpack_int4(packed: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, start: int, end: int):
    """Codes (uint8) and per-group scales and offsets (``[rows, K // 32]``) of rows
    ``start:end`` (a multiple of 16, and one or the last row) of a q4t16 weight."""
    first, last = start // TILE, -(-end // TILE)
    nibbles = packed[first * TILE:last * TILE].view(last - first, -1, TILE, 4)  # [tile, group of 8, row, 4]
    codes = torch.stack([nibbles & 0xF, nibbles >> 4], dim=3)  # [tile, group, row, half, 4]
    codes = codes.permute(0, 2, 1, 3, 4).reshape((last - first) * TILE, -1)
    rows = slice(0, end - start)

    def per_row(values):
        return values[first:last].transpose(1, 2).reshape((last - first) * TILE, -1)[rows]

    return codes[rows], per_row(qscale), per_row(qoffset)


def int4_rows(packed: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, shape: tuple[int, int],
              index: torch.Tensor):
    """Codes ``[len(index), K]`` and per-group scales and offsets of rows ``index`` (1-D)."""
    tile, lane = index // TILE, index % TILE
    nibbles = packed.view(packed.shape[0] // TILE, -1, TILE, 4)[tile, :, lane]  # [n, K // 8, 4]
    codes = torch.stack([nibbles & 0xF, nibbles >> 4], dim=2).reshape(len(index), shape[1])
    return codes, qscale[tile, :, lane], qoffset[tile, :, lane]


def int4_matmul(packed: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, shape: tuple[int, int],
                x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for 2-D ``x`` and a q4t16 weight ``W``."""
    n, k = shape
    return _rows_call(library().lv_q4a8, x, n, packed.data_ptr(), qscale.data_ptr(), qoffset.data_ptr(),
                      int(qscale.dtype == torch.float32), n, k, tail=(0,))


# -- 5-bit (Q5_0) ------------------------------------------------------------------------------------

Q5_BLOCK_BYTES = 352  # per tile of 16 rows and block of 32 columns (see cpu/avx512.c)


def pack_q5(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes uint8 ``[N, K]`` (0..31, K a multiple of 32) and ``d`` float16 ``[N, K // 32]``
    (value = d * (q - 16)) -> layout q5t16: uint8 ``[N16 // 16, K // 32 * 352]`` (padded rows:
    code 16, d 0)."""
    n, k = codes.shape
    n16, blocks = _padded(n, TILE), k // BLOCK
    padded = torch.full((n16, k), 16, dtype=torch.uint8)
    padded[:n] = codes
    scales = torch.zeros(n16, blocks, dtype=torch.float16)
    scales[:n] = d
    tiles = n16 // TILE
    groups = padded.view(tiles, TILE, blocks, 4, 2, 4)  # [tile, row, block, group of 8, half, 4]
    nibbles = (groups[..., 0, :] & 0xF) | ((groups[..., 1, :] & 0xF) << 4)  # [tile, row, block, group, 4]
    nibbles = nibbles.permute(0, 2, 3, 1, 4).reshape(tiles, blocks, 256)
    fifth = (groups >> 4).permute(0, 2, 3, 4, 1, 5).reshape(tiles, blocks, 4, 2, 64)  # bit j: row j // 4, col j % 4
    weights = (1 << torch.arange(8, dtype=torch.int64)).repeat(8)
    masks = (fifth.to(torch.int64) * weights).view(tiles, blocks, 4, 2, 8, 8).sum(-1).to(torch.uint8)
    d_bytes = scales.view(tiles, TILE, blocks).transpose(1, 2).contiguous().view(torch.uint8)
    out = torch.cat([nibbles, masks.reshape(tiles, blocks, 64), d_bytes.reshape(tiles, blocks, 32)], dim=2)
    return out.reshape(tiles, blocks * Q5_BLOCK_BYTES)


def pack_q5_gguf(raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF Q5_0 rows (``raw`` uint8 ``[N, K // 32 * 22]``) -> layout q5t16, in one pass in C."""
    n, k = shape
    raw = raw.contiguous()
    out = torch.empty(_padded(n, TILE) // TILE, k // BLOCK * Q5_BLOCK_BYTES, dtype=torch.uint8)
    if library().lv_q5_pack_gguf(raw.data_ptr(), n, k, raw.shape[1], out.data_ptr(), threads()):
        raise RuntimeError("lv_q5_pack_gguf failed")
    return out


def unpack_q5(packed: torch.Tensor, shape: tuple[int, int]):
    """Codes uint8 ``[N, K]`` and ``d`` float16 ``[N, K // 32]`` of a q5t16 weight (plain PyTorch)."""
    n, k = shape
    tiles, blocks = packed.shape[0], k // BLOCK
    by_block = packed.view(tiles, blocks, Q5_BLOCK_BYTES)
    nibbles = by_block[..., :256].reshape(tiles, blocks, 4, TILE, 4)
    halves = torch.stack([nibbles & 0xF, nibbles >> 4], dim=3)  # [tile, block, group, half, row, 4]
    masks = by_block[..., 256:320].reshape(tiles, blocks, 4, 2, 8, 1) >> torch.arange(8, dtype=torch.uint8)
    fifth = (masks & 1).reshape(tiles, blocks, 4, 2, TILE, 4)
    codes = (halves | (fifth << 4)).permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, k)
    d = by_block[..., 320:].contiguous().view(torch.float16).view(tiles, blocks, TILE).transpose(1, 2)
    return codes[:n], d.reshape(tiles * TILE, blocks)[:n]


def q5_matmul(packed: torch.Tensor, shape: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
    n, k = shape
    return _rows_call(library().lv_q5a8, x, n, packed.data_ptr(), n, k, tail=(0,))


def q5_values(packed: torch.Tensor, shape: tuple[int, int], start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Values of rows ``start:end`` (start a multiple of 16) in ``dtype``."""
    n, k = shape
    native = dtype in (torch.float32, torch.bfloat16)
    out = torch.empty(end - start, k, dtype=dtype if native else torch.float32)
    rc = library().lv_q5_unpack(packed.data_ptr(), n, k, start, end, out.data_ptr(), int(out.dtype == torch.bfloat16),
                                threads())
    if rc:
        raise RuntimeError(f"lv_q5_unpack failed ({rc})")
    return out if native else out.to(dtype)


# -- small decode-step ops -------------------------------------------------------------------------
# Used by layers/ for few-row CPU tensors (a decode step): one call instead of several
# PyTorch ops, whose fixed cost per op is most of the time at that size.

SMALL_OP_VALUES = 1 << 16  # more values than this: PyTorch's (multi-threaded) ops
small_ops = True  # False: always PyTorch's ops (for comparisons)


def small_op(x: torch.Tensor) -> bool:
    """Whether ``x`` should take the native small ops: CPU, float32/bfloat16, contiguous, small."""
    return (small_ops and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.numel() <= SMALL_OP_VALUES and x.is_contiguous() and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """RMSNorm over the last dimension in float32 (see layers/norms.py); ``weight`` in x's dtype."""
    out = torch.empty_like(x)
    library().lv_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                          eps, int(x.dtype == torch.bfloat16), int(unit_offset))
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over ``x = [gate | up]`` (last dimension)."""
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    library().lv_silu_mul(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], n, int(x.dtype == torch.bfloat16))
    return out


def rope_fits(x: torch.Tensor) -> bool:
    """``x`` [tokens, heads, head_dim] with heads and head_dim packed (tokens may be strided)."""
    return (small_ops and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 3
            and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.shape[2] % 2 == 0
            and x.numel() <= SMALL_OP_VALUES and available())


def rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Neox rotary of ``x`` (see ``rope_fits``) with ``cos_sin`` [tokens, head_dim] float32
    contiguous (cos half, then sin half)."""
    tokens, heads, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype)
    library().lv_rope(x.data_ptr(), out.data_ptr(), cos_sin.data_ptr(), tokens, heads, dim, x.stride(0),
                      int(x.dtype == torch.bfloat16))
    return out


# -- paged attention --------------------------------------------------------------------------------
# The CPU kernel behind layers/paged_attention.py's interface (cpu/*_attention.c).

_Q_DTYPES = {torch.float32: bindings.CONSTANTS["KV_F32"], torch.bfloat16: bindings.CONSTANTS["KV_BF16"],
             torch.float16: bindings.CONSTANTS["KV_F16"]}
_KV_DTYPES = {**_Q_DTYPES, torch.int8: bindings.CONSTANTS["KV_I8"]}  # quant/kv_int8.py's rows (codes, then scales)
MAX_HEAD_DIM = 512


def paged_attention_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel runs here for caches of `dtype` (float32, bfloat16, float16, int8) and `head_dim`."""
    return dtype in _KV_DTYPES and head_dim <= MAX_HEAD_DIM and available()


def paged_attention_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these: CPU tensors, float queries, a supported cache dtype and head size."""
    dim = q.shape[-1]
    row = dim + 2 * -(-dim // 16) if k_cache.dtype == torch.int8 else dim  # int8: quant/kv_int8.py's row_bytes
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in _Q_DTYPES
            and k_cache.shape[-1] == row and paged_attention_supported(k_cache.dtype, dim))


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *, block_size: int, scale: float,
                    max_q: int = 0, sliding_window: int | None = None, out=None) -> torch.Tensor:
    """layers/paged_attention.py's interface (``max_q`` is not needed here); caches contiguous."""
    tokens, heads, dim = q.shape
    q = q.contiguous()
    tables, cu, lens = (t.to(torch.int32).contiguous() for t in (block_tables, cu_seqlens_q, seq_lens))
    target = out if out is not None and out.is_contiguous() else torch.empty_like(q)
    rc = library().lv_paged_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), target.data_ptr(), tables.data_ptr(), tables.shape[1],
        cu.data_ptr(), lens.data_ptr(), lens.shape[0], heads, k_cache.shape[1], dim, block_size,
        sliding_window or 0, scale, _Q_DTYPES[q.dtype], _KV_DTYPES[k_cache.dtype], threads())
    if rc:
        raise RuntimeError(f"lv_paged_attention failed ({rc})")
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target


def kv_int8_store(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, offset: torch.Tensor | None) -> None:
    """quant/kv_int8.py's `store` (x [T, KVH, D] float, less `offset` [KVH, D] float32) in one pass."""
    tokens, kv_heads, dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != dim:
        x = x.contiguous()
    slots = slots.to(torch.int64).contiguous()
    offset = None if offset is None else offset.float().contiguous()
    rc = library().lv_kv_int8_store(x.data_ptr(), _Q_DTYPES[x.dtype], x.stride(0),
                                    None if offset is None else offset.data_ptr(), cache.data_ptr(),
                                    slots.data_ptr(), tokens, kv_heads, dim)
    if rc:
        raise RuntimeError(f"lv_kv_int8_store failed ({rc})")


# -- a decode token through the blocks --------------------------------------------------------------
# The structures of cpu/levante.h (decode_step.c); layers/decode_step.py fills them.

LINEAR_W8, LINEAR_Q4, LINEAR_Q5 = (bindings.CONSTANTS[name] for name in ("LIN_W8", "LIN_Q4", "LIN_Q5"))
DecodeLinear = bindings.STRUCTS["DecodeLinear"]  # a packed weight as decode_step.c reads it (its tensors must outlive it)
DecodeBlock = bindings.STRUCTS["DecodeBlock"]
