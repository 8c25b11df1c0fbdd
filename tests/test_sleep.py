"""Sleep and wake: the resident memory a sleeping engine gives back (measured in a fresh process),
the same answers after a wake (LoRA adapters included), and the server's POST /sleep (levels 1 and 2),
POST /wake_up, GET /is_sleeping, admin-only, --sleep-after, and a request that wakes its model."""
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import openai
import pytest

from levante.engine.args import EngineArgs
from levante.serve.model_specs import ModelSpec
from levante.serve.router import ModelRouter
from levante.serve.state import ServerState
from live_server import metric, serving
from tiny_lora import ATTENTION, build_adapter

KEY = "secret"
PROMPT = [5, 17, 42, 99, 7, 3, 250, 31, 8, 64, 12]
OPTIONS = dict(dtype="float32", num_kv_blocks=32, max_model_len=256, warmup=False)
# ~17 M float32 parameters (68 MB): enough to see in the resident set of a process running torch.
WIDE = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
            num_hidden_layers=4)

RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    from levante import LLM, SamplingParams

    def rss():
        gc.collect()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = [5, 17, 42, 99, 7, 3, 250, 31] * 40
    base = rss()
    llm = LLM(sys.argv[1], dtype="float32", kv_cache_gb=0.25)
    before = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    loaded, weights = rss(), llm.memory_bytes()
    llm.sleep()
    asleep = rss()
    llm.wake_up()
    after = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    print(json.dumps({"base": base, "loaded": loaded, "asleep": asleep, "awake": rss(), "memory_bytes": weights,
                      "same": before == after}))
""")


@pytest.mark.slow  # a fresh process loads torch and a 68 MB model
def test_rss_after_sleep(tiny_model):
    """Sleep (level 1) gives the weights and the touched KV cache back: measured, in a fresh process, as
    the resident set size before and after."""
    folder = tiny_model("llama", **WIDE)
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder)], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-2000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    mib = {k: round(v / (1 << 20), 1) for k, v in rss.items() if isinstance(v, int) and not isinstance(v, bool)}
    print(f"\nRSS MiB: {mib}")
    weights = 68 << 20
    assert rss["same"]  # the same greedy tokens after the wake
    assert rss["loaded"] - rss["asleep"] > 0.9 * weights  # the weights (and the KV pages used) went back
    assert rss["awake"] - rss["asleep"] > 0.9 * weights  # and came back on waking


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    adapter = build_adapter(tiny_model("qwen2"), tmp_path_factory.mktemp("adapter") / "attn", seed=1, r=4,
                            lora_alpha=8, target_modules=ATTENTION)
    return {"a": tiny_model("llama"), "b": tiny_model("qwen2"), "adapter": adapter}


@pytest.fixture
def server(folders):
    opened = []

    def start(api_key=KEY, **router_options):
        specs = [ModelSpec("a", EngineArgs(model=str(folders["a"]), **OPTIONS)),
                 ModelSpec("b", EngineArgs(model=str(folders["b"]), lora={"attn": str(folders["adapter"])}, **OPTIONS))]
        state = ServerState(router=ModelRouter(specs, **router_options))
        context = serving(state, api_key)
        base = context.__enter__()
        opened.append(context)
        state.ready = True
        return base, state, openai.OpenAI(base_url=f"{base}/v1", api_key=api_key or "unused", max_retries=0)

    yield start
    for context in opened:
        context.__exit__(None, None, None)


def _complete(client, model):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def _statuses(client) -> dict:
    return {card.id: card.status for card in client.models.list()}


def test_sleep_levels_and_wake_on_request(server):
    base, state, client = server()
    auth = {"authorization": f"Bearer {KEY}"}
    answers = {name: _complete(client, name) for name in ("a", "b", "attn")}
    sleep = httpx.post(f"{base}/sleep", params={"level": 1, "model": "b"}, headers=auth)
    assert sleep.status_code == 200 and sleep.json()["sleeping"] == ["b"]
    b = state.router.models["b"]
    assert b.llm.asleep and b.llm.memory_bytes() == 0 and _statuses(client)["b"] == "sleeping"
    assert httpx.get(f"{base}/is_sleeping", headers=auth).json() == {"is_sleeping": True,
                                                                      "models": {"a": False, "b": True}}
    assert httpx.get(f"{base}/health").json()["models"]["b"] == {"status": "sleeping"}
    assert _complete(client, "attn") == answers["attn"]  # the request wakes it, its adapter back
    assert _statuses(client)["b"] == "loaded" and b.wake_seconds is not None
    assert _complete(client, "b") == answers["b"]
    assert metric(base, "levante_model_wake_seconds_count", auth, model_name="b") == 1

    assert httpx.post(f"{base}/sleep", params={"level": 2}, headers=auth).json()["sleeping"] == ["a", "b"]
    assert state.router.models["a"].llm is None and _statuses(client)["a"] == "sleeping"
    assert _complete(client, "a") == answers["a"]  # loaded again whole
    woken = httpx.post(f"{base}/wake_up", headers=auth).json()
    assert woken == {"success": True, "woken": ["b"]} and _complete(client, "b") == answers["b"]
    for event in ("sleeping", "woken"):
        assert metric(base, "levante_model_events_total", auth, model_name="a", event=event) == 1
    assert httpx.post(f"{base}/sleep", params={"level": 3}, headers=auth).status_code == 400


def test_sleep_is_admin_only(server):
    base, _, _ = server(api_key=None)
    assert httpx.post(f"{base}/sleep").status_code == 403
    assert httpx.post(f"{base}/wake_up").status_code == 403
    keyed, _, _ = server()
    assert httpx.post(f"{keyed}/sleep").status_code == 401


def test_a_model_in_use_does_not_sleep(server):
    base, state, client = server()
    _complete(client, "a")
    served = state.router.models["a"]
    state.router.hold_if_loaded(served)  # as a request running on it
    try:
        reply = httpx.post(f"{base}/sleep", params={"model": "a"}, headers={"authorization": f"Bearer {KEY}"})
        assert reply.status_code == 409 and "in use" in reply.json()["error"]["message"]
    finally:
        state.router.release(served)


def test_sleep_after_idle_seconds(server):
    _, state, client = server(sleep_after=1.0)
    answer = _complete(client, "a")
    served = state.router.models["a"]
    deadline = time.monotonic() + 30
    while served.status != "sleeping" or served.loading is not None:
        assert time.monotonic() < deadline, "the idle model never slept"
        time.sleep(0.1)
    assert served.llm.asleep and served.sleep_level == 1
    assert _complete(client, "a") == answer and served.status == "loaded"


def test_the_docs_show_curl_and_an_sdk_for_each_route(server):
    """/docs (Swagger, from /openapi.json): each route of Anthropic's API, reranking, transcription and
    sleep carries a curl and a Python SDK example; the SDK lines for sleep and wake work as written."""
    base, state, _ = server()
    schema = httpx.get(f"{base}/openapi.json", headers={"x-api-key": KEY}).json()
    routes = [("/v1/messages", "post"), ("/v1/messages/count_tokens", "post"), ("/v1/rerank", "post"),
              ("/v1/score", "post"), ("/v1/audio/transcriptions", "post"), ("/sleep", "post"), ("/wake_up", "post"),
              ("/is_sleeping", "get")]
    for path, method in routes:
        description = schema["paths"][path][method]["description"]
        assert f"curl http://127.0.0.1:8000{path}" in description.replace('"', "").replace("-X POST ", ""), path
        assert "```python" in description and "client" in description, path
    admin = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)  # as the /sleep entry shows
    _complete(openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0), "a")
    assert admin.post("/sleep", cast_to=object, options={"params": {"level": 1}})["sleeping"] == ["a"]
    assert admin.get("/is_sleeping", cast_to=object)["models"]["a"] is True
    assert admin.post("/wake_up", cast_to=object) == {"success": True, "woken": ["a"]}
    assert state.router.models["a"].status == "loaded"
