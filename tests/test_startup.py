"""What `levante serve` does before it is ready, kept short (benchmarks/serve_vs_llamacpp.py
--startup-only measures it beside llama.cpp's server): a GGUF's tokenizer is kept in the cache and
read back exactly, even while the imports run; nothing heavy is imported that serving does not use;
the llguidance tokenizer waits for the first constrained request."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tokenizer_refs import CORPUS, GGUF_ALIASES, gguf_path

from levante.loader import tokenizer as tokenizer_module
from levante.loader.tokenizer import Tokenizer


def _same(ours: Tokenizer, reference: Tokenizer) -> None:
    for text in CORPUS:
        assert ours.encode(text) == reference.encode(text)
        ids = reference.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == reference.decode(ids)
    for name in ("bos_token", "eos_token", "eos_token_ids", "chat_template", "all_special_ids", "vocab_size"):
        assert getattr(ours, name) == getattr(reference, name), name


@pytest.mark.parametrize("alias", GGUF_ALIASES)
def test_cached_gguf_tokenizer_reads_back_exactly(alias, tmp_path, monkeypatch):
    path = gguf_path(alias)
    built = Tokenizer.from_gguf(path, tmp_path)  # an empty cache: built from the metadata, then kept
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert len(saved) == 2 and saved[0].endswith(".json") and saved[1].endswith(".special.json")

    def no_rebuild(*args):
        raise AssertionError("rebuilt from the GGUF metadata although the cache holds it")

    monkeypatch.setattr(Tokenizer, "from_gguf_metadata", classmethod(no_rebuild))
    _same(Tokenizer.from_gguf(path, tmp_path), built)  # a 256k vocabulary is built once per test, not twice


def test_damaged_or_stale_tokenizer_entry_is_rebuilt(tmp_path):
    path = gguf_path("smollm2:135m")
    reference = Tokenizer.from_gguf_metadata(path)
    Tokenizer.from_gguf(path, tmp_path)
    (saved,) = [p for p in tmp_path.iterdir() if not p.name.endswith(".special.json")]
    saved.write_text("{not json")
    _same(Tokenizer.from_gguf(path, tmp_path), reference)
    assert saved.read_text().startswith("{") and saved.read_text() != "{not json"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]



def test_an_entry_for_a_changed_file_replaces_the_old_one(tmp_path):
    """A new key (the GGUF file, or levante, changed) writes a new entry; the old one is deleted
    (5 MB for a 150k vocabulary, never read again), as the weights' superseded entries are."""
    import shutil

    path = tmp_path / "model.gguf"
    shutil.copy(gguf_path("smollm2:135m"), path)
    cache = tmp_path / "cache"
    Tokenizer.from_gguf(path, cache)
    first = sorted(p.name for p in cache.iterdir())
    neighbour = cache / "model-q4_0-float32-0123456789abcdef.safetensors"  # another kind of entry: kept
    neighbour.write_bytes(b"")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    Tokenizer.from_gguf(path, cache)
    second = sorted(p.name for p in cache.iterdir() if p != neighbour)
    assert len(first) == len(second) == 2 and not set(first) & set(second) and neighbour.exists()


def test_tokenizer_read_ahead_is_taken_by_the_load(tmp_path):
    path = gguf_path("qwen2.5-coder:0.5b")
    Tokenizer.from_gguf(path, tmp_path)  # an earlier start kept it
    Tokenizer.read_ahead(path, tmp_path)
    (ahead,) = tokenizer_module._reading_ahead.values()
    loaded = Tokenizer.from_gguf(path, tmp_path)
    assert loaded is ahead.tokenizer and not tokenizer_module._reading_ahead
    _same(loaded, Tokenizer.from_gguf_metadata(path))


def _imported_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(run.stdout.split())


def test_the_package_loads_without_pytorch_and_the_server_without_jinja():
    # The tokenizer read ahead by `levante serve` needs neither.
    assert "torch" not in _imported_after("import levante, levante.errors, levante.loader.tokenizer")
    served = _imported_after("import levante.serve.server\nfrom levante import LLM, SamplingParams")
    assert "torch" in served and "jinja2" not in served  # templates compile and render in workers
    # The fetcher (httpx, httpcore, httpx's rich) and the MCP client load when first used.
    assert not {"httpx", "httpcore", "rich", "levante.net.fetch", "levante.mcp"} & served


def test_the_command_line_parses_before_pytorch_loads():
    # `levante --help`, and `levante serve` starting its tokenizer read-ahead and template worker
    # beside the PyTorch import rather than after it.
    assert "torch" not in _imported_after("import levante.cli\nlevante.cli.build_parser().parse_args(['serve'])")


def test_llguidance_tokenizer_waits_for_the_first_constrained_request(tiny_model):
    from levante import LLM, SamplingParams, StructuredOutput

    llm = LLM(str(tiny_model("qwen2")), dtype="float32", num_kv_blocks=32)  # warmed up, as a server is
    assert llm.engine.grammars._ll_tokenizer is None
    params = SamplingParams(temperature=0, max_tokens=8, structured=StructuredOutput("choice", ["yes", "no"]))
    assert llm.generate([[5, 6, 7]], params)[0].outputs[0].text in ("yes", "no")
    assert llm.engine.grammars._ll_tokenizer is not None
