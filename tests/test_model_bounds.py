"""What a checkpoint declares is bounded before anything is built from it (loader/bounds.py, one
checker for config.json and GGUF metadata): a folder whose config.json claims 10^9 layers or a
10^12 vocabulary, or more than its tensors hold, is refused with one line naming the field, at
once and without growing memory: when opened, when `levante serve` starts, through
POST /models/load (OpenAI's error JSON, while a stream beside it goes on), and for a Hub repo
(tests/test_hub.py). The time each refusal took is printed (`-s`); the tests bound it only loosely,
as a hang detector.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from levante.engine.args import EngineArgs
from levante.errors import ModelLoadError
from levante.loader.auto import open_model
from levante.loader.bounds import Held, check_model, layer_index
from levante.serve.model_specs import ModelSpec
from levante.serve.router import ModelRouter
from levante.serve.state import ServerState
from live_server import Bystander, serving
from rss import peak_growth

MIB = 1 << 20
HANG = 10.0  # seconds: far beyond the milliseconds a refusal takes; only a hang or a build reaches it


def hostile_copy(source, folder, **changes):
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


CASES = [
    ({"num_hidden_layers": 10 ** 9}, "gives num_hidden_layers = 1000000000, which must be an integer from 1 to 4,096"),
    ({"vocab_size": 10 ** 12}, "gives vocab_size = 1000000000000, which must be an integer from 1 to"),
    ({"num_attention_heads": 10 ** 9}, "gives num_attention_heads = 1000000000"),
    ({"hidden_size": 2 ** 40}, "gives hidden_size = 1099511627776"),
    ({"intermediate_size": [128] * 3 + [10 ** 9]}, "gives intermediate_size = [128, 128, 128, 1000000000]"),
    ({"max_position_embeddings": 10 ** 12}, "gives max_position_embeddings = 1000000000000"),
    ({"num_local_experts": 10 ** 9}, "gives num_local_experts = 1000000000"),
    ({"num_hidden_layers": 4}, "gives num_hidden_layers = 4, the checkpoint holds tensors of 3 layers"),
    ({"num_hidden_layers": 0}, "gives num_hidden_layers = 0"),
    ({"num_hidden_layers": "3"}, "gives num_hidden_layers = '3'"),
    ({"num_hidden_layers": True}, "gives num_hidden_layers = True"),
    ({"vocab_size": 4_000_000}, "describes a model of ~256,"),
    ({"num_key_value_heads": 3}, "4 attention heads cannot share 3 key/value heads"),
    ({"vision_config": {"depth": 10 ** 9}}, "vision_config gives depth = 1000000000"),
    ({"text_config": [1], "hidden_size": None}, "text_config is not an object"),
]


@pytest.mark.parametrize("changes, message", CASES)
def test_config_json_beyond_bounds_is_refused_before_anything_is_built(tiny_model, tmp_path, changes, message):
    folder = hostile_copy(tiny_model("qwen2"), tmp_path / "hostile", **changes)
    started = time.perf_counter()
    growth, error = peak_growth(lambda: open_model(str(folder)))
    elapsed = time.perf_counter() - started
    print(f"\n{changes}: refused in {elapsed * 1000:.1f} ms, peak RSS +{growth / MIB:.1f} MiB")
    assert isinstance(error, ModelLoadError), error
    assert message in str(error) and "\n" not in str(error)
    assert growth < 32 * MIB and elapsed < HANG


def test_every_real_family_passes(tiny_model):
    """The bounds refuse no real checkpoint: each tiny family (MoE with a dense layer included) opens."""
    for arch in ("llama", "qwen2", "qwen3", "mistral", "phi3", "mixtral", "qwen3_moe", "gemma3"):
        assert open_model(str(tiny_model(arch))).config.num_layers == 3


def test_layer_indices_and_held():
    assert layer_index("model.layers.12.mlp.down_proj.weight") == 12
    assert layer_index("blk.3.attn_q.weight") == 3 and layer_index("encoder.layer.5.output.dense.weight") == 5
    assert layer_index("model.embed_tokens.weight") == -1 and layer_index("model.layers.99999999999.x") == -1
    held = Held.of({"model.layers.0.w": [4, 4], "model.layers.2.w": [2, 8], "lm_head.weight": [10, 4]})
    assert held == Held(parameters=16 + 16 + 40, layers=3)
    config = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 1,
              "vocab_size": 10}
    check_model(config, None, "x")
    with pytest.raises(ModelLoadError, match="^x lacks vocab_size$"):
        check_model({k: v for k, v in config.items() if k != "vocab_size"}, None, "x")


def test_levante_serve_refuses_at_start_in_one_line(tiny_model, tmp_path):
    folder = hostile_copy(tiny_model("qwen2"), tmp_path / "huge", num_hidden_layers=10 ** 9)
    result = subprocess.run([sys.executable, "-m", "levante", "serve", "-m", str(folder), "--port", "1"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"levante: error: {folder / 'config.json'} gives num_hidden_layers = 1000000000, which must be an integer "
        "from 1 to 4,096"]


def test_models_load_refuses_at_once_while_a_stream_goes_on(tiny_model, tmp_path):
    """POST /models/load of a model whose config.json turned hostile after the start (serve checks every
    model before the port opens): OpenAI's error JSON, the server and the stream beside it unharmed."""
    options = dict(dtype="float32", num_kv_blocks=64, max_model_len=2048, warmup=False)
    folder = shutil.copytree(tiny_model("qwen2"), tmp_path / "later-huge")
    specs = [ModelSpec("tiny", EngineArgs(model=str(tiny_model("qwen2")), **options)),
             ModelSpec("huge", EngineArgs(model=str(folder), **options))]
    state = ServerState(router=ModelRouter(specs))
    with serving(state, api_key="k") as base:
        state.ready = True
        auth = {"Authorization": "Bearer k"}
        hostile_copy(tiny_model("qwen2"), tmp_path / "swap", num_hidden_layers=10 ** 9)
        shutil.copy(tmp_path / "swap" / "config.json", folder / "config.json")
        with Bystander(base, "tiny", headers=auth) as bystander:
            attacked, started = time.monotonic(), time.perf_counter()
            growth, response = peak_growth(
                lambda: httpx.post(f"{base}/models/load", json={"model": "huge"}, headers=auth, timeout=60))
            elapsed = time.perf_counter() - started
        assert bystander.flowed_since(attacked)  # it went on after the attacks, to its end
        print(f"\n/models/load refused in {elapsed * 1000:.1f} ms, peak RSS +{growth / MIB:.1f} MiB")
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "service_unavailable" and "\n" not in error["message"]
        assert error["message"].startswith("model 'huge' could not be loaded: ")
        assert "gives num_hidden_layers = 1000000000" in error["message"]
        assert growth < 64 * MIB and elapsed < HANG
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                          headers=auth).status_code == 200
