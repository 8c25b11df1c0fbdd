"""Weights kept quantised in memory and multiplied by PyTorch's packed CPU kernels.

* ``Int8Weight``: symmetric int8 per output row (``aten._weight_int8pack_mm``).
* ``Int4Weight``: asymmetric 4-bit codes in groups along the input dimension
  (``aten._weight_int4pack_mm_for_cpu``): ``value = (q - 8) * scale + zero``, q in 0..15.

Both kernels are matrix-vector products at heart: their time grows with every row of
``x``. From ``dense_from_rows`` rows on (prefill), the weight is dequantised to ``x``'s
dtype for that call and multiplied densely (oneDNN, AMX), which is several times faster.

How a GGUF weight is kept (``pack``, mode ``"auto"``):

* Q4_0, Q4_1, Q4_K -> ``Int4Weight``, group 32, without requantising: each format's
  32-value group is ``scale * q + offset`` and becomes ``zero = offset + 8 * scale``.
  In float32 the packed weight dequantises bit for bit to what ``dequantize`` gives (the
  tests check real files); the kernel takes scale and zero in the activations' dtype, so
  under bfloat16 they are rounded to bfloat16 (relative error up to 2^-9 per group).
* Q5_0 -> ``Q5Weight`` (exact) where the native kernels run (kernels/native.py).
* Q5_0 (elsewhere), Q5_1, Q5_K, Q6_K, Q8_0, Q2_K, Q3_K -> ``Int8Weight``, requantised per row from
  the dequantised values (the int8 step is the row's max / 127; see tests/test_quant.py
  for the measured error).
* F32, F16, BF16 -> dense, in the model's dtype.

Modes ``"int8"`` and ``"int4"`` quantise everything to that form (in-situ quantisation
of a dense checkpoint, mistral.rs's ``--isq``).
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from levante.errors import ModelLoadError
from levante.kernels import native
from levante.quant.gguf_blocks import INT4_AFFINE_TYPES, GGUFTensor, int4_affine

QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Rows converted per step when quantising: bounds the float32 temporaries (a multiple of 64,
# the int4 packing's row block, so chunks pack independently).
_CHUNK_ROWS = 4096
_FLOAT_TYPES = {T.F32, T.F16, T.BF16}

Shard = torch.Tensor | GGUFTensor


def resolve_mode(requested: str | None, checkpoint_format: str) -> str | None:
    """The quantisation to load with: None for dense; "auto" keeps GGUF blocks' precision."""
    if requested is None:
        return None
    if requested not in QUANTIZATION_MODES:
        raise ModelLoadError(f"unknown quantization '{requested}'; choose one of {', '.join(QUANTIZATION_MODES)}")
    if requested == "none" or (requested == "auto" and checkpoint_format != "gguf"):
        return None
    return requested


def expect_tensor(tensor: torch.Tensor | None, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
                  what: str) -> None:
    """ValueError unless `tensor` is contiguous with this shape and one of these dtypes: what the
    kernels reading it through raw pointers assume (a prepared-cache entry is checked against it)."""
    if tensor is None or tuple(tensor.shape) != tuple(shape) or tensor.dtype not in dtypes \
            or not tensor.is_contiguous():
        found = "nothing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
        raise ValueError(f"{what}: expected {tuple(shape)} {'/'.join(str(d) for d in dtypes)}, found {found}")


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


# Bytes of dequantised weight rows per step of a dense matmul: a step's rows are still in
# cache when the matmul reads them, instead of a whole vocabulary-sized copy going out to
# memory and back (2.4x faster for the 151936 x 896 head at 16 rows, 1.5x for a gate/up).
_DENSE_STEP_BYTES = 8 << 20
# From this many rows on the matmul outweighs the conversion and one call over the whole
# weight is faster (a 512-token prefill is ~2% slower in steps).
_DENSE_WHOLE_FROM_ROWS = 128


def _dense_matmul(rows: torch.Tensor, shape: tuple[int, int], weight_rows) -> torch.Tensor:
    """``rows @ W.T`` with ``W``'s rows dequantised a cache-sized step at a time by
    ``weight_rows(start, end, dtype)`` (steps are multiples of 64 rows, the int4 layout's block)."""
    n, k = shape
    step = max(_BLOCK_N, _DENSE_STEP_BYTES // (rows.element_size() * k) // _BLOCK_N * _BLOCK_N)
    if step >= n or rows.shape[0] >= _DENSE_WHOLE_FROM_ROWS:
        return F.linear(rows, weight_rows(0, n, rows.dtype))
    out = torch.empty(rows.shape[0], n, dtype=rows.dtype, device=rows.device)
    for start in range(0, n, step):
        end = min(start + step, n)
        out[:, start:end] = F.linear(rows, weight_rows(start, end, rows.dtype))
    return out


class Int8Weight:
    """``weight ~= codes * scales[:, None]``, codes int8 ``[out, in]``.

    ``qweight`` holds the codes in one of two layouts: ``"rows"``, the plain ``[out, in]``
    int8 matrix that ``aten._weight_int8pack_mm`` reads, or ``"t16"``, tiles of 16 rows for
    the native W8A8 kernel (kernels/native.py, kernels/cpu/: ~2x faster for one row of x, more
    for several). ``pack``/``quantize_int8`` give "t16" wherever the native kernels load.
    """

    # From this many rows of x on, dequantising (one int8 -> bf16 pass) and a dense matmul
    # beat the kernel (AVX-512: measured crossover ~10 rows on this project's layer shapes, one
    # core, dequantising a cache-sized step at a time; per variant: native.dense_from_rows).
    _dense_from_rows = 12

    @property
    def dense_from_rows(self) -> int:
        return native.dense_from_rows(self.layout, self._dense_from_rows)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, layout: str = "rows",
                 shape: tuple[int, int] | None = None):
        self.qweight, self.scales, self.layout = qweight, scales, layout
        self.shape = tuple(shape) if shape is not None else tuple(qweight.shape)
        if layout == "t16":
            self._scales32 = scales.float().contiguous()

    def check(self) -> None:
        """ValueError unless the tensors have the sizes the kernels read for `shape`."""
        n, k = self.shape
        if self.layout == "t16":
            expect_tensor(self.qweight, (-(-n // native.TILE) * native.TILE, -(-k // native.BLOCK) * native.BLOCK),
                          (torch.uint8,), "int8 t16 codes")
        elif self.layout == "rows":
            expect_tensor(self.qweight, (n, k), (torch.int8,), "int8 codes")
        else:
            raise ValueError(f"unknown int8 layout {self.layout!r}")
        expect_tensor(self.scales, (n,), _FLOAT_DTYPES, "int8 scales")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, layout: str | None = None) -> Int8Weight:
        """From int8 codes ``[out, in]``, in ``layout`` (default: "t16" where native kernels run)."""
        if (layout or ("t16" if native.available() else "rows")) == "t16":
            return cls(native.pack_int8(codes), scales, "t16", tuple(codes.shape))
        return cls(codes, scales)

    def in_layout(self, layout: str) -> Int8Weight:
        """This weight with its codes in ``layout`` (itself if they already are)."""
        return self if layout == self.layout else Int8Weight.from_codes(self.codes(), self.scales, layout)

    def codes(self) -> torch.Tensor:
        """The int8 codes ``[out, in]``, row-major."""
        return self.qweight if self.layout == "rows" else native.unpack_int8(self.qweight, self.shape)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def _scales(self, dtype: torch.dtype) -> torch.Tensor:
        return self.scales if self.scales.dtype == dtype else self.scales.to(dtype)

    def _weight_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        if self.layout == "t16":
            return native.unpack_int8_rows(self.qweight, self.shape, start, end, dtype)
        return self.qweight[start:end].to(dtype)

    def matmul(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """``x @ weight.T`` in x's dtype; with ``float_out``, in float32, and the native kernel
        then takes x to ~15 bits for any number of rows (a head: its logits pick the tokens)."""
        rows = _flatten(x)
        if rows.shape[0] >= self.dense_from_rows:
            out = _dense_matmul(rows, self.shape, self._weight_rows).mul_(self._scales(x.dtype))
        elif self.layout == "t16":
            out = native.int8_matmul(self.qweight, self._scales32, self.shape, rows,
                                     torch.float32 if float_out else None, precise=True if float_out else None)
            if out.dtype != x.dtype and not float_out:
                out = out.to(x.dtype)
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.qweight, self._scales(x.dtype))
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.shape[0])

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._weight_rows(0, self.shape[0], dtype) * self._scales(dtype).unsqueeze(1)

    def decode_linear(self) -> native.DecodeLinear | None:
        """This weight for kernels/cpu/decode_step.c (None: not in a native layout)."""
        if self.layout != "t16":
            return None
        return native.DecodeLinear(kind=native.LINEAR_W8, w=self.qweight.data_ptr(), scale=self._scales32.data_ptr(),
                                   N=self.shape[0], K=self.shape[1], Kp=self.qweight.shape[1])

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = index.reshape(-1)
        if self.layout == "t16":
            codes = native.int8_rows(self.qweight, self.shape, flat)
        else:
            codes = self.qweight.index_select(0, flat)
        values = codes.to(dtype) * self._scales(dtype).index_select(0, flat).unsqueeze(1)
        return values.view(*index.shape, self.shape[1])


# Rows of x below which every packed weight's matmul takes its kernel (not the dense path).
# Rows of a step below which it is a decode-sized one: every packed matmul takes its kernel on every
# variant, PyTorch runs on one thread around them (native.kernel_step), drafts stay below it.
NATIVE_KERNEL_ROWS = Int8Weight._dense_from_rows


def _int8_codes(w: torch.Tensor, dtype: torch.dtype,
                columns: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales; the scales are rounded to ``dtype`` before the codes are chosen. ``columns``:
    codes of those columns only, with the whole rows' scales."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(dtype).tiny).to(dtype)
    if columns is not None:
        w = w.narrow(1, *columns)
    codes = (w / scales.float().unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int8(w: torch.Tensor, dtype: torch.dtype | None = None) -> Int8Weight:
    """Symmetric per-row int8 (round to nearest); scales kept in ``dtype`` (default: w's)."""
    return _int8_from_chunks(_dense_chunks(w), w.shape, dtype or w.dtype)


def _int8_from_chunks(chunks: Iterator[torch.Tensor], shape, dtype: torch.dtype,
                      columns: tuple[int, int] | None = None) -> Int8Weight:
    qweight = torch.empty(shape, dtype=torch.int8)
    scales = torch.empty(shape[0], dtype=dtype)
    start = 0
    for chunk in chunks:
        end = start + chunk.shape[0]
        qweight[start:end], scales[start:end] = _int8_codes(chunk, dtype, columns)
        start = end
    return Int8Weight.from_codes(qweight, scales)


# -- int4 ------------------------------------------------------------------------------------

_BLOCK_N = 64  # rows interleaved together by _convert_weight_to_int4pack_for_cpu (AVX-512 build)


def _unpack_blocks(blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """Codes ``[b * 64, cols]`` of ``b`` full 64-row blocks of the AVX-512 int4pack layout:
    byte ``(k, j, d)`` of a block holds rows ``d + 16 j`` (low nibble) and ``d + 32 + 16 j`` (high)."""
    grouped = blocks.reshape(-1, cols, 2, 16)
    codes = torch.cat([grouped & 0xF, grouped >> 4], dim=2)  # [b, k, 4, 16]: row 16 * i + d
    return codes.reshape(-1, cols, _BLOCK_N).transpose(1, 2).reshape(-1, cols)


def _unpack_tail(tail: torch.Tensor, cols: int) -> torch.Tensor:
    """The last ``rows % 64`` rows: byte ``(k, n // 2)`` holds rows n (low) and n + 1 (high)."""
    grouped = tail.reshape(cols, -1, 1)
    return torch.cat([grouped & 0xF, grouped >> 4], dim=2).reshape(cols, -1).t()


def _blocks_as_float(blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """Like ``_unpack_blocks`` but into float32, each nibble plane converted as it is
    transposed (one pass each): the fast path of a prefill's dequantisation."""
    grouped = blocks.reshape(-1, cols, 32)
    out = torch.empty(grouped.shape[0], _BLOCK_N, cols)
    out[:, :32].copy_((grouped & 0xF).transpose(1, 2))
    out[:, 32:].copy_((grouped >> 4).transpose(1, 2))
    return out.view(-1, cols)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The uint8 codes ``[rows, cols]`` of an int4pack weight (inverse of ``pack_int4``)."""
    rows = packed.shape[0]
    full = rows // _BLOCK_N * _BLOCK_N
    flat = packed.reshape(-1)
    parts = [_unpack_blocks(flat[: full * cols // 2], cols)] if full else []
    if rows > full:
        parts.append(_unpack_tail(flat[full * cols // 2:], cols))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _unpack_rows(packed: torch.Tensor, cols: int, index: torch.Tensor) -> torch.Tensor:
    """Codes of rows ``index`` (1-D) only, unpacking just the 64-row blocks they sit in."""
    rows = packed.shape[0]
    full = rows // _BLOCK_N * _BLOCK_N
    if full == 0:
        return unpack_int4(packed, cols).index_select(0, index)
    blocks = packed[:full].reshape(-1, _BLOCK_N * cols // 2)
    in_blocks = index.clamp_max(full - 1)
    codes = _unpack_blocks(blocks.index_select(0, in_blocks // _BLOCK_N), cols).view(-1, _BLOCK_N, cols)
    picked = codes[torch.arange(len(index)), in_blocks % _BLOCK_N]
    if rows > full:
        tail = unpack_int4(packed[full:], cols)
        from_tail = index >= full
        picked[from_tail] = tail.index_select(0, index[from_tail] - full)
    return picked


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[rows, cols]`` -> the kernel's packed layout ``[rows, cols // 2]``, packed
    a chunk of rows at a time (the layout keeps 64-row blocks apart, so chunks concatenate)."""
    packed = torch.empty(codes.shape[0], codes.shape[1] // 2, dtype=torch.uint8)
    for start in range(0, codes.shape[0], _CHUNK_ROWS):
        chunk = codes[start:start + _CHUNK_ROWS].to(torch.int32)
        packed[start:start + chunk.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, 1)
    return packed


@functools.cache
def int4_supported() -> bool:
    """Whether this PyTorch has the CPU int4 kernels and packs in the layout ``unpack_int4`` reads."""
    try:
        codes = torch.randint(0, 16, (144, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        return torch.equal(unpack_int4(pack_int4(codes), 64), codes)
    except (RuntimeError, AttributeError):
        return False


def int4_fits(shape: Sequence[int], group_size: int = 32) -> bool:
    """Whether a weight of this shape can be kept in 4 bits here: in the native layout (any CPU the
    kernels run on), or in PyTorch's (whose packing this PyTorch build must have, see int4_supported)."""
    rows, cols = shape
    if group_size not in INT4_GROUP_SIZES or rows % 16 or cols % group_size:
        return False
    return int4_layout(group_size, cols) == "q4t16" or int4_supported()


def int4_layout(group_size: int, cols: int) -> str:
    """The layout 4-bit weights take here: the native kernel's where it runs (groups of 32)."""
    return "q4t16" if group_size == native.BLOCK and cols % native.BLOCK == 0 and native.available() else "aten"


class Int4Weight:
    """4-bit codes q in 0..15 in groups of ``group_size`` columns, value = scale * q + offset.

    Two layouts: ``"aten"``, packed for ``_weight_int4pack_mm_for_cpu`` with
    ``scales_and_zeros`` ``[cols // group_size, rows, 2]`` in the compute dtype (value =
    (q - 8) * scale + zero); ``"q4t16"``, tiles of 16 rows for the native kernel
    (kernels/native.py, kernels/cpu/; groups of 32 only) with ``qscale``/``qoffset`` in float16
    (float32 when the compute dtype is float32, so that GGUF blocks stay exact).
    """

    # Dequantising 4-bit groups costs ~6x an int8 conversion (9 ms for 9728 x 896 on one
    # core), and the kernel, a real GEMM, grows slowly with rows: it stays ahead up to ~85
    # rows (896 x 4864: 7.1 ms vs 9.8 ms at 64 rows, 10.6 vs 9.3 at 96, one core; AVX-512).
    _dense_from_rows = 80

    @property
    def dense_from_rows(self) -> int:
        return native.dense_from_rows(self.layout, self._dense_from_rows)
    _dequantize_rows = 256  # rows per step of `dequantize`: float32 temporaries stay in cache

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor | None, group_size: int, cols: int,
                 layout: str = "aten", qscale: torch.Tensor | None = None, qoffset: torch.Tensor | None = None,
                 rows: int | None = None):
        self.packed, self.scales_and_zeros, self.group_size, self.layout = packed, scales_and_zeros, group_size, layout
        self.qscale, self.qoffset = qscale, qoffset
        self.shape = (rows if rows is not None else packed.shape[0], cols)

    def check(self) -> None:
        """ValueError unless the tensors have the sizes the kernels read for `shape`."""
        n, k = self.shape
        if self.group_size < 1 or k % self.group_size or k % 2:
            raise ValueError(f"int4: {k} columns do not split into groups of {self.group_size}")
        if self.layout == "q4t16":
            n16 = -(-n // native.TILE) * native.TILE
            if self.group_size != native.BLOCK:
                raise ValueError(f"int4 q4t16: groups of {self.group_size}, not {native.BLOCK}")
            expect_tensor(self.packed, (n16, k // 2), (torch.uint8,), "int4 q4t16 codes")
            for name, tensor in (("scales", self.qscale), ("offsets", self.qoffset)):
                expect_tensor(tensor, (n16 // native.TILE, k // native.BLOCK, native.TILE),
                              (torch.float16, torch.float32), f"int4 q4t16 {name}")
        elif self.layout == "aten":
            expect_tensor(self.packed, (n, k // 2), (torch.uint8,), "int4 codes")
            expect_tensor(self.scales_and_zeros, (k // self.group_size, n, 2), _FLOAT_DTYPES, "int4 scales")
        else:
            raise ValueError(f"unknown int4 layout {self.layout!r}")

    @classmethod
    def from_parts(cls, parts: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   shape: tuple[int, int], dtype: torch.dtype, layout: str | None = None) -> Int4Weight:
        """From consecutive row blocks ``(codes, scale, offset)``: codes uint8 ``[n, cols]``,
        scale and offset ``[n, groups]``, value = q * scale + offset.

        In the aten layout rows are packed as soon as a run of them is a whole number of the
        layout's 64-row blocks, so a vocabulary-sized weight never exists unpacked in full.
        """
        parts = iter(parts)
        first = next(parts)
        group_size = shape[1] // first[1].shape[1]
        layout = layout or int4_layout(group_size, shape[1])
        if layout == "q4t16":
            codes, scale, offset = (torch.cat(column) for column in zip(first, *parts))
            scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
            packed, qscale, qoffset = native.pack_int4(codes, scale, offset, scale_dtype)
            return cls(packed, None, group_size, shape[1], "q4t16", qscale, qoffset, shape[0])
        rows, cols = shape
        packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
        scales_and_zeros = torch.empty(first[1].shape[1], rows, 2, dtype=dtype)
        start, waiting = 0, []
        for codes, scale, offset in itertools.chain([first], parts):
            end = start + codes.shape[0]
            scales_and_zeros[:, start:end] = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1)
            waiting.append(codes)
            start = end
            if start % _BLOCK_N == 0 or start == rows:
                run = torch.cat(waiting) if len(waiting) > 1 else waiting[0]
                packed[start - run.shape[0]:start] = pack_int4(run)
                waiting = []
        return cls(packed, scales_and_zeros, group_size, cols)

    def in_layout(self, layout: str) -> Int4Weight:
        """This weight in ``layout`` (itself if it already is; scales and offsets round to the
        new layout's dtypes)."""
        if layout == self.layout:
            return self
        rows, cols = self.shape
        if self.layout == "q4t16":
            codes, scale, offset = native.unpack_int4(self.packed, self.qscale, self.qoffset, 0, rows)
            dtype = torch.float32 if self.qscale.dtype == torch.float32 else torch.bfloat16
        else:
            codes, (scale, zero) = unpack_int4(self.packed, cols), self.scales_and_zeros.float().unbind(-1)
            scale, offset, dtype = scale.t(), (zero - 8 * scale).t(), self.scales_and_zeros.dtype
        return Int4Weight.from_parts([(codes, scale.float(), offset.float())], self.shape, dtype, layout)

    @property
    def nbytes(self) -> int:
        extra = self.scales_and_zeros if self.layout == "aten" else (self.qscale, self.qoffset)
        return self.packed.nbytes + sum(t.nbytes for t in (extra if isinstance(extra, tuple) else (extra,)))

    def _scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        sz = self.scales_and_zeros
        return sz if sz.dtype == dtype else sz.to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = _flatten(x)
        if rows.shape[0] >= self.dense_from_rows:
            out = _dense_matmul(rows, self.shape, self._dequantize_range)
        elif self.layout == "q4t16":
            out = native.int4_matmul(self.packed, self.qscale, self.qoffset, self.shape, rows)
            if out.dtype != x.dtype:
                out = out.to(x.dtype)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.contiguous(), self.packed, self.group_size, self._scales_and_zeros(x.dtype))
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.shape[0])

    def _affine(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        """float32 (q - 8) * scale + zero for codes ``[n, cols]`` and their ``[groups, n, 2]``
        (in float32, where bfloat16 elementwise arithmetic is slow and rounds twice)."""
        sz = scales_and_zeros.float()
        scale, zero = sz[..., 0].t().unsqueeze(2), sz[..., 1].t().unsqueeze(2)
        values = codes.float()
        values.view(codes.shape[0], -1, self.group_size).mul_(scale).add_(zero - 8 * scale)
        return values

    def _native_affine(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """float32 scale * q + offset for codes ``[n, cols]`` and their ``[n, groups]``."""
        values = codes.float()
        values.view(codes.shape[0], -1, self.group_size).mul_(scale.float().unsqueeze(2)).add_(
            offset.float().unsqueeze(2))
        return values

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._dequantize_range(0, self.shape[0], dtype)

    def decode_linear(self) -> native.DecodeLinear | None:
        """This weight for kernels/cpu/decode_step.c (None: not in a native layout)."""
        if self.layout != "q4t16":
            return None
        return native.DecodeLinear(kind=native.LINEAR_Q4, qscale_f32=int(self.qscale.dtype == torch.float32),
                                   w=self.packed.data_ptr(), qscale=self.qscale.data_ptr(),
                                   qoffset=self.qoffset.data_ptr(), N=self.shape[0], K=self.shape[1],
                                   Kp=self.shape[1])

    def _dequantize_range(self, first: int, last: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``first:last``; ``first`` a multiple of 64, ``last`` one too or the last row."""
        rows, cols = self.shape
        out = torch.empty(last - first, cols, dtype=dtype)
        if self.layout == "q4t16":
            for start in range(first, last, self._dequantize_rows):
                end = min(start + self._dequantize_rows, last)
                parts = native.unpack_int4(self.packed, self.qscale, self.qoffset, start, end)
                out[start - first:end - first] = self._native_affine(*parts)
            return out
        full = rows // _BLOCK_N * _BLOCK_N
        for start in range(first, min(last, full), self._dequantize_rows):
            end = min(start + self._dequantize_rows, last, full)
            codes = _blocks_as_float(self.packed[start:end], cols)
            out[start - first:end - first] = self._affine(codes, self.scales_and_zeros[:, start:end])
        if last > full:
            out[full - first:] = self._affine(unpack_int4(self.packed[full:], cols), self.scales_and_zeros[:, full:])
        return out

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = index.reshape(-1)
        if self.layout == "q4t16":
            values = self._native_affine(*native.int4_rows(self.packed, self.qscale, self.qoffset, self.shape, flat))
        else:
            codes = _unpack_rows(self.packed, self.shape[1], flat)
            values = self._affine(codes, self.scales_and_zeros.index_select(1, flat))
        return values.to(dtype).view(*index.shape, self.shape[1])


def _round_groups(groups: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
    """Nearest 4-bit codes for ``scale * q + low`` and each group's squared error."""
    codes = ((groups - low) / scale).round_().clamp_(0, 15)
    return codes, (codes * scale + low - groups).square_().sum(-1, keepdim=True)


def _least_squares(groups: torch.Tensor, codes: torch.Tensor):
    """Per group, the ``scale, low`` minimising ``|scale * codes + low - groups|^2``."""
    n = groups.shape[-1]
    sum_q, sum_w = codes.sum(-1, keepdim=True), groups.sum(-1, keepdim=True)
    sum_qq, sum_qw = (codes * codes).sum(-1, keepdim=True), (codes * groups).sum(-1, keepdim=True)
    scale = (n * sum_qw - sum_q * sum_w) / (n * sum_qq - sum_q * sum_q).clamp_min(1e-12)
    scale = scale.clamp_min(1e-12)
    return scale, (sum_w - scale * sum_q) / n


def _int4_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group, with the least squared error this search finds.

    Start from each group's [min, max], try ranges shrunk at either end (trading a clipped
    outlier for a finer step), then refit scale and offset by least squares to the codes
    and round again (as llama.cpp's k-quants do). On Gaussian weights this cuts the error
    of plain min/max rounding by ~10%.
    """
    groups = w.float().reshape(w.shape[0], -1, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    best = None
    for low_shrink in (1.0, 0.92, 0.85):
        for high_shrink in (1.0, 0.92, 0.85):
            lo = low * low_shrink
            scale = ((high * high_shrink - lo) / 15).clamp_min(1e-12)
            best = _keep_better(best, scale, lo, *_round_groups(groups, scale, lo))
    for _ in range(2):
        scale, lo = _least_squares(groups, best[2])
        best = _keep_better(best, scale, lo, *_round_groups(groups, scale, lo))
    scale, lo, codes, _ = best
    scale, lo = scale.squeeze(-1), lo.squeeze(-1)
    return codes.to(torch.uint8).reshape(w.shape), scale, lo


def _keep_better(best, scale, low, codes, error):
    """Per group, whichever of ``best`` and the new candidate has the smaller error."""
    if best is None:
        return [scale, low, codes, error]
    better = error < best[3]
    return [torch.where(better, new, old) for new, old in zip((scale, low, codes, error), best)]


def quantize_int4(w: torch.Tensor, group_size: int = 32, dtype: torch.dtype | None = None) -> Int4Weight:
    """Groupwise asymmetric 4-bit (groups of ``group_size`` along the input dimension)."""
    if not int4_fits(w.shape, group_size):
        raise ValueError(f"int4 needs rows % 16 == 0 and cols % {group_size} == 0 (and the CPU int4 kernels); "
                         f"got {tuple(w.shape)}")
    parts = (_int4_codes(chunk, group_size) for chunk in _dense_chunks(w))
    return Int4Weight.from_parts(parts, tuple(w.shape), dtype or w.dtype)


# -- from checkpoint shards ------------------------------------------------------------------

class Q5Weight:
    """A GGUF Q5_0 matrix kept exactly as stored (value = d * (q - 16), 5-bit q, float16 d
    per block of 32), in the native kernel's layout q5t16 (kernels/native.py, kernels/cpu/):
    5.5 bits a value, against 8 for the int8 it would otherwise be requantised to. Only
    where the native kernels run."""

    @property
    def dense_from_rows(self) -> int:  # the dequantisation is as cheap as int8's
        return native.dense_from_rows("q5t16", Int8Weight._dense_from_rows)

    def __init__(self, packed: torch.Tensor, shape: tuple[int, int]):
        self.packed, self.shape = packed, tuple(shape)

    def check(self) -> None:
        """ValueError unless the tensors have the sizes the kernels read for `shape`."""
        n, k = self.shape
        if k % native.BLOCK:
            raise ValueError(f"q5: {k} columns are no multiple of {native.BLOCK}")
        expect_tensor(self.packed, (-(-n // native.TILE), k // native.BLOCK * native.Q5_BLOCK_BYTES), (torch.uint8,),
                      "q5 blocks")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, d: torch.Tensor) -> Q5Weight:
        return cls(native.pack_q5(codes, d), tuple(codes.shape))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = _flatten(x)
        if rows.shape[0] >= self.dense_from_rows:
            out = _dense_matmul(rows, self.shape, self._weight_rows)
        else:
            out = native.q5_matmul(self.packed, self.shape, rows)
            if out.dtype != x.dtype:
                out = out.to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.shape[0])

    def _weight_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        return native.q5_values(self.packed, self.shape, start, end, dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._weight_rows(0, self.shape[0], dtype)

    def decode_linear(self) -> native.DecodeLinear:
        """This weight for kernels/cpu/decode_step.c."""
        return native.DecodeLinear(kind=native.LINEAR_Q5, w=self.packed.data_ptr(), N=self.shape[0],
                                   K=self.shape[1], Kp=self.shape[1])

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = index.reshape(-1)
        tiles = flat // native.TILE
        codes, d = native.unpack_q5(self.packed[tiles], (len(flat) * native.TILE, self.shape[1]))
        pick = torch.arange(len(flat)) * native.TILE + flat % native.TILE
        values = (codes[pick].float() - 16).view(len(flat), -1, 32) * d[pick].float().unsqueeze(2)
        return values.to(dtype).view(*index.shape, self.shape[1])

    def to_int8(self, dtype: torch.dtype) -> Int8Weight:
        """The int8 weight ``pack`` makes of the same Q5_0 tensor without native kernels."""
        codes, d = native.unpack_q5(self.packed, self.shape)
        values = (codes.float() - 16).view(self.shape[0], -1, 32) * d.float().unsqueeze(2)
        return _int8_from_chunks(_dense_chunks(values.view(self.shape)), self.shape, dtype)


PackedWeight = Int8Weight | Int4Weight | Q5Weight


def _dense_chunks(w: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        yield w[start:start + _CHUNK_ROWS]


def _float_chunks(shard: Shard) -> Iterator[torch.Tensor]:
    """A shard's rows as float32, a chunk at a time (a GGUF vocabulary is ~0.5 GB as float32)."""
    if isinstance(shard, torch.Tensor):
        yield from _dense_chunks(shard)
        return
    for start in range(0, shard.shape[0], _CHUNK_ROWS):
        yield shard.row_slice(start, min(_CHUNK_ROWS, shard.shape[0] - start)).dequantize()


def _auto_form(shard: Shard) -> str:
    if not isinstance(shard, GGUFTensor) or shard.qtype in _FLOAT_TYPES:
        return "dense"
    if shard.qtype == T.Q5_0 and native.available():
        return "q5"
    return "int4" if shard.qtype in INT4_AFFINE_TYPES else "int8"


def _form(shards: Sequence[Shard], mode: str, shape: tuple[int, int]) -> str:
    """One form for all shards of a fused weight: the most precise any of them needs."""
    if mode == "auto":
        forms = {_auto_form(shard) for shard in shards}
        if forms == {"q5"}:
            return "q5"
        form = "dense" if "dense" in forms else "int8" if forms & {"int8", "q5"} else "int4"
    else:
        form = mode
    return "int8" if form == "int4" and not int4_fits(shape) else form


def _int4_parts(shard: Shard) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    if isinstance(shard, GGUFTensor) and shard.qtype in INT4_AFFINE_TYPES:
        for start in range(0, shard.shape[0], _CHUNK_ROWS):
            piece = shard.row_slice(start, min(_CHUNK_ROWS, shard.shape[0] - start))
            codes, scale, offset = int4_affine(piece.raw, piece.qtype, piece.shape)
            yield codes, scale, offset
        return
    for chunk in _float_chunks(shard):
        yield _int4_codes(chunk, 32)


def pack(shards: Sequence[Shard], mode: str, dtype: torch.dtype,
         columns: tuple[int, int] | None = None) -> PackedWeight | torch.Tensor:
    """The shards of one weight (q, k, v of a fused projection, or just one), stacked by rows,
    in the form ``mode`` ("auto", "int8" or "int4") asks for: a packed weight, or a dense
    tensor in ``dtype`` when "auto" meets float checkpoint tensors.

    ``columns`` (start, length): the shards are whole and only those input columns are kept (a
    row-parallel rank's share), quantised as the whole weight is: int4 and GGUF groups run along
    a row in 32s that the split keeps whole, and per-row int8 scales are taken from whole rows."""
    whole = shards
    if columns is not None:
        shards = [shard.narrow(1, *columns) for shard in shards]
    cols = shards[0].shape[-1]
    shape = (sum(shard.shape[0] for shard in shards), cols)
    form = _form(shards, mode, shape)
    if form == "dense":
        return torch.cat([_dense(shard, dtype) for shard in shards])
    if form == "int4":
        return Int4Weight.from_parts((part for shard in shards for part in _int4_parts(shard)), shape, dtype)
    if form == "q5":
        raw = torch.cat([shard.raw.reshape(shard.shape[0], -1) for shard in shards])
        return Q5Weight(native.pack_q5_gguf(raw, shape), shape)
    chunks = (chunk for shard in whole for chunk in _float_chunks(shard))
    return _int8_from_chunks(chunks, shape, dtype, columns)


def _dense(shard: Shard, dtype: torch.dtype) -> torch.Tensor:
    return (shard.dequantize() if isinstance(shard, GGUFTensor) else shard).to(dtype)


class GGUFRows:
    """An embedding table left in its GGUF blocks: rows are dequantised when looked up
    (exact, no copy; pages of the memory-mapped file are read as tokens need them)."""

    def __init__(self, tensor: GGUFTensor):
        self.tensor = tensor
        self.shape = tensor.shape

    def check(self) -> None:
        """ValueError unless the raw blocks have the size the row lookups read for `shape`."""
        from gguf import GGML_QUANT_SIZES

        rows, cols = self.shape
        block, type_size = GGML_QUANT_SIZES[self.tensor.qtype]
        if cols % block:
            raise ValueError(f"GGUF rows: {cols} columns are no multiple of {block}")
        expect_tensor(self.tensor.raw, (rows, cols // block * type_size), (torch.uint8,), "GGUF rows")

    @property
    def nbytes(self) -> int:
        return self.tensor.raw.nbytes

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.tensor.rows(index).to(dtype)


def pack_embedding(table: Shard, mode: str, dtype: torch.dtype) -> GGUFRows | Int8Weight | torch.Tensor:
    """An embedding table for row lookups: GGUF blocks stay as they are (float types become
    dense), a dense table becomes int8 rows under "int8"/"int4" (lookups are not
    bandwidth-bound, so 4 bits would only lose precision)."""
    if isinstance(table, GGUFTensor):
        return _dense(table, dtype) if table.qtype in _FLOAT_TYPES else GGUFRows(table)
    if mode == "auto":
        return table.to(dtype)
    return quantize_int8(table, dtype)
