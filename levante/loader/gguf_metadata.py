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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(check):
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _is_str(value) -> bool:
    return isinstance(value, str)


# The keys levante reads, and what their values must be: a file that says otherwise is refused
# here, once, instead of failing somewhere inside the config or tokenizer code.
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "general.architecture": (_is_str, "a string"),
    "general.alignment": (_is_int, "an integer"),
    "tokenizer.ggml.model": (_is_str, "a string"),
    "tokenizer.ggml.pre": (_is_str, "a string"),
    "tokenizer.chat_template": (_is_str, "a string"),
    "tokenizer.ggml.tokens": (_list_of(_is_str), "a list of strings"),
    "tokenizer.ggml.merges": (_list_of(_is_str), "a list of strings"),
    "tokenizer.ggml.scores": (_list_of(_is_number), "a list of numbers"),
    "tokenizer.ggml.token_type": (_list_of(_is_int), "a list of integers"),
    **{f"tokenizer.ggml.{name}_token_id": (_is_int, "an integer")
       for name in ("bos", "eos", "unknown", "padding", "eot", "eom", "sep", "cls", "mask")},
    **{f"tokenizer.ggml.{name}": (lambda v: isinstance(v, bool), "true or false")
       for name in ("add_bos_token", "add_eos_token", "add_space_prefix")},
}
# Keys under "<architecture>.".
ARCH_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    **{key: (_is_int, "an integer") for key in (
        "block_count", "context_length", "embedding_length", "vocab_size",
        "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
        "attention.sliding_window", "rope.scaling.original_context_length", "rope.dimension_count",
        "expert_count", "expert_used_count", "expert_feed_forward_length")},
    **{key: (_is_number, "a number") for key in (
        "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor", "rope.scale_linear",
        "rope.scaling.attn_factor", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow")},
    "rope.scaling.type": (_is_str, "a string"),
    # per layer in Gemma 3n's files (MatFormer widths)
    "feed_forward_length": (lambda v: _is_int(v) or _list_of(_is_int)(v), "an integer or a list of integers"),
}


def check_field_types(metadata: dict[str, Any], where: str | Path) -> None:
    """`ModelLoadError` naming the first known key whose value has the wrong type."""
    architecture = metadata.get("general.architecture")
    architecture = architecture if isinstance(architecture, str) else ""
    for key, value in metadata.items():
        expected = FIELD_TYPES.get(key)
        if expected is None and architecture and key.startswith(architecture + "."):
            expected = ARCH_FIELD_TYPES.get(key[len(architecture) + 1:])
        if expected is not None and not expected[0](value):
            raise ModelLoadError(f"{where}: GGUF metadata {key} must be {expected[1]}, "
                                 f"not {type(value).__name__}")


def read_gguf_metadata(source: str | Path | GGUFReader, prefixes: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """Metadata keys starting with one of `prefixes`, as Python values (arrays become lists),
    the keys levante knows checked for their types (`FIELD_TYPES`)."""
    if isinstance(source, GGUFReader):
        metadata = {name: field.contents() for name, field in source.fields.items()
                    if name.startswith(prefixes) and not name.startswith("GGUF.")}
    else:
        try:
            with open(source, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                metadata = _parse(_Cursor(buffer), prefixes)
        except (OSError, ValueError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as error:
            raise ModelLoadError(f"cannot read GGUF file {source}: {' '.join(str(error).split())}") from None
    check_field_types(metadata, source)
    return metadata


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
            if name in metadata:
                raise ValueError(f"duplicate metadata key {name}")
            metadata[name] = value
    return metadata


MAX_ARRAY_DEPTH = 4


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

    def value(self, kind: GGUFValueType, depth: int = 0) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item_kind, count = self.unpack("<IQ")
            item_kind = GGUFValueType(item_kind)
            if item_kind in _SCALAR_FORMATS:
                dtype = np.dtype(_SCALAR_FORMATS[item_kind])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            if depth >= MAX_ARRAY_DEPTH:
                raise ValueError(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
            if count * 8 > len(self.buffer) - self.offset:  # every item takes 8 bytes at least
                raise ValueError("file is truncated (an array is longer than the rest of the file)")
            return [self.value(item_kind, depth + 1) for _ in range(count)]
        return self.unpack(_SCALAR_FORMATS[kind])[0]
