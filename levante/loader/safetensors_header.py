"""A safetensors file's tensors as views of one memory mapping, every header field checked first.

The prepared-weights cache (loader/prepared.py) maps its files this way (no copy: pages are
read when a kernel first touches them), and native kernels then read those views through raw
pointers, so nothing in the header is trusted: the header length, each dtype, each shape, each
tensor's byte range (inside the data, of exactly shape x itemsize bytes, no overlap). Anything
else is a `ModelLoadError`.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from levante.errors import ModelLoadError

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}
MAX_HEADER = 100 << 20  # the format's own limit
MAX_DIMS = 8


def map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> tensor view of a private copy-on-write mapping, the header's __metadata__)."""
    try:
        with path.open("rb") as stream:
            mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as error:  # ValueError: an empty file cannot be mapped
        raise ModelLoadError(f"{path}: cannot map ({error})") from None
    header, metadata, start = read_header(mapped, path)
    data = torch.frombuffer(mapped, dtype=torch.uint8, offset=start) if len(mapped) > start \
        else torch.empty(0, dtype=torch.uint8)
    try:
        tensors = {name: data[first:last].view(dtype).view(shape) for name, (dtype, shape, first, last) in header.items()}
    except RuntimeError:  # an offset that is no multiple of the dtype's size
        raise ModelLoadError(f"{path}: not a valid safetensors file (a tensor is not aligned to its dtype)") from None
    return tensors, metadata


def read_header(buffer, path: Path) -> tuple[dict[str, tuple], dict[str, str], int]:
    """(name -> (dtype, shape, first byte, end byte) in the data section, __metadata__, data start)."""
    bad = _complaint(path)
    size = _header_size(bytes(buffer[:8]), len(buffer), bad)
    header, metadata = _header_object(bytes(buffer[8:8 + size]), bad)
    data_size = len(buffer) - 8 - size
    entries, ranges = {}, []
    for name, info in header.items():
        entries[name] = _entry(name, info, data_size, bad)
        ranges.append(entries[name][2:])
    ranges.sort()
    if any(previous[1] > following[0] for previous, following in zip(ranges, ranges[1:])):
        raise bad("tensors overlap")
    return entries, metadata, 8 + size


def read_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a safetensors file, from its header alone: no tensor is read
    (what a checkpoint holds, for loader/bounds.py). Dtypes and offsets are left to the reader that
    loads the tensors later."""
    bad = _complaint(path)
    try:
        with path.open("rb") as stream:
            size = _header_size(stream.read(8), os.fstat(stream.fileno()).st_size, bad)
            header, _ = _header_object(stream.read(size), bad)
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read ({error.strerror})") from None
    shapes = {}
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not _is_shape(shape):
            raise bad(f"tensor {name!r}: a shape must be a list of at most {MAX_DIMS} sizes")
        shapes[name] = shape
    return shapes


def _complaint(path: Path):
    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: not a valid safetensors file ({why})")

    return bad


def _header_size(first: bytes, file_size: int, bad) -> int:
    if len(first) < 8 or file_size < 8:
        raise bad("shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", first)
    if size > min(MAX_HEADER, file_size - 8):
        raise bad(f"a header of {size} bytes in a file of {file_size}")
    return size


def _header_object(raw: bytes, bad) -> tuple[dict, dict[str, str]]:
    """(the tensors' entries, __metadata__) of a header's JSON."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise bad(f"the header is not JSON: {' '.join(str(error).split())[:80]}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not an object of strings")
    return header, metadata


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(d) is int and 0 <= d < 1 << 48
                                                                       for d in shape)


def _entry(name: str, info, data_size: int, bad) -> tuple:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {name!r}: needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise bad(f"tensor {name!r}: unknown dtype {str(dtype)[:20]!r}")
    if not _is_shape(shape):
        raise bad(f"tensor {name!r}: a shape must be a list of at most {MAX_DIMS} sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise bad(f"tensor {name!r}: data_offsets must be [begin, end]")
    first, last = offsets
    elements = 1
    for d in shape:
        elements *= d
    if not 0 <= first <= last <= data_size or last - first != elements * DTYPES[dtype].itemsize:
        raise bad(f"tensor {name!r}: bytes [{first}, {last}) do not hold {shape} {dtype} inside "
                  f"{data_size} bytes of data")
    return DTYPES[dtype], shape, first, last
