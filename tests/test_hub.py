"""Models by Hub name, through huggingface_hub against a fake Hub on loopback (tests/fake_hub.py).

Nothing here reaches the internet: every test points HF_ENDPOINT at the fake Hub (conftest sets an
unreachable loopback endpoint for all the others) and HF_HUB_CACHE at a fresh folder.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from fake_hub import FakeHub
from levante import LLM, SamplingParams
from levante.cli import main
from levante.errors import ModelLoadError
from levante.loader.auto import resolve_path
from levante.loader.hub import HubName, parse_hub_name, pick_gguf
from tiny_models import build

JUNK = {"README.md": b"# tiny\n", "pytorch_model.bin": b"pickle" * 100,
        "original/consolidated.safetensors": b"x" * 5000, "stray.safetensors": b"not in the index"}


def write_tiny_llama_gguf(path, seed: int):
    """A whole one-layer llama GGUF (float32) with a SentencePiece vocabulary: small, and loadable."""
    rng = np.random.default_rng(seed)
    pieces = ["▁", "a", "b", "c", "▁a", "ab", "bc", "▁ab", "abc", "▁abc"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [(writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 16), (writer.add_head_count, 2),
                       (writer.add_head_count_kv, 1), (writer.add_layer_norm_rms_eps, 1e-6),
                       (writer.add_tokenizer_model, "llama"), (writer.add_token_list, tokens),
                       (writer.add_token_scores, [0.0] * 259 + [-float(i) for i in range(len(pieces))]),
                       (writer.add_token_types, [2, 3, 3, *[6] * 256, *[1] * len(pieces)]),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2), (writer.add_unk_token_id, 0)]:
        add(value)
    shapes = {"token_embd.weight": (len(tokens), 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8),
              "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-repos")
    sharded = build("llama", root / "llama")
    from tiny_models import load_reference

    reference = load_reference(sharded)
    reference.save_pretrained(root / "sharded", max_shard_size="200KB")  # four shards and an index
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (root / "sharded" / name).write_bytes((sharded / name).read_bytes())
    older = build("qwen2", root / "qwen2")
    ggufs = {f"tiny-{q}.gguf": write_tiny_llama_gguf(root / f"tiny-{q}.gguf", seed)
             for seed, q in enumerate(["Q4_K_M", "Q8_0", "F16"])}
    return root / "sharded", older, ggufs


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    sharded, older, ggufs = repos
    with FakeHub() as fake:
        fake.add_folder("tiny/qwen-like", older, branch="v1")
        fake.add_folder("tiny/llama", sharded, **JUNK)  # main: the sharded llama, and files it does not need
        fake.repos["tiny/llama"].branches["v1"] = fake.repos["tiny/qwen-like"].branches["v1"]
        fake.repos["tiny/llama"].commits.update(fake.repos["tiny/qwen-like"].commits)
        fake.add("tiny/gguf", {**{name: p.read_bytes() for name, p in ggufs.items()}, "README.md": b"ggufs"})
        fake.add("tiny/private", {"config.json": b"{}"}, token="good-token")
        fake.add("tiny/gated", {"config.json": b"{}"})
        fake.repos["tiny/gated"].gated = True
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        for name in ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"]:
            monkeypatch.delenv(name, raising=False)
        yield fake


def test_names():
    assert parse_hub_name("Qwen/Qwen2.5-0.5B-Instruct") == HubName("Qwen/Qwen2.5-0.5B-Instruct")
    assert parse_hub_name("org/name@v1.0:Q4_K_M") == HubName("org/name", "v1.0", "Q4_K_M")
    assert parse_hub_name("org/name:model-q8_0.gguf") == HubName("org/name", None, "model-q8_0.gguf")
    for not_hub in ["./org/name", "/abs/path", "~/models/x", "a/b/c", "name", "org/../x", "qwen2.5-coder:0.5b"]:
        assert parse_hub_name(not_hub) is None, not_hub


def test_gguf_file_choice():
    files = ["m-Q4_K_M.gguf", "m-q8_0.gguf", "m-Q4_K_S.gguf", "mmproj-m-f16.gguf", "README.md"]
    name = HubName("o/m")
    assert pick_gguf(files, None, name) == "m-Q4_K_M.gguf"
    assert pick_gguf(files, "Q8_0", name) == "m-q8_0.gguf"
    assert pick_gguf(files, "q4_k_s", name) == "m-Q4_K_S.gguf"
    assert pick_gguf(files, "m-q8_0.gguf", name) == "m-q8_0.gguf"
    with pytest.raises(ModelLoadError, match="no GGUF file for :Q2_K; its GGUF files: m-Q4_K_M.gguf"):
        pick_gguf(files, "Q2_K", name)
    with pytest.raises(ModelLoadError, match="split into several GGUF files"):
        pick_gguf(["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"], "Q8_0", name)


def test_sharded_model_downloads_only_what_it_needs(hub, repos):
    sharded = repos[0]
    llm = LLM("tiny/llama", dtype="float32", num_kv_blocks=32)
    local = LLM(str(sharded), dtype="float32", num_kv_blocks=32)
    prompt = [5, 9, 77, 120, 31, 8]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert llm.generate(prompt, greedy)[0].outputs[0].token_ids == local.generate(prompt, greedy)[0].outputs[0].token_ids
    fetched = hub.downloads()
    assert sorted(fetched) == sorted(p.name for p in sharded.iterdir())  # each file once, no junk
    assert sum(name.startswith("model-0000") for name in fetched) == 4
    hub.requests.clear()
    LLM("tiny/llama", dtype="float32", num_kv_blocks=32, warmup=False)  # a second process-local load
    assert hub.downloads() == []


def test_revision_and_commit(hub):
    assert LLM("tiny/llama@v1", dtype="float32", num_kv_blocks=16).engine.model_config.architecture == \
        "Qwen2ForCausalLM"
    sha = hub.repos["tiny/llama"].branches["main"]
    _, path = resolve_path(f"tiny/llama@{sha}")
    assert path.name == sha and (path / "model.safetensors.index.json").is_file()
    with pytest.raises(ModelLoadError, match="'tiny/llama' has no revision 'v9'"):
        resolve_path("tiny/llama@v9")


def test_gguf_repo_by_quantization_and_by_file(hub):
    _, path = resolve_path("tiny/gguf:q8_0")
    assert path.name == "tiny-Q8_0.gguf"
    assert hub.downloads() == ["tiny-Q8_0.gguf"]
    assert resolve_path("tiny/gguf")[1].name == "tiny-Q4_K_M.gguf"  # llama.cpp's default tag
    llm = LLM("tiny/gguf:tiny-F16.gguf", num_kv_blocks=16)
    assert llm.engine.source.path.name == "tiny-F16.gguf"
    assert len(llm.generate("abc", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
               .outputs[0].token_ids) == 4
    assert sorted(hub.downloads()) == ["tiny-F16.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    with pytest.raises(ModelLoadError, match="no GGUF file for :Q2_K"):
        resolve_path("tiny/gguf:Q2_K")


def test_missing_private_and_token_errors(hub, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"^model 'tiny/nothing' is not a local path, and the Hugging Face Hub "
                                             r"does not have it \(HTTP 404; set HF_TOKEN"):
        resolve_path("tiny/nothing")
    with pytest.raises(ModelLoadError, match=r"'tiny/private' .* \(HTTP 401; set HF_TOKEN"):
        resolve_path("tiny/private")
    monkeypatch.setenv("HF_TOKEN", "wrong-token")
    with pytest.raises(ModelLoadError, match="refused the token for 'tiny/private' \\(HTTP 401\\): check HF_TOKEN"):
        resolve_path("tiny/private")
    monkeypatch.setenv("HF_TOKEN", "good-token")
    with pytest.raises(ModelLoadError, match="has no safetensors weights"):  # readable now: its only file is config
        resolve_path("tiny/private")
    with pytest.raises(ModelLoadError, match="'tiny/gated' is a gated repo .* accept its terms .* HF_TOKEN"):
        resolve_path("tiny/gated")


def test_dropped_connection_resumes_where_it_stopped(hub, repos, tmp_path):
    """huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and, when the
    connection breaks, asks for the rest with a Range request: a weight file of 2.4 chunks, cut halfway."""
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE
    from safetensors.torch import save_file

    save_file({"w": torch.arange(int(2.4 * DOWNLOAD_CHUNK_SIZE) // 4, dtype=torch.float32)}, tmp_path / "big.safetensors")
    weights = (tmp_path / "big.safetensors").read_bytes()
    hub.add("tiny/big", {"config.json": (repos[0] / "config.json").read_bytes(), "model.safetensors": weights})
    hub.drop_once.add("model.safetensors")
    _, folder = resolve_path("tiny/big")
    assert (folder / "model.safetensors").read_bytes() == weights
    ranges = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith("model.safetensors")]
    assert ranges == [None, f"bytes={DOWNLOAD_CHUNK_SIZE}-"]  # the second request asks only for the rest


def test_offline_uses_the_cache_only(hub, monkeypatch):
    _, online = resolve_path("tiny/gguf:Q8_0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    from levante.loader import hub as hub_module

    hub_module._resolved.clear()  # as a new process would
    assert resolve_path("tiny/gguf:Q8_0")[1] == online
    with pytest.raises(ModelLoadError, match=r"'tiny/gguf:F16' is not \(wholly\) in the Hugging Face cache .* "
                                             r"HF_HUB_OFFLINE is set: run `levante pull tiny/gguf:F16`"):
        resolve_path("tiny/gguf:F16")
    with pytest.raises(ModelLoadError, match="'tiny/llama' is not in the Hugging Face cache .*levante pull"):
        resolve_path("tiny/llama")
    assert hub.requests == []


def test_cli_pull_models_rm(hub, capsys, monkeypatch):
    assert main(["pull", "tiny/gguf", "--gguf-file", "tiny-Q8_0.gguf"]) == 0
    assert "tiny-Q8_0.gguf" in capsys.readouterr().out
    assert main(["pull", "tiny/llama"]) == 0
    capsys.readouterr()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    gguf_line = next(line for line in listing.splitlines() if line.startswith("tiny/gguf"))
    assert "main" in gguf_line and "KB" in gguf_line
    assert any(line.startswith("tiny/llama") for line in listing.splitlines())
    assert main(["rm", "tiny/gguf"]) == 0
    assert "removed tiny/gguf" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "tiny/gguf" not in capsys.readouterr().out
    assert main(["rm", "tiny/gguf"]) == 1
    assert "is not in the Hugging Face cache" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "-m", "tiny/gguf:Q8_0", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "levante pull tiny/gguf:Q8_0" in err


# -- a hostile mirror ---------------------------------------------------------------------------------

FORGERIES = [("etag", "../../../../escaped"), ("etag", "ABSOLUTE"), ("sha", "../../../../escaped"),
             ("commit", "../../../../escaped"), ("commit", "0123456789abcdef"), ("sha", "x" * 40)]


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("field, value", FORGERIES)
def test_a_hostile_mirror_writes_nothing_anywhere(hub, tmp_path, capsys, field, value):
    """`levante pull` refuses a forged commit or ETag with one line, before a byte is written: not
    outside the cache (the forgery's aim), and not inside it either."""
    outside = tmp_path / "outside"
    hub.forged[field] = str(outside / "escaped") if value == "ABSOLUTE" else value
    for model in ("tiny/llama", "tiny/gguf:Q8_0"):
        assert main(["pull", model]) == 1, model
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("levante: error: the Hub (") and "refused" in err, err
        assert files_under(tmp_path) == [], model  # HF_HUB_CACHE lies in tmp_path too
    assert not (tmp_path.parent / "escaped").exists() and not any(tmp_path.parent.parent.glob("escaped"))


def test_revisions_and_file_names_stay_inside_the_cache(hub, repos, tmp_path):
    for name in ("tiny/llama@../../../x", "tiny/llama@refs/../../x", "tiny/llama@/etc", "tiny/llama@a//b",
                 "tiny/llama@x.lock"):
        with pytest.raises(ModelLoadError, match="is not a branch, tag or commit name"):
            resolve_path(name)
    hub.add("tiny/sly", {"config.json": (repos[0] / "config.json").read_bytes(), "model.safetensors.index.json":
                         b'{"weight_map": {"w": "../../../../sly.safetensors"}}'})
    with pytest.raises(ModelLoadError, match="not a plain relative path"):
        resolve_path("tiny/sly")
    assert not any("sly.safetensors" in f for f in files_under(tmp_path.parent))


def test_levante_serve_refuses_a_hostile_mirror_in_one_line(hub, tmp_path):
    import os
    import subprocess
    import sys

    hub.forged["commit"] = "../../../../escaped"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    result = subprocess.run([sys.executable, "-m", "levante", "serve", "-m", "tiny/llama", "--port", "1"],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"levante: error: the Hub ({hub.url}) sent X-Repo-Commit '../../../../escaped', not a 40-hex commit: "
        "refused, nothing was written"]
    assert files_under(tmp_path) == []


def test_a_config_beyond_bounds_is_refused_before_the_weights_download(hub, repos, tmp_path):
    import json

    sharded = repos[0]
    config = json.loads((sharded / "config.json").read_text())
    files = {p.name: p.read_bytes() for p in sharded.iterdir()}
    hub.add("tiny/huge", {**files, "config.json": json.dumps({**config, "num_hidden_layers": 10 ** 9}).encode()})
    with pytest.raises(ModelLoadError, match=r"^'tiny/huge' config.json gives num_hidden_layers = 1000000000, "
                                             r"which must be an integer from 1 to 4,096$"):
        resolve_path("tiny/huge")
    assert [f for f in hub.downloads()] == ["config.json"]
