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


@pytest.mark.slow
def test_entry_written_with_native_kernels_loads_without_them(gguf_path, tmp_path):
    """The native kernels' layouts and PyTorch's differ (and PyTorch's int4 packing exists on some CPUs
    only): a process where the kernels are off (LEVANTE_NATIVE_KERNELS=0) never reads the native entry
    in a layout it cannot run; it writes and maps an entry of its own, beside the native one, with the
    same greedy tokens as packing the GGUF itself."""
    import subprocess
    import sys

    from levante.kernels import native

    if not native.available():
        pytest.skip("native kernels unavailable")
    LLM(str(gguf_path), warmup=False)
    (prepared,) = (tmp_path / "cache" / "prepared").glob("*.safetensors")
    code = (
        "import sys\n"
        "from levante import LLM, SamplingParams\n"
        "from levante.kernels import native\n"
        "assert native.library() is None\n"
        f"params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)\n"
        f"written = LLM({str(gguf_path)!r}, warmup=False)\n"
        f"assert written.engine.loaded_from is None or str(written.engine.loaded_from) != {str(prepared)!r}\n"
        f"mapped = LLM({str(gguf_path)!r}, warmup=False)\n"
        f"assert mapped.engine.loaded_from is not None and str(mapped.engine.loaded_from) != {str(prepared)!r}\n"
        f"fresh = LLM({str(gguf_path)!r}, warmup=False, prepared_cache=False)\n"
        f"a = mapped.generate([{PROMPT}], params)[0].outputs[0].token_ids\n"
        f"b = fresh.generate([{PROMPT}], params)[0].outputs[0].token_ids\n"
        "assert a == b, (a, b)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "LEVANTE_NATIVE_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    assert prepared.is_file() and len(list((tmp_path / "cache" / "prepared").glob("*.safetensors"))) == 2


def _entry(tmp_path):
    (prepared,) = (tmp_path / "cache" / "prepared").glob("*.safetensors")
    return prepared


def test_a_changed_entry_is_rebuilt(gguf_path, tmp_path):
    """Same size, one byte changed: its SHA-256 no longer matches the stamp, so it is not mapped."""
    import time

    expected = run(LLM(str(gguf_path), warmup=False))
    prepared = _entry(tmp_path)
    time.sleep(0.05)  # past the file system's coarse clock tick: the change time moves
    with prepared.open("r+b") as stream:
        stream.seek(prepared.stat().st_size // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))
    again = LLM(str(gguf_path), warmup=False)
    assert again.engine.loaded_from == gguf_path  # rebuilt from the checkpoint
    assert run(again) == expected
    assert LLM(str(gguf_path), warmup=False).engine.loaded_from == _entry(tmp_path)  # and saved anew


def test_an_entry_with_hostile_shapes_is_refused_before_any_kernel_reads_it(gguf_path, tmp_path):
    """A well-formed, correctly stamped entry whose packed weights claim more rows than their tensors
    hold (what a forged cache would do to make a kernel read past them): refused, rebuilt."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from levante.loader import integrity
    from levante.loader.prepared import _stamp_path

    expected = run(LLM(str(gguf_path), warmup=False))
    prepared = _entry(tmp_path)
    with safe_open(str(prepared), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        packed = json.loads(f.metadata()["levante_packed"])
    for entry in packed.values():
        if "shape" in entry:
            entry["shape"][0] *= 64
        if "rows" in entry:
            entry["rows"] *= 64
    save_file(tensors, str(prepared), metadata={"levante_packed": json.dumps(packed)})
    integrity.stamp(prepared, integrity.sha256_file(prepared), _stamp_path(prepared))
    again = LLM(str(gguf_path), warmup=False)
    assert again.engine.loaded_from == gguf_path
    assert run(again) == expected
