"""Prepared weights (loader/prepared.py): the second load of a GGUF maps what the first one
packed, and runs the same model; a damaged or foreign cache entry is ignored."""
from __future__ import annotations

import os
import shutil

import pytest

from levante import LLM, SamplingParams
from levante.loader.sources import is_installed, resolve_alias

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
PROMPT = [1, 504, 3458, 282, 4273, 314]


@pytest.fixture
def gguf_path(tmp_path, monkeypatch):
    if not is_installed("smollm2:135m"):
        pytest.skip("smollm2:135m not installed")
    path = resolve_alias("smollm2:135m")  # before the cache moves: packaged models live there too
    monkeypatch.setenv("LEVANTE_CACHE", str(tmp_path / "cache"))
    return path


def run(llm: LLM):
    out = llm.generate([PROMPT], PARAMS)[0].outputs[0]
    return out.token_ids, [{t: lp.logprob for t, lp in step.items()} for step in out.logprobs]


def test_second_load_maps_the_prepared_weights(gguf_path, tmp_path):
    first = LLM(str(gguf_path), warmup=False)
    assert first.engine.loaded_from == gguf_path
    prepared = list((tmp_path / "cache" / "prepared").glob("*.safetensors"))
    assert len(prepared) == 1
    second = LLM(str(gguf_path), warmup=False)
    assert second.engine.loaded_from == prepared[0]
    assert run(first) == run(second)  # same tokens, bit-identical logprobs


def test_damaged_entry_is_ignored(gguf_path, tmp_path):
    expected = run(LLM(str(gguf_path), warmup=False))
    (prepared,) = (tmp_path / "cache" / "prepared").glob("*.safetensors")
    prepared.write_bytes(prepared.read_bytes()[:1000])
    again = LLM(str(gguf_path), warmup=False)
    assert again.engine.loaded_from == gguf_path
    assert run(again) == expected


@pytest.mark.slow
def test_other_quantization_gets_its_own_entry_and_cache_can_be_off(gguf_path, tmp_path):
    LLM(str(gguf_path), warmup=False, quantization="int8", prepared_cache=False)
    assert not (tmp_path / "cache" / "prepared").exists()
    LLM(str(gguf_path), warmup=False)
    int8 = LLM(str(gguf_path), warmup=False, quantization="int8")
    assert int8.engine.loaded_from == gguf_path  # the "auto" entry is not the int8 one
    assert len(list((tmp_path / "cache" / "prepared").glob("*.safetensors"))) == 2


@pytest.mark.slow
def test_changed_checkpoint_gets_a_new_entry_that_replaces_the_old(gguf_path, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(gguf_path, copy)
    LLM(str(copy), warmup=False)
    (first,) = (tmp_path / "cache" / "prepared").glob("*.safetensors")
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    assert LLM(str(copy), warmup=False).engine.loaded_from == copy
    (second,) = (tmp_path / "cache" / "prepared").glob("*.safetensors")
    assert second != first
