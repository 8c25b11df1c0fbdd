"""Fuzzing the model-file readers with hypothesis: every malformed GGUF or safetensors file must end
in `ModelLoadError` with a one-line message (or load), in bounded time and memory.

Run as a script in its own process, under an address-space limit (a reader that allocates
without bound fails the run instead of the machine):

    python tests/fuzz_readers.py --examples 300 --seed 0     # the bounded run in `make test`
    python tests/fuzz_readers.py --examples 20000            # `make fuzz`: random seeds, longer

It prints what it tried and exits non-zero on the first input that escapes (saved to --out).
Inputs are structured: a valid tiny llama GGUF (or safetensors file) written field by field, with
fields drawn hostile (huge counts, string and array lengths, n_dims, overflowing dimension
products, alignment 0, duplicate keys, wrong value types for known keys, offsets past the end,
zero head counts), then optionally truncated or with bytes overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

# GGUF value types (gguf.GGUFValueType)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}
HUGE = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1]
TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + ["▁a", "▁b", "ab", "▁"]
HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 32, 2, 1, 64, len(TOKENS)


def _string(text: str | bytes, length: int | None = None) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data) if length is None else length) + data


def _value(kind: int, value) -> bytes:
    if kind == STRING:
        return _string(value)
    if kind == ARRAY:
        item_kind, items, count = value
        return struct.pack("<IQ", item_kind, len(items) if count is None else count) + b"".join(
            _value(item_kind, item) for item in items)
    return struct.pack(_SCALAR[kind], value)


def base_fields() -> list[tuple[str, int, object]]:
    """The metadata of a valid tiny llama model with a SentencePiece tokenizer."""
    return [
        ("general.architecture", STRING, "llama"),
        ("llama.block_count", U32, 1), ("llama.context_length", U32, 64), ("llama.embedding_length", U32, HIDDEN),
        ("llama.feed_forward_length", U32, FFN), ("llama.attention.head_count", U32, HEADS),
        ("llama.attention.head_count_kv", U32, KV_HEADS), ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.rope.freq_base", F32, 10000.0),
        ("tokenizer.ggml.model", STRING, "llama"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, TOKENS, None)),
        ("tokenizer.ggml.scores", ARRAY, (F32, [float(-i) for i in range(VOCAB)], None)),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [2, 3, 3] + [1] * (VOCAB - 3), None)),
        ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
    ]


def base_tensors() -> list[tuple[str, list[int], int, bytes]]:
    """(name, GGUF dims (fastest first), ggml type, data) of the same model, float32 (one Q8_0)."""
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": [HIDDEN, VOCAB], "output_norm.weight": [HIDDEN],
              "blk.0.attn_norm.weight": [HIDDEN], "blk.0.attn_q.weight": [HIDDEN, HIDDEN],
              "blk.0.attn_k.weight": [HIDDEN, KV_HEADS * HIDDEN // HEADS],
              "blk.0.attn_v.weight": [HIDDEN, KV_HEADS * HIDDEN // HEADS], "blk.0.attn_output.weight": [HIDDEN, HIDDEN],
              "blk.0.ffn_norm.weight": [HIDDEN], "blk.0.ffn_gate.weight": [HIDDEN, FFN],
              "blk.0.ffn_down.weight": [FFN, HIDDEN]}
    tensors = [(name, dims, 0, rng.standard_normal(int(np.prod(dims))).astype(np.float32).tobytes())
               for name, dims in shapes.items()]
    q8 = b"".join(struct.pack("<e", 0.01) + rng.integers(-127, 128, 32, dtype=np.int8).tobytes()
                  for _ in range(FFN * HIDDEN // 32))
    return tensors + [("blk.0.ffn_up.weight", [HIDDEN, FFN], 8, q8)]


def write_gguf(fields, tensors, *, alignment: int = 32, counts: tuple | None = None,
               offsets: dict | None = None, n_dims: dict | None = None, version: int = 3) -> bytes:
    kv = b"".join(_string(key) + struct.pack("<I", kind) + _value(kind, value) for key, kind, value in fields)
    infos, data, position = b"", b"", 0
    for name, dims, kind, payload in tensors:
        position = -(-position // max(alignment, 1)) * max(alignment, 1)
        offset = (offsets or {}).get(name, position)
        declared = (n_dims or {}).get(name, len(dims))
        infos += _string(name) + struct.pack("<I", declared & 0xFFFFFFFF) + struct.pack(f"<{len(dims)}Q", *dims) + \
            struct.pack("<IQ", kind & 0xFFFFFFFF, offset)
        data += b"\0" * (position - len(data)) + payload
        position = len(data)
    tensor_count, kv_count = counts or (len(tensors), len(fields))
    head = b"GGUF" + struct.pack("<IQQ", version & 0xFFFFFFFF, tensor_count, kv_count) + kv + infos
    return head + b"\0" * (-len(head) % max(alignment, 1)) + data


# -- hostile variations -----------------------------------------------------------------------------

KNOWN_KEYS = [key for key, _, _ in base_fields()] + ["general.alignment", "llama.attention.key_length",
                                                      "llama.vocab_size", "tokenizer.ggml.merges",
                                                      "tokenizer.chat_template", "llama.rope.scaling.type"]


@st.composite
def field_edits(draw, fields):
    """Replace, retype, duplicate or add metadata fields."""
    fields = list(fields)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(KNOWN_KEYS) | st.text(min_size=0, max_size=8))
        kind = draw(st.sampled_from([U8, I32, U32, U64, I64, F32, F64, BOOL, STRING, ARRAY]))
        if kind == STRING:
            value = draw(st.text(max_size=12))
        elif kind == ARRAY:
            item = draw(st.sampled_from([U8, I32, F32, STRING, ARRAY, U64]))
            items = draw(st.lists(st.just([]) if item == ARRAY else st.text(max_size=4) if item == STRING else
                                  st.integers(0, 3), max_size=4))
            value = (item, [(U8, [], None) for _ in items] if item == ARRAY else items, None)
        elif kind in (F32, F64):
            value = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
        elif kind == BOOL:
            value = draw(st.booleans())
        else:
            low, high = {U8: (0, 255), I32: (-2**31, 2**31 - 1), U32: (0, 2**32 - 1)}.get(kind, (0, 2**63 - 1))
            value = draw(st.sampled_from([v for v in HUGE if low <= v <= high] + [0, 1, 3]))
        action = draw(st.sampled_from(["replace", "add", "duplicate"]))
        matches = [i for i, (k, _, _) in enumerate(fields) if k == key]
        if action == "replace" and matches:
            fields[matches[0]] = (key, kind, value)
        elif action == "duplicate" and fields:
            fields.append(fields[draw(st.integers(0, len(fields) - 1))])
        else:
            fields.append((key, kind, value))
    return fields


@st.composite
def gguf_files(draw) -> bytes:
    fields, tensors = draw(field_edits(base_fields())), base_tensors()
    options: dict = {}
    if draw(st.booleans()):  # tensor shapes: huge, overflowing products, zeros, wrong counts
        index = draw(st.integers(0, len(tensors) - 1))
        name, dims, kind, payload = tensors[index]
        dims = draw(st.lists(st.sampled_from(HUGE + [3, 8, 16]), min_size=1, max_size=5))
        tensors[index] = (name, dims, draw(st.sampled_from([kind, 0, 1, 8, 12, 99, 2**31])), payload)
    if draw(st.booleans()):
        name = draw(st.sampled_from([t[0] for t in tensors]))
        choice = draw(st.sampled_from(["offset", "n_dims", "drop", "duplicate"]))
        if choice == "offset":
            options["offsets"] = {name: draw(st.sampled_from(HUGE + [1, 7]))}
        elif choice == "n_dims":
            options["n_dims"] = {name: draw(st.sampled_from(HUGE + [5, 17]))}
        elif choice == "drop":
            tensors = [t for t in tensors if t[0] != name]
        else:
            tensors.append(next(t for t in tensors if t[0] == name))
    if draw(st.integers(0, 5)) == 0:
        options["counts"] = (draw(st.sampled_from(HUGE)), draw(st.sampled_from(HUGE)))
    if draw(st.integers(0, 5)) == 0:
        options["alignment"] = draw(st.sampled_from([1, 8, 64]))
        fields.append(("general.alignment", U32, draw(st.sampled_from([0, 3, 48, 2**31]))))
    if draw(st.integers(0, 8)) == 0:
        options["version"] = draw(st.sampled_from([0, 1, 2, 4, 2**31]))
    data = write_gguf(fields, tensors, **options)
    return mutate(draw, data)


def mutate(draw, data: bytes) -> bytes:
    """Sometimes truncate, sometimes overwrite a few bytes with extreme values."""
    if draw(st.integers(0, 3)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 3)) if draw(st.booleans()) else 0):
        if not data:
            break
        where = draw(st.integers(0, len(data) - 1))
        patch = draw(st.sampled_from([b"\xff" * 8, b"\0" * 8, struct.pack("<Q", 2**63), struct.pack("<I", 2**31),
                                      bytes([draw(st.integers(0, 255))])]))
        data = data[:where] + patch + data[where + len(patch):]
    return data


@st.composite
def safetensors_files(draw) -> bytes:
    """A small safetensors file, its JSON header drawn hostile (dtypes, shapes, offsets, sizes)."""
    tensors = {"embeddings.word_embeddings.weight": ("F32", [4, 2]), "pooler.dense.bias": ("F32", [2])}
    header, position = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(list(tensors)))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        header[name][key] = draw(st.sampled_from(["F32", "BF16", "I64", "X9", 3, None, [], [2**63, 2**63],
                                                  [-1, 4], [0, 2**40], [8, 4], [2**31, 2**31, 2**31], "",
                                                  {"a": 1}, [1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 0]]))
    if draw(st.integers(0, 4)) == 0:
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"a": 1}, [], "x", None]))
    text = json.dumps(header).encode()
    if draw(st.integers(0, 4)) == 0:
        text = draw(st.sampled_from([b"{", b"[]", b"null", b"\xff\xfe", b'{"a":' * 50000, text + b"x"]))
    declared = len(text) if draw(st.integers(0, 4)) else draw(st.sampled_from(HUGE + [len(text) + 1, 3]))
    data = struct.pack("<Q", declared) + text + b"\0" * position
    return mutate(draw, data)


# -- the targets ----------------------------------------------------------------------------------------

def load_gguf(path: Path) -> None:
    """What `levante` does with a GGUF before serving: open, config, tokenizer, model, weights."""
    import torch

    from levante.loader.auto import open_model
    from levante.models.registry import build_model, load_weights

    source = open_model(str(path))
    source.tokenizer()
    model = build_model(source.config, torch.float32, torch.device("cpu"))
    load_weights(model, source.weights(quantized=True), "auto")


def load_safetensors(path: Path) -> None:
    """The safetensors readers: an HF folder's weights, and the prepared-weights cache's header."""
    from levante.loader import hf
    from levante.loader.safetensors_header import map_safetensors

    for _name, tensor in hf.named_tensors(path.parent):
        tensor.sum()
    for tensor in map_safetensors(path)[0].values():
        tensor.sum()


def check(target, data: bytes, folder: Path, suffix: str, failures: list, stats: dict) -> None:
    from levante.errors import ModelLoadError

    path = folder / f"model{suffix}"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        target(path)
        stats["loaded"] += 1
    except ModelLoadError as error:
        stats["refused"] += 1
        if "\n" in str(error) or not str(error):
            failures.append((data, f"ModelLoadError message is not one line: {str(error)!r}"))
    except Exception as error:  # noqa: BLE001 - exactly what the fuzzer looks for
        failures.append((data, "".join(traceback.format_exception_only(type(error), error)).strip() + "\n" +
                         "".join(traceback.format_tb(error.__traceback__)[-3:])))
    stats["slowest"] = max(stats["slowest"], time.perf_counter() - start)
    stats["tried"] += 1
    if failures:
        raise AssertionError(failures[-1][1])


def run(kind: str, examples: int, random_seed: int | None, out: Path) -> int:
    target, strategy, suffix = {"gguf": (load_gguf, gguf_files(), ".gguf"),
                                "safetensors": (load_safetensors, safetensors_files(), ".safetensors")}[kind]
    failures: list = []
    stats = {"tried": 0, "loaded": 0, "refused": 0, "slowest": 0.0}
    with tempfile.TemporaryDirectory() as folder:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=random_seed is not None,
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(strategy)
        def fuzz(data):
            check(target, data, Path(folder), suffix, failures, stats)

        if random_seed is not None:
            fuzz = seed(random_seed)(fuzz)
        try:
            fuzz()
        except AssertionError:
            pass
    print(f"{kind}: {stats['tried']} inputs, {stats['loaded']} loaded, {stats['refused']} refused with "
          f"ModelLoadError, {len(failures) and 1} escaped; slowest {stats['slowest'] * 1000:.0f} ms")
    if failures:
        data, why = min(failures, key=lambda f: len(f[0]))
        out.write_bytes(data)
        print(f"escaped ({len(data)} bytes, saved to {out}):\n{why}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None, help="fixed inputs (the test); random without")
    parser.add_argument("--kinds", nargs="+", default=["gguf", "safetensors"])
    parser.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit of this process")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "levante-fuzz-failure.bin")
    args = parser.parse_args()
    import torch  # noqa: F401 - imported before the limit: its own mappings are not the readers' doing

    limit = int(args.memory_gb * (1 << 30))
    used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + limit, used + limit))
    torch.set_num_threads(1)
    return max(run(kind, args.examples, args.seed, args.out) for kind in args.kinds)


if __name__ == "__main__":
    sys.exit(main())
