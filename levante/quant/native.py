"""Native matrix-vector kernels (kernels.c) for packed weights, built on first use.

A decode step is a chain of matrix-vector products over int8/int4 weights. PyTorch's CPU
kernels for them turn every weight into a float and multiply in float, which is slower
than memory; kernels.c quantises the activations to int8 in blocks of 32 (as llama.cpp
does) and multiplies integers with AVX-512 VNNI, at memory speed.

The shared library is compiled with the system C compiler into
``$LEVANTE_CACHE/kernels/`` (default ``~/.cache/levante/kernels/``) under a hash of the
source and flags, once per machine (``make install`` does it ahead; a fresh checkout does
it on first use, ~3 s). Without a compiler, without AVX-512 VNNI, or with
``LEVANTE_NATIVE_KERNELS=0``, ``library()`` is None and the packed weights keep PyTorch's
kernels (nothing else changes).

The library runs its own helper threads (``torch.get_num_threads() - 1`` of them, see
kernels.c), not OpenMP: on a machine shared with other work, a job must not wait at a
barrier for a helper that is not scheduled.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from levante.quant import kv_int8

logger = logging.getLogger("levante")

SOURCE = Path(__file__).with_name("kernels.c")
# #included by kernels.c: part of the build's hash
INCLUDED = tuple(Path(__file__).with_name(name) for name in ("attention.c", "decode_step.c"))
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-fno-math-errno",
         "-pthread", "-shared", "-fPIC")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
MAX_ROWS = 8  # rows of x per call (larger batches are split)
BLOCK = 32  # activation values per scale; weights are padded to a multiple of it
TILE = 16  # weight rows per tile


def enabled_by_env() -> bool:
    return os.environ.get("LEVANTE_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_supported() -> bool:
    return all(flag in _cpu_flags() for flag in _CPU_FLAGS)


def bf16_dot_supported() -> bool:
    """Whether the kernels' bfloat16 dot products (AVX512-BF16) run here: the bfloat16 attention path."""
    return available() and "avx512_bf16" in _cpu_flags()


def _cache_dir() -> Path:
    return Path(os.environ.get("LEVANTE_CACHE", Path.home() / ".cache" / "levante")) / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def build(compiler: str | None = None) -> Path:
    """The compiled library's path (compiling it if this source and flags were not yet);
    raises OSError or CalledProcessError when it cannot be built."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise OSError("no C compiler (gcc or cc) on PATH")
    source = b"".join(path.read_bytes() for path in (SOURCE, *INCLUDED))
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"levante-kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, target)  # atomic: a concurrent builder's file is the same
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lv_w8a8.argtypes = [p, p, i64, i64, i64, p, i64, i32, i32, p, i64, i32, i32]
    lib.lv_w8a16.argtypes = lib.lv_w8a8.argtypes
    lib.lv_q4a8.argtypes = [p, p, p, i32, i64, i64, p, i64, i32, i32, p, i64, i32, i32, i32]
    lib.lv_w8_unpack.argtypes = [p, i64, i64, i64, i64, i64, p, i32, i32]
    lib.lv_q5a8.argtypes = [p, i64, i64, p, i64, i32, i32, p, i64, i32, i32, i32]
    lib.lv_q5_unpack.argtypes = [p, i64, i64, i64, i64, p, i32, i32]
    lib.lv_w8_pack.argtypes = [p, i64, i64, i64, p, i32]
    lib.lv_q5_pack_gguf.argtypes = [p, i64, i64, i64, p, i32]
    lib.lv_set_spin.argtypes = [i32]
    lib.lv_set_spin.restype = None
    lib.lv_rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float, i32, i32]
    lib.lv_silu_mul.argtypes = [p, p, i64, i64, i32]
    lib.lv_rope.argtypes = [p, p, p, i64, i64, i64, i64, i32]
    lib.lv_paged_attention.argtypes = [p, p, p, p, p, i64, p, p, i32, i32, i32, i32, i32, i32, ctypes.c_float,
                                       i32, i32, i32]
    lib.lv_kv_int8_store.argtypes = [p, i32, i64, p, p, p, i64, i32, i32]
    lib.lv_decode_scratch.argtypes = [i64, i32, i32, i32, i64]
    lib.lv_decode_scratch.restype = i64
    lib.lv_decode_blocks.argtypes = [p, i32, p, i64, i32, i32, i32, i64, i32, i64, i64, p, i64, i32, p, i32]
    for fn in (lib.lv_kv_int8_store, lib.lv_decode_blocks, lib.lv_w8_pack, lib.lv_q5_pack_gguf, lib.lv_w8a8,
               lib.lv_w8a16, lib.lv_q4a8, lib.lv_w8_unpack, lib.lv_q5a8, lib.lv_q5_unpack, lib.lv_rms_norm,
               lib.lv_silu_mul, lib.lv_rope, lib.lv_paged_attention):
        fn.restype = i32
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels, or None where they cannot run here (logged once, at debug level)."""
    if not enabled_by_env():
        logger.debug("native kernels disabled by LEVANTE_NATIVE_KERNELS")
        return None
    if not _cpu_supported():
        logger.debug("native kernels need x86-64 Linux with AVX-512 VNNI; using PyTorch's kernels")
        return None
    try:
        return _bind(ctypes.CDLL(str(build())))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        logger.debug("native kernels unavailable (%s %s); using PyTorch's kernels", error,
                     detail.decode(errors="replace")[-2000:])
        return None


def available() -> bool:
    return library() is not None


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
    library().lv_set_spin(1)  # helpers wait spinning for the step's next kernel (kernels.c)
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
    """int8 codes ``[N, K]`` -> layout t16 (uint8 ``[N16, K32]``, N and K padded; see kernels.c)."""
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


def _rows_call(fn, x: torch.Tensor, out_features: int, *head, out_dtype: torch.dtype | None = None,
               tail: tuple = (), max_rows: int = MAX_ROWS) -> torch.Tensor:
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
        precise = x.shape[0] <= MAX_ROWS // 2
    fn = library().lv_w8a16 if precise else library().lv_w8a8
    return _rows_call(fn, x, n, tiles.data_ptr(), scales.data_ptr(), n, k, tiles.shape[1], out_dtype=out_dtype,
                      max_rows=MAX_ROWS // 2 if precise else MAX_ROWS)


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

Q5_BLOCK_BYTES = 352  # per tile of 16 rows and block of 32 columns (see kernels.c)


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
# The CPU kernel behind layers/paged_attention.py's interface (attention.c).

_Q_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_KV_DTYPES = {**_Q_DTYPES, torch.int8: 3}  # int8: quant/kv_int8.py's rows (codes, then float16 scales)
MAX_HEAD_DIM = 512


def paged_attention_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel runs here for caches of `dtype` (float32, bfloat16, float16, int8) and `head_dim`."""
    return dtype in _KV_DTYPES and head_dim <= MAX_HEAD_DIM and available()


def paged_attention_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these: CPU tensors, float queries, a supported cache dtype and head size."""
    dim = q.shape[-1]
    row = kv_int8.row_bytes(dim) if k_cache.dtype == torch.int8 else dim
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
# The structures of decode_step.c; layers/decode_step.py fills them.

LINEAR_W8, LINEAR_Q4, LINEAR_Q5 = 0, 1, 2


class DecodeLinear(ctypes.Structure):
    """A packed weight as decode_step.c reads it (its tensors must outlive it)."""
    _fields_ = [("kind", ctypes.c_int), ("qscale_f32", ctypes.c_int), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("qscale", ctypes.c_void_p), ("qoffset", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("Kp", ctypes.c_int64)]


class DecodeBlock(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("eps", ctypes.c_float), ("qk_eps", ctypes.c_float),
                ("qkv", DecodeLinear), ("o", DecodeLinear), ("gate_up", DecodeLinear), ("down", DecodeLinear),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("cos_sin", ctypes.c_void_p),
                ("window", ctypes.c_int), ("scale", ctypes.c_float), ("kv_int8", ctypes.c_int),
                ("key_offset", ctypes.c_void_p)]


if __name__ == "__main__":  # `python -m levante.quant.native`: build ahead (make install)
    logging.basicConfig(level=logging.DEBUG)
    print(library() and build() or "native kernels unavailable here (PyTorch's kernels will be used)")
