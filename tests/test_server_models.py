"""Several models behind one server (serve/router.py): routing by `model`, loading on first use,
unloading (LRU within --max-loaded-models or a memory budget, idle, admin), waiting for a loading
model, a model that fails to load, and the API-key gate, with the `openai` client on a live port."""
import asyncio
import shutil
import threading
import time

import httpx
import openai
import pytest

from levante import LLM, SamplingParams
from levante.engine.args import EngineArgs
from levante.errors import InvalidRequest
from levante.serve.model_specs import ModelSpec, read_models_config, specs_from_cli
from levante.serve.router import ModelRouter, load_llm
from levante.serve.state import ServerState
from live_server import metric, serving
from tiny_lora import ATTENTION, build_adapter

KEY = "secret"
PROMPT = [5, 17, 42, 99, 7, 3, 250, 31, 8, 64, 12]
OPTIONS = dict(dtype="float32", num_kv_blocks=32, max_model_len=256, warmup=False)


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken") / "cut"
    shutil.copytree(tiny_model("llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # resolves and checks out, fails to load
    adapter = build_adapter(tiny_model("qwen2"), tmp_path_factory.mktemp("adapter") / "attn", seed=1, r=4,
                            lora_alpha=8, target_modules=ATTENTION)
    return {"a": tiny_model("llama"), "b": tiny_model("qwen2"), "broken": broken, "adapter": adapter}


@pytest.fixture(scope="module")
def expected(folders):
    """What each model (and the adapter on "b") answers to PROMPT, each loaded alone."""
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    answers = {}
    for name in ("a", "b"):
        llm = LLM(str(folders[name]), **OPTIONS, lora={"attn": str(folders["adapter"])} if name == "b" else {})
        answers[name] = llm.generate(PROMPT, greedy)[0].outputs[0].text
        if name == "b":
            answers["attn"] = llm.generate(PROMPT, SamplingParams(**vars(greedy) | {"lora": "attn"}))[0].outputs[0].text
    assert len(set(answers.values())) == 3
    return answers


def _spec(name, folder, **options):
    return ModelSpec(name, EngineArgs(model=str(folder), **OPTIONS | options))


@pytest.fixture
def server(folders):
    """A server for "a" and "b" (with adapter "attn") and "broken"; `start(**router_options)` serves it."""
    opened = []

    def start(api_key=KEY, load=load_llm, **router_options):
        specs = [_spec("a", folders["a"]), _spec("b", folders["b"], lora={"attn": str(folders["adapter"])}),
                 _spec("broken", folders["broken"])]
        state = ServerState(router=ModelRouter(specs, load=load, **router_options))
        context = serving(state, api_key)
        base = context.__enter__()
        opened.append(context)
        state.ready = True
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key or "unused", max_retries=0)
        return base, state, client

    yield start
    for context in opened:
        context.__exit__(None, None, None)


def _complete(client, model):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.model == model
    return response.choices[0].text


def _statuses(client) -> dict:
    return {card.id: card.status for card in client.models.list()}


def test_routing_and_lazy_loading(server, expected):
    base, state, client = server()
    assert _statuses(client) == {"a": "unloaded", "b": "unloaded", "attn": "unloaded", "broken": "unloaded"}
    assert _complete(client, "b") == expected["b"]
    assert _statuses(client)["b"] == "loaded" and _statuses(client)["a"] == "unloaded"
    assert _complete(client, "attn") == expected["attn"]  # the adapter on "b", no second load
    assert _complete(client, "a") == expected["a"]
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.model == "a"
    with pytest.raises(openai.NotFoundError, match="serves 'a, b, attn, broken'"):
        _complete(client, "nope")
    auth = {"authorization": f"Bearer {KEY}"}
    for name in ("a", "b"):
        assert metric(base, "levante_model_loaded", auth, model_name=name) == 1
        assert metric(base, "levante_model_events_total", auth, model_name=name, event="loaded") == 1
        assert metric(base, "levante_generation_tokens_total", auth, model_name=name) > 0
    assert metric(base, "levante_model_loaded", auth, model_name="broken") == 0


def test_lru_unload_under_max_loaded_models_1(server, expected):
    _, state, client = server(max_loaded=1)
    assert _complete(client, "a") == expected["a"]
    assert _complete(client, "b") == expected["b"]
    assert _statuses(client) == {"a": "unloaded", "b": "loaded", "attn": "loaded", "broken": "unloaded"}
    assert _complete(client, "a") == expected["a"]  # loaded again, same answer
    assert [m.name for m in state.router.loaded()] == ["a"]


def test_concurrent_requests_to_two_models(server, expected):
    _, _, client = server()
    names = ["a", "b", "attn"] * 3
    results = [None] * len(names)

    def run(i):
        results[i] = _complete(client, names[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected[name] for name in names]


def test_a_model_that_fails_to_load_fails_only_its_requests(server, expected):
    base, _, client = server()
    for _ in range(2):  # the second fails at once, saying the same, with Retry-After
        answer = httpx.post(f"{base}/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 2},
                            headers={"authorization": f"Bearer {KEY}"})
        assert answer.status_code == 503 and "model 'broken' could not be loaded" in answer.json()["error"]["message"]
        assert int(answer.headers["retry-after"]) >= 1
    assert _complete(client, "a") == expected["a"]
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200
    assert health.json()["models"]["broken"]["status"] == "failed" and health.json()["models"]["a"] == {
        "status": "loaded"}


def test_requests_wait_for_a_loading_model_within_the_timeout(server, expected):
    gate = threading.Event()

    def gated(spec):
        gate.wait(60)
        return load_llm(spec)

    base, state, client = server(load=gated, load_timeout=0.5)
    auth = {"authorization": f"Bearer {KEY}"}
    late = httpx.post(f"{base}/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2}, headers=auth)
    assert late.status_code == 503 and "still loading" in late.json()["error"]["message"]
    assert late.headers["retry-after"]
    assert _statuses(client)["a"] == "loading"
    state.router.load_timeout = 60
    results = [None, None]

    def run(i):
        results[i] = _complete(client, "a")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    while state.router.models["a"].waiting < 2:  # both wait on the load that is under way
        time.sleep(0.02)
    gate.set()
    for thread in threads:
        thread.join()
    assert results == [expected["a"]] * 2
    assert metric(base, "levante_model_events_total", auth, model_name="a", event="loaded") == 1  # one load, for all


def test_admin_load_and_unload(server, expected):
    base, state, client = server()
    auth = {"authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{base}/models/load", json={"model": "b"}).status_code == 401  # the key is required
    loaded = httpx.post(f"{base}/models/load", json={"model": "b"}, headers=auth)
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    assert _statuses(client)["b"] == "loaded"
    served = state.router.models["b"]
    asyncio.run(state.router.hold(served))  # a request in flight: not unloaded under it
    busy = httpx.post(f"{base}/models/unload", json={"model": "b"}, headers=auth)
    assert busy.status_code == 409 and "in use" in busy.json()["error"]["message"]
    state.router.release(served)
    assert httpx.post(f"{base}/models/unload", json={"model": "b"}, headers=auth).json()["was_loaded"] is True
    assert _statuses(client)["b"] == "unloaded"
    assert httpx.post(f"{base}/models/unload", json={"model": "nope"}, headers=auth).status_code == 404
    failed = httpx.post(f"{base}/models/load", json={"model": "broken"}, headers=auth)
    assert failed.status_code == 503 and "could not be loaded" in failed.json()["error"]["message"]
    assert _complete(client, "attn") == expected["attn"]  # loads "b" again, with its adapter


def test_admin_routes_need_a_server_with_a_key(server):
    base, _, _ = server(api_key=None)
    for path in ("/models/load", "/models/unload"):
        answer = httpx.post(f"{base}{path}", json={"model": "a"})
        assert answer.status_code == 403 and "--api-key" in answer.json()["error"]["message"]


def test_run_time_adapters_survive_a_reload(server, folders, expected):
    base, _, client = server(max_loaded=1)
    auth = {"authorization": f"Bearer {KEY}"}
    body = {"lora_name": "attn2", "lora_path": str(folders["adapter"]), "model": "b"}
    assert httpx.post(f"{base}/v1/load_lora_adapter", json=body, headers=auth).status_code == 200
    assert _complete(client, "a") == expected["a"]  # "b" unloaded to make room
    assert _statuses(client)["attn2"] == "unloaded"
    assert _complete(client, "attn2") == expected["attn"]  # "b" reloaded with it
    taken = httpx.post(f"{base}/v1/load_lora_adapter", json={**body, "lora_name": "a"}, headers=auth)
    assert taken.status_code == 400 and "a model's name" in taken.json()["error"]["message"]


def test_idle_models_unload(server, expected):
    _, state, client = server(idle_timeout=0.2)
    assert _complete(client, "a") == expected["a"]
    deadline = time.monotonic() + 30
    while state.router.models["a"].status == "loaded":
        assert time.monotonic() < deadline, "an idle model stayed loaded"
        time.sleep(0.05)
    assert _complete(client, "a") == expected["a"]


def test_memory_budget_unloads_least_recently_used(server, expected):
    _, state, client = server()
    router = state.router
    assert _complete(client, "a") == expected["a"] and _complete(client, "b") == expected["b"]
    sizes = {name: router.models[name].memory_bytes for name in ("a", "b")}
    assert all(sizes.values())
    asyncio.run(router.unload("b"))
    router.memory_budget = max(sizes.values()) * 3 // 2  # room for one of them
    assert _complete(client, "a") == expected["a"]
    assert _complete(client, "b") == expected["b"]  # "a" unloaded to make room
    assert [m.name for m in router.loaded()] == ["b"]
    router.memory_budget = sizes["a"] // 2
    with pytest.raises(openai.InternalServerError, match="more than the .* that --models-memory-gb"):
        _complete(client, "a")


def test_models_config(tmp_path, folders):
    (tmp_path / "adapters").mkdir()
    shutil.copytree(folders["adapter"], tmp_path / "adapters" / "attn")
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  small:\n    model: {folders['a']}\n    max_model_len: 64\n"
                      f"    quantization: int8\n  coder:\n    model: {folders['b']}\n"
                      "    lora: {attn: adapters/attn}\n  plain: smollm2:135m\n")
    base = EngineArgs(dtype="float32", kv_cache_gb=0.1)
    specs = read_models_config(config, base)
    assert [s.name for s in specs] == ["small", "coder", "plain"]
    assert specs[0].args.max_model_len == 64 and specs[0].args.quantization == "int8"
    assert specs[0].args.kv_cache_gb == 0.1 and specs[1].args.max_model_len is None  # the server's flags beneath
    assert specs[1].adapters == {"attn": str((tmp_path / "adapters" / "attn").resolve())}
    assert specs[2].args.model == "smollm2:135m"
    for text, message in [("models:\n  x:\n    model: m\n    colour: red\n", "models.x.colour: unknown option"),
                          ("models:\n  x:\n    model: m\n    max_model_len: big\n",
                           "models.x.max_model_len: expected int or None"),
                          ("models:\n  x:\n    max_model_len: 5\n", "models.x: expected a 'model'"),
                          ("models: [a, b]\n", "expected a mapping 'models:'"),
                          ("models: {x: m}\nextra: 1\n", "unknown top-level key 'extra'"),
                          ("models: {x: [\n", "not valid YAML")]:
        config.write_text(text)
        with pytest.raises(InvalidRequest, match=message):
            read_models_config(config, base)


def test_specs_from_cli_flags(tmp_path):
    from levante.cli import build_parser

    def specs(*argv):
        args = build_parser().parse_args(["serve", *argv])
        return specs_from_cli(args, EngineArgs.from_cli_args(args, model=None))

    two = specs("-m", "smollm2:135m", "-m", "gemma3:270m", "--lora", "sql=/x", "--kv-cache-gb", "0.5")
    assert [(s.name, s.args.model, s.adapters, s.args.kv_cache_gb) for s in two] == [
        ("smollm2:135m", "smollm2:135m", {"sql": "/x"}, 0.5), ("gemma3:270m", "gemma3:270m", {}, 0.5)]
    named = specs("-m", "smollm2:135m", "--served-model-name", "small", "--embedding-model", "all-minilm:l6-v2")
    assert [(s.name, s.pinned, s.embedding) for s in named] == [("small", False, False),
                                                                 ("all-minilm:l6-v2", True, True)]
    assert [s.name for s in specs()] == ["qwen2.5-coder:0.5b"]
    with pytest.raises(InvalidRequest, match="'smollm2:135m' is given twice"):
        specs("-m", "smollm2:135m", "-m", "smollm2:135m")
    with pytest.raises(InvalidRequest, match="'sql' is given twice"):
        specs("-m", "smollm2:135m", "--lora", "sql=/x", "--served-model-name", "sql")


def test_unloading_frees_the_model(folders):
    """What an unloaded model held (its weights; an embedding model's batcher too) is freed."""
    import gc
    import weakref

    from levante.serve.embeddings import EmbeddingRequest

    embedding = ModelSpec("e", EngineArgs(model="all-minilm:l6-v2", dtype="float32", warmup=False), task="embed")
    router = ModelRouter([_spec("a", folders["a"]), embedding])

    async def main():  # all within one event loop that lives on, as a server's does
        async with router.use("a") as route:
            refs = [weakref.ref(route.llm.engine.model)]
        async with router.use("e", ("embed",)) as route:
            service, body = route.model.embeddings, EmbeddingRequest(input="hi")
            answer = await service.respond(body, service.inputs(body))
            del service  # the test must not be what keeps the model alive
            assert len(answer["data"][0]["embedding"]) == 384
            refs.append(weakref.ref(route.llm.embedder.model))
            worker = route.model.embeddings.batcher._worker
        assert [await router.unload(name) for name in ("a", "e")] == [True, True]
        await asyncio.wait([worker], timeout=30)
        assert worker.done()  # it held the embedder
        gc.collect()
        assert [ref() for ref in refs] == [None, None]

    try:
        asyncio.run(main())
    finally:
        router.close()
