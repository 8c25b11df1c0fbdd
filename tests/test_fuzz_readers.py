"""Hostile model files: each named case, then a bounded hypothesis run of tests/fuzz_readers.py
(`make fuzz` runs a longer one). Every malformed file must end in a one-line ModelLoadError."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fuzz_readers import (ARRAY, F32, HUGE, STRING, U32, U64, base_fields, base_tensors, load_gguf,
                          load_safetensors, write_gguf)
from levante.errors import ModelLoadError


def fields_with(**changes):
    """The base metadata with `key=(type, value)` replaced (None drops the key)."""
    fields = []
    for key, kind, value in base_fields():
        short = key.replace("llama.", "").replace(".", "_")
        if short in changes:
            if changes[short] is not None:
                fields.append((key, *changes[short]))
        else:
            fields.append((key, kind, value))
    return fields


def tensors_with(name, dims=None, kind=None):
    return [(n, dims if n == name and dims is not None else d, kind if n == name and kind is not None else k, p)
            for n, d, k, p in base_tensors()]


CASES = {
    "zero head count": dict(fields=fields_with(attention_head_count=(U32, 0))),
    "zero kv heads": dict(fields=fields_with(attention_head_count_kv=(U32, 0))),
    "zero layers": dict(fields=fields_with(block_count=(U32, 0))),
    "a billion layers": dict(fields=fields_with(block_count=(U32, 10**9))),
    "huge width": dict(fields=fields_with(embedding_length=(U64, 2**40))),
    "head count of the wrong type": dict(fields=fields_with(attention_head_count=(STRING, "two"))),
    "head count as an array": dict(fields=fields_with(attention_head_count=(ARRAY, (U32, [2, 2], None)))),
    "tokens of the wrong type": dict(fields=fields_with(**{"tokenizer_ggml_tokens": (ARRAY, (U32, [1, 2], None))})),
    "architecture as a number": dict(fields=fields_with(general_architecture=(U32, 7))),
    "duplicate key": dict(fields=base_fields() + [("llama.block_count", U32, 1)]),
    "alignment 0": dict(fields=base_fields() + [("general.alignment", U32, 0)]),
    "alignment not a power of two": dict(fields=base_fields() + [("general.alignment", U32, 48)]),
    "huge kv count": dict(counts=(11, 2**63)),
    "huge tensor count": dict(counts=(2**63, len(base_fields()))),
    "string length past the end": dict(fields=base_fields() + [("x", STRING, "y" * 4)], truncate=-2),
    "array count past the end": dict(fields=fields_with(**{"tokenizer_ggml_scores": (ARRAY, (F32, [0.0], 2**62))})),
    "huge n_dims": dict(n_dims={"token_embd.weight": 2**31}),
    "overflowing dimension product": dict(tensors=tensors_with("blk.0.attn_q.weight", [2**32, 2**32 + 1])),
    "zero dimension": dict(tensors=tensors_with("blk.0.attn_q.weight", [0, 32])),
    "unknown tensor type": dict(tensors=tensors_with("output_norm.weight", kind=99)),
    "offset past the end": dict(offsets={"blk.0.ffn_down.weight": 2**40}),
    "offset overflowing": dict(offsets={"blk.0.ffn_down.weight": 2**64 - 8}),
    "tensor shape not the config's": dict(tensors=tensors_with("blk.0.attn_q.weight", [32, 16])),
    "truncated tensor data": dict(truncate=-100),
}


@pytest.mark.parametrize("name", CASES)
def test_hostile_gguf(name, tmp_path):
    case = dict(CASES[name])
    truncate = case.pop("truncate", None)
    data = write_gguf(case.pop("fields", base_fields()), case.pop("tensors", base_tensors()), **case)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data[:truncate] if truncate else data)
    with pytest.raises(ModelLoadError) as error:
        load_gguf(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value) or "tensor" in str(error.value)


def test_the_base_file_loads(tmp_path):
    path = tmp_path / "base.gguf"
    path.write_bytes(write_gguf(base_fields(), base_tensors()))
    load_gguf(path)


@pytest.mark.parametrize("header, message", [
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}', "do not hold"),
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
     b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', "overlap|do not hold"),
    (b'{"a": {"dtype": "F32", "shape": [2147483648, 2147483648], "data_offsets": [0, 16]}}', "do not hold"),
    (b'{"a": {"dtype": "X7", "shape": [4], "data_offsets": [0, 16]}}', "unknown dtype"),
    (b'{"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}', "shape"),
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}', "do not hold"),
    (b'[1, 2]', "not a JSON object"),
    (b'{"__metadata__": [], "a": 1}', "__metadata__"),
])
def test_hostile_safetensors_headers(header, message, tmp_path):
    import struct

    from levante.loader.safetensors_header import map_safetensors

    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ModelLoadError, match=message):
        map_safetensors(path)
    with pytest.raises(ModelLoadError):  # and safetensors' own reader, for HF folders
        load_safetensors(path)
    for declared in HUGE[1:]:
        path.write_bytes(struct.pack("<Q", declared) + header)
        with pytest.raises(ModelLoadError):
            load_safetensors(path)


def test_bounded_fuzz_run():
    """300 structured hostile inputs per format, fixed (derandomized), under an 8 GB address-space
    limit: no input escapes as another error or exhausts memory."""
    script = Path(__file__).with_name("fuzz_readers.py")
    result = subprocess.run([sys.executable, "-W", "ignore", str(script), "--examples", "300", "--seed", "0"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gguf: 300 inputs" in result.stdout and "safetensors: 300 inputs" in result.stdout


def test_a_layer_count_past_the_files_layers_is_refused_at_once(tmp_path):
    """block_count is bounded by the layers whose tensors the file holds, before any per-layer list
    is built (a billion layers took minutes and gigabytes to refuse)."""
    from levante.loader.gguf import GGUFFile

    path = tmp_path / "hostile.gguf"
    path.write_bytes(write_gguf(fields_with(block_count=(U32, 10**9)), base_tensors()))
    with pytest.raises(ModelLoadError, match="block_count = 1000000000, the file holds tensors of"):
        GGUFFile(path).hf_config()
