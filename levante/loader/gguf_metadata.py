"""The key-value metadata of a GGUF file, read fast and without touching the tensors.

`gguf.GGUFReader` builds a numpy view for every element of every array, which takes 2-9 s on
this project's models (Gemma's vocabulary has 262,144 tokens). The tokenizer needs only the
metadata as plain Python values, so this reads the key-value section with `struct` and
`numpy.frombuffer`: about 0.3 s for the same file. Callers that already hold a `GGUFReader`
(the weights loader) can pass it instead and pay nothing more.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFReader, GGUFValueType

from levante.errors import ModelLoadError

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def read_gguf_metadata(source: str | Path | GGUFReader, prefixes: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """Metadata keys starting with one of `prefixes`, as Python values (arrays become lists)."""
    if isinstance(source, GGUFReader):
        return {name: field.contents() for name, field in source.fields.items()
                if name.startswith(prefixes) and not name.startswith("GGUF.")}
    try:
        with open(source, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(_Cursor(buffer), prefixes)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as error:
        raise ModelLoadError(f"cannot read GGUF file {source}: {error}") from error


def _parse(cursor: _Cursor, prefixes: tuple[str, ...]) -> dict[str, Any]:
    magic, version = cursor.unpack("<II")
    if magic != GGUF_MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (big-endian files are not supported)")
    _tensor_count, kv_count = cursor.unpack("<QQ")
    metadata = {}
    for _ in range(kv_count):
        name = cursor.string()
        value = cursor.value(GGUFValueType(cursor.unpack("<I")[0]))
        if name.startswith(prefixes):
            metadata[name] = value
    return metadata


class _Cursor:
    """Reads little-endian GGUF values from a buffer, front to back."""

    def __init__(self, buffer):
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.buffer):
            raise ValueError("file is truncated")
        start, self.offset = self.offset, self.offset + size
        return self.buffer[start:self.offset]

    def string(self) -> str:
        return self.take(self.unpack("<Q")[0]).decode("utf-8")

    def value(self, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item_kind, count = self.unpack("<IQ")
            item_kind = GGUFValueType(item_kind)
            if item_kind in _SCALAR_FORMATS:
                dtype = np.dtype(_SCALAR_FORMATS[item_kind])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(item_kind) for _ in range(count)]
        return self.unpack(_SCALAR_FORMATS[kind])[0]
