"""Hostile LoRA adapters are refused from their header and adapter_config.json, before a tensor is
read (loader/lora.py): a rank past --max-lora-rank, a matrix that does not fit the model's layer,
a dtype that is no float, a pattern Python's `re` would take years on. The files are sparse: they
declare hundreds of MB that a reader would have to page in, and take no disk. Over HTTP, the
`(a+)+b` adapter is refused (or, where its patterns name nothing hostile, loaded) while a stream
beside it goes on (the reading happens off the engine's thread).
"""
from __future__ import annotations

import json
import shutil
import struct
import time

import httpx
import pytest

from levante import LLM
from levante.errors import ModelLoadError
from levante.loader.lora import read_adapter
from levante.models.registry import lora_shapes
from levante.user_regex import compile_user_regex
from live_server import Bystander, live_server
from rss import peak_growth
from tiny_lora import ATTENTION, build_adapter

MIB = 1 << 20
HANG = 10.0  # a refusal takes milliseconds: only a hang or a whole read reaches this
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
PREFIX = "base_model.model.model.layers.0.self_attn"


def write_adapter(folder, tensors: dict[str, tuple[str, list[int]]], **config):
    """A PEFT folder whose safetensors holds `tensors` (name -> (dtype, shape)), all zeros and sparse:
    the header is written, the data is a hole the file is extended over."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8, **config}))
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = SIZES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(folder / "adapter_model.safetensors", "wb") as stream:
        stream.write(struct.pack("<Q", len(raw)) + raw)
        stream.truncate(8 + len(raw) + offset)
    return folder


def pair(module: str, rank: int, out: int, features: int, dtype: str = "F32") -> dict:
    return {f"{PREFIX}.{module}.lora_A.weight": (dtype, [rank, features]),
            f"{PREFIX}.{module}.lora_B.weight": (dtype, [out, rank])}


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama")), dtype="float32", num_kv_blocks=64, max_lora_rank=8)


def refused_from_the_header(llm, folder, message):
    """The adapter is refused with `message`, and its data is never paged in."""
    started = time.perf_counter()
    growth, error = peak_growth(lambda: read_adapter(folder, 8, lora_shapes(llm.engine.model)))
    elapsed = time.perf_counter() - started
    size = (folder / "adapter_model.safetensors").stat().st_size
    print(f"\n{folder.name}: {size / MIB:.0f} MiB declared, refused in {elapsed * 1000:.1f} ms, "
          f"peak RSS +{growth / MIB:.1f} MiB")
    assert isinstance(error, ModelLoadError), error
    assert message in str(error) and "\n" not in str(error)
    assert growth < 16 * MIB and elapsed < HANG


def test_a_rank_100000_adapter_is_refused_unread(llm, tmp_path):
    modules = {}
    for name in ATTENTION:  # ~230 MB of float32, as the adapter
        modules.update(pair(name, 100_000, 64, 64))
    folder = write_adapter(tmp_path / "rank-100000", modules, r=100_000)
    refused_from_the_header(llm, folder, "has rank 100000 (at 'model.layers.0.self_attn.q_proj'), above the limit of 8")


def test_a_matrix_that_does_not_fit_the_model_is_refused_unread(llm, tmp_path):
    folder = write_adapter(tmp_path / "wide", pair("q_proj", 4, 64, 8_000_000), r=4)
    refused_from_the_header(llm, folder, "'model.layers.0.self_attn.q_proj' adapts a 64 x 8000000 matrix (B rows x "
                                         "A columns); the model's is 64 x 64")
    folder = write_adapter(tmp_path / "nowhere", {
        "base_model.model.lm_head.lora_A.weight": ("F32", [4, 64]),
        "base_model.model.lm_head.lora_B.weight": ("F32", [10_000_000, 4])}, r=4)
    refused_from_the_header(llm, folder, "changes 'lm_head', which is not a linear layer of the decoder")


@pytest.mark.parametrize("tensors, config, message", [
    (pair("q_proj", 4, 64, 64, dtype="I64"), {"r": 4}, "is torch.int64 (4, 64), not a 2-D floating-point matrix"),
    ({f"{PREFIX}.q_proj.lora_A.weight": ("F32", [4, 64, 64])}, {"r": 4}, "not a 2-D floating-point matrix"),
    ({f"{PREFIX}.q_proj.lora_A.weight": ("F32", [4, 64])}, {"r": 4}, "lacks its lora_B weight"),
    (pair("q_proj", 4, 64, 64), {"r": "4"}, "r = '4' is not a positive integer"),
    (pair("q_proj", 4, 64, 64), {"r": 4, "lora_alpha": "x"}, "lora_alpha = 'x' is not a number"),
    (pair("q_proj", 4, 64, 64), {"r": 4, "rank_pattern": {"q_proj": True}}, "is not a positive integer"),
    (pair("q_proj", 4, 64, 64), {"r": 4, "rank_pattern": {f"p{i}": 2 for i in range(2000)}}, "at most 1024 patterns"),
    (pair("q_proj", 4, 64, 64), {"r": 4, "alpha_pattern": {"(?<=x)q": 2}}, "invalid regular expression"),
    (pair("q_proj", 4, 64, 64), {"r": 4, "target_modules": ["k_proj"]}, "its target_modules do not name it"),
    (pair("q_proj", 2, 64, 64), {"r": 4}, "not rank 4"),
    (pair("q_proj", 4, 64, 64), {"r": 4, "use_dora": True}, "DoRA (use_dora) is not supported"),
])
def test_hostile_headers_and_configs(llm, tmp_path, tensors, config, message):
    refused_from_the_header(llm, write_adapter(tmp_path / "hostile", tensors, **config), message)


def test_catastrophic_patterns_run_in_linear_time(llm, tmp_path):
    """`(a+)+b` against 34 a's takes Python's `re` ~2^34 steps; RE2 one pass, whatever the length."""
    pattern = compile_user_regex("(.*\\.)?((a+)+b)$", "test")
    assert pattern.match("x." + "a" * 100_000) is None
    hostile = "a" * 34
    tensors = {f"base_model.model.{hostile}.lora_A.weight": ("F32", [4, 64]),
               f"base_model.model.{hostile}.lora_B.weight": ("F32", [64, 4])}
    folder = write_adapter(tmp_path / "redos", tensors, r=4, rank_pattern={"(a+)+b": 4},
                           alpha_pattern={"(a+)+b": 4}, target_modules="((a+)+b)|(a+)+")
    refused_from_the_header(llm, folder, f"changes '{hostile}', which is not a linear layer of the decoder")


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("redos-adapters")
    plain = build_adapter(tiny_model("llama"), root / "plain", seed=1, r=4, lora_alpha=8, target_modules=ATTENTION)
    patterned = shutil.copytree(plain, root / "patterned")  # the same weights; patterns that name nothing hostile
    config = json.loads((plain / "adapter_config.json").read_text())
    (patterned / "adapter_config.json").write_text(json.dumps({
        **config, "rank_pattern": {"(a+)+b": 4}, "alpha_pattern": {"(a+)+b": 99},
        "target_modules": "((a+)+b)|(.*\\.(q|k|v|o)_proj)"}))
    hostile = "a" * 34
    redos = write_adapter(root / "redos", {f"base_model.model.{hostile}.lora_A.weight": ("F32", [4, 64]),
                                           f"base_model.model.{hostile}.lora_B.weight": ("F32", [64, 4])},
                          r=4, rank_pattern={"(a+)+b": 4}, target_modules="((a+)+b)|(a+)+")
    return plain, patterned, redos


def test_the_redos_adapter_over_http_beside_a_stream(tiny_model, adapters):
    plain, patterned, redos = adapters
    llm = LLM(str(tiny_model("llama")), dtype="float32", num_kv_blocks=128, lora={"plain": str(plain)})
    auth = {"Authorization": "Bearer k"}
    with live_server(llm, "tiny", api_key="k") as (base, _):
        load = f"{base}/v1/load_lora_adapter"
        with Bystander(base, "tiny", headers=auth) as bystander:
            attacked, started = time.monotonic(), time.perf_counter()
            refused = httpx.post(load, json={"lora_name": "redos", "lora_path": str(redos)}, headers=auth, timeout=60)
            loaded = httpx.post(load, json={"lora_name": "patterned", "lora_path": str(patterned)}, headers=auth,
                                timeout=60)
            elapsed = time.perf_counter() - started
            assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        assert bystander.flowed_since(attacked)  # it went on after the attacks, to its end
        print(f"\nthe (a+)+b adapters: refused and loaded in {elapsed * 1000:.0f} ms beside a stream")
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
        assert "not a linear layer of the decoder" in refused.json()["error"]["message"]
        assert loaded.status_code == 200, loaded.text
        assert elapsed < HANG
        prompt = {"prompt": [5, 17, 42, 99, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        answers = [httpx.post(f"{base}/v1/completions", json={"model": name, **prompt}, headers=auth).json()
                   ["choices"][0]["text"] for name in ("plain", "patterned")]
        assert answers[0] == answers[1]  # the patterns named nothing: the same adapter
