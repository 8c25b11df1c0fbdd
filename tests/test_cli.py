"""The CLI answers bad input with one line that names the problem, never a traceback."""
import json
import subprocess
import sys

import pytest


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "levante", *args], capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(result, *needles):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_path():
    _assert_one_line_error(_run("run", "-m", "/no/such/model", "hi"), "/no/such/model", "not found")


def test_corrupt_and_truncated_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 100)
    _assert_one_line_error(_run("run", "-m", str(junk), "hi"), "junk.gguf")
    from levante.loader.sources import resolve_alias

    real = resolve_alias("smollm2:135m").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(real[: len(real) // 2])
    _assert_one_line_error(_run("run", "-m", str(cut), "hi"), "cut.gguf", "truncated")


def test_unsupported_architecture(tmp_path, tiny_model):
    folder = tmp_path / "weird"
    folder.mkdir()
    config = json.loads((tiny_model("llama") / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    _assert_one_line_error(_run("run", "-m", str(folder), "hi"), "FrobnicatorForCausalLM", "LlamaForCausalLM")


def test_prompt_longer_than_context(tiny_model):
    result = _run("run", "-m", str(tiny_model("llama")), "--dtype", "float32", "--max-model-len", "16",
                  "--raw", "word " * 40)
    _assert_one_line_error(result, "context")


@pytest.mark.slow
def test_run_streams_the_default_model():
    result = _run("run", "--max-tokens", "48", "--temperature", "0",
                  "Write a Python function add(a, b) that returns the sum.", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "def add(a, b):" in result.stdout


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_checks_the_model_before_the_port_opens():
    result = _run("serve", "-m", "/no/such/model", "--port", str(_free_port()))
    _assert_one_line_error(result, "/no/such/model", "not found")  # one line: uvicorn never started


def test_serve_exits_when_loading_fails(tmp_path, tiny_model):
    """A model that resolves but cannot load (its weights cut short): the server stops, exit 1, one error line."""
    import shutil

    folder = tmp_path / "cut"
    shutil.copytree(tiny_model("llama"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    result = _run("serve", "-m", str(folder), "--port", str(_free_port()), "--dtype", "float32")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("levante: ")]  # uvicorn's aside
    errors = [line for line in lines if line.startswith("levante: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "could not be loaded" in errors[0], result.stderr


def test_bad_lora_flags(tiny_model, tmp_path):
    model = str(tiny_model("llama"))
    _assert_one_line_error(_run("run", "-m", model, "--lora", "no-equals-sign", "hi"), "--lora", "NAME=PATH")
    _assert_one_line_error(_run("run", "-m", model, "--lora", f"x={tmp_path / 'nowhere'}", "hi"),
                           "nowhere", "not a folder")


def test_bench_names_the_cpu_kernels(tiny_model):
    from levante.kernels import native

    result = _run("bench", "-m", str(tiny_model("qwen2")), "--isq", "int8", "--prompt-tokens", "16",
                  "--gen-tokens", "4", "--runs", "1", timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"CPU kernels {native.variant()}," in result.stdout


def test_a_cpu_isa_this_cpu_cannot_run_is_one_line(tiny_model):
    """LEVANTE_CPU_ISA naming another architecture's variant (one always exists): refused, saying why."""
    import os

    from levante.kernels import isa

    foreign = next(name for name in isa.VARIANTS if isa.missing(name) is not None)
    result = subprocess.run([sys.executable, "-m", "levante", "run", "-m", str(tiny_model("qwen2")), "--isq", "int8",
                             "--max-tokens", "2", "hi"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LEVANTE_CPU_ISA": foreign})
    _assert_one_line_error(result, f"LEVANTE_CPU_ISA={foreign}", isa.missing(foreign))
