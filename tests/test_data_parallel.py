"""Data parallelism (`levante serve --data-parallel-size 2`): two replicas of a tiny random Qwen2 behind
one server, as local processes and as Ray actors on a one-node loopback cluster.

The replicas answer as one engine does (greedy tokens equal the in-process engine's); requests with a
shared prefix go to the replica that cached it (its prefix-cache hits counted in /metrics per replica);
and a replica killed with SIGKILL costs capacity only: a request routed to it that had produced nothing
runs on the other, a stream it was producing ends with an error event, /health says 1 of 2 serve until
the replica is back (restarted by the front, or by Ray), and every request after the kill succeeds.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from levante import LLM, SamplingParams
from levante.engine.args import EngineArgs
from levante.engine.prefix_router import PrefixRouter
from levante.serve.app import ServerState
from levante.serve.model_specs import ModelSpec
from levante.serve.router import ModelRouter
from live_server import metric, serving

NAME = "dp-model"
KEY = "sk-dp-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=256, max_num_seqs=8, num_threads=1)


def _prompt(seed: int, length: int = 24) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(length)]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster on loopback, in this process (dashboard and usage statistics off)."""
    from levante.engine.replica_handles import LOCAL_ONLY

    os.environ.update(LOCAL_ONLY)
    ray = pytest.importorskip("ray")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, configure_logging=False,
             log_to_driver=False)
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    yield ray
    ray.shutdown()


def _dp_server(folder, backend: str, routing: str = "prefix", **options):
    args = EngineArgs(model=str(folder), **{**OPTIONS, **options}, data_parallel_size=2,
                      distributed_executor_backend=backend, data_parallel_routing=routing)
    state = ServerState(router=ModelRouter([ModelSpec(NAME, args)]))
    return state


class _Server:
    def __init__(self, folder, backend: str, routing: str = "prefix", **options):
        self.state = _dp_server(folder, backend, routing, **options)
        self._cm = serving(self.state, api_key=KEY)

    def __enter__(self):
        self.base = self._cm.__enter__()
        self.state.router.start_loading(NAME).result()
        self.state.ready = True
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)

    @property
    def replicas(self):
        return self.state.router.models[NAME].loop

    def complete(self, prompt, max_tokens: int = 8, **extra) -> httpx.Response:
        body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        return httpx.post(f"{self.base}/v1/completions", json=body, headers=AUTH, timeout=120)

    def metric(self, name: str, **labels) -> float:
        return metric(self.base, name, AUTH, model_name=NAME, **labels) or 0.0


@pytest.fixture(scope="module")
def mp_server(tiny_model):
    with _Server(tiny_model("qwen2"), "mp") as server:
        yield server


# -- the router -----------------------------------------------------------------------------------

def test_router_keys_are_the_engine_cache_keys(tiny_model):
    """The front routes on the very keys the engine files its prefix-cache blocks under."""
    llm = LLM(str(tiny_model("qwen2")), **OPTIONS)
    prompt = _prompt(1, 26)
    llm.generate([prompt], SamplingParams(max_tokens=1))
    keys = PrefixRouter(1, 4).keys(prompt)
    assert len(keys) == 6
    assert set(keys) <= set(llm.engine.block_manager.cached)


def test_router_longest_match_then_balance():
    router = PrefixRouter(2, 4, balance_slack=2)
    shared, other = router.keys(_prompt(1)), router.keys(_prompt(2))
    first = router.choose(shared)
    router.routed(first.replica, shared)
    second = router.choose(other)  # no match anywhere: the idler replica
    assert second.replica != first.replica
    router.routed(second.replica, other)
    again = router.choose(router.keys(_prompt(1)[:16] + [7] * 8))  # 4 blocks of `shared`, then not
    assert (again.replica, again.matched_blocks, again.reason) == (first.replica, 4, "prefix")
    for _ in range(3):  # pile requests onto the first replica: past the slack, load wins over the match
        router.routed(first.replica, shared)
    assert router.choose(shared).replica == second.replica
    assert router.choose(shared).reason == "load"
    router.replicas[second.replica].up = False
    assert router.choose(shared).replica == first.replica
    router.replicas[first.replica].up = False
    assert router.choose(shared) is None


# -- local processes ------------------------------------------------------------------------------

def test_replicas_answer_as_one_engine(mp_server, tiny_model):
    llm = LLM(str(tiny_model("qwen2")), **OPTIONS)
    prompts = [_prompt(seed) for seed in range(4)]
    expected = [o.outputs[0].text for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    for prompt, text in zip(prompts, expected):
        answer = mp_server.complete(prompt, 16, ignore_eos=True)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == text
        assert answer.json()["usage"]["completion_tokens"] == 16
    # both replicas served, and the front's gates hold: no key, a foreign Host, an out-of-vocabulary id
    assert all(mp_server.metric("levante_replica_prompt_tokens_total", replica=r) > 0 for r in "01")
    assert httpx.post(f"{mp_server.base}/v1/completions", json={"model": NAME, "prompt": "x"}).status_code == 401
    foreign = httpx.get(f"{mp_server.base}/v1/models", headers={**AUTH, "Host": "evil.example"})
    assert foreign.status_code == 421
    bad = mp_server.complete([5, 100000])
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]


def test_shared_prefixes_stay_on_their_replica(mp_server):
    """Two conversations, taken in turn: each one's later turns reuse the blocks its first turn cached."""
    before = {r: mp_server.metric("levante_replica_cached_tokens_total", replica=r) for r in "01"}
    prefixes = [_prompt(10, 32), _prompt(11, 32)]
    for turn in range(3):
        for index, prefix in enumerate(prefixes):
            assert mp_server.complete(prefix + _prompt(100 + 10 * turn + index, 4), max_tokens=2).status_code == 200
    hits = sum(mp_server.metric("levante_replica_cached_tokens_total", replica=r) - before[r] for r in "01")
    assert hits >= 4 * 32  # turns 2 and 3 of both: every one of their 32 prefix tokens from the cache
    assert sum(mp_server.metric("levante_replica_routed_total", replica=r, reason="prefix") for r in "01") >= 4


def _stream(base: str, prompt, max_tokens: int, events: list, first: threading.Event):
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        events.append(response.status_code)
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                first.set()
            elif line == "data: [DONE]":
                events.append("DONE")
    first.set()


def _survives_sigkill(server: _Server, restarted_by: str):
    """Streams A and B run, one per replica; A's replica (the victim) is frozen, C (A's prefix) is routed
    to it and waits; the victim is killed: A ends with an error event, C runs on the other, B finishes."""
    replicas = server.replicas
    assert [s.up for s in replicas.stats] == [True, True]
    streams = {}
    for label, seed in (("A", 20), ("B", 21)):
        events, first = [], threading.Event()
        thread = threading.Thread(target=_stream, args=(server.base, _prompt(seed, 32), 400, events, first))
        thread.start()
        assert first.wait(60), f"stream {label} produced nothing"
        streams[label] = (thread, events)
    assert [v.in_flight for v in replicas.router.replicas] == [1, 1]
    a_keys = replicas.router.keys(_prompt(20, 32))
    victim = next(i for i, view in enumerate(replicas.router.replicas) if view.matched(a_keys) == len(a_keys))
    tag, old_pid = str(victim), replicas.stats[victim].pid
    os.kill(old_pid, signal.SIGSTOP)
    try:
        answer = {}
        c = threading.Thread(target=lambda: answer.update(r=server.complete(_prompt(20, 32) + [9, 9], 4)))
        c.start()
        deadline = time.monotonic() + 30
        while replicas.router.replicas[victim].in_flight < 2:  # C routed to A's replica, by A's prefix
            assert time.monotonic() < deadline, "the shared prefix did not route C to A's replica"
            time.sleep(0.02)
    finally:
        os.kill(old_pid, signal.SIGKILL)
    degraded = []
    deadline = time.monotonic() + 30
    while not degraded:
        health = httpx.get(f"{server.base}/health").json()
        if health["models"][NAME].get("replicas_up") == 1:
            degraded.append(health)
        assert time.monotonic() < deadline, "health never showed the lost replica"
    assert degraded[0]["status"] == "ok" and "reduced" in degraded[0]["models"][NAME]["capacity"]
    # while the victim is down, every new request is served by the other replica
    assert all(server.complete(_prompt(30 + i), 4).status_code == 200 for i in range(3))
    c.join(60)
    assert answer["r"].status_code == 200, answer["r"].text
    for label, (thread, events) in streams.items():
        thread.join(60)
        assert not thread.is_alive(), f"stream {label} hangs"
        assert events[0] == 200 and events[-1] == "DONE"
    a_events, b_events = streams["A"][1], streams["B"][1]
    assert "error" in a_events[-2] and "lost" in a_events[-2]["error"]["message"]
    assert b_events[-2]["choices"][0]["finish_reason"] == "length"
    assert server.metric("levante_replica_rerouted_total", replica=tag) >= 1
    assert server.metric("levante_replica_failed_total", replica=tag) >= 1
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.base}/health").json()["models"][NAME].get("replicas_up") != 2:
        assert time.monotonic() < deadline, f"the victim was not restarted by {restarted_by}"
        time.sleep(0.2)
    assert replicas.stats[victim].pid != old_pid
    assert server.metric("levante_replica_restarts_total", replica=tag) == 1
    assert all(server.complete(_prompt(40 + i), 4).status_code == 200 for i in range(4))


def test_a_bad_replica_count_is_one_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "levante", "serve", "--data-parallel-size", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "levante: error: --data-parallel-size: must be 1 or more"


def test_a_killed_process_replica_costs_capacity_only(mp_server):
    _survives_sigkill(mp_server, "the front")


# -- Ray ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_actors_serve_and_survive_sigkill(ray_cluster, tiny_model):
    with _Server(tiny_model("qwen2"), "ray") as server:
        assert server.complete(_prompt(1)).status_code == 200
        _survives_sigkill(server, "Ray")


@pytest.mark.slow
def test_ray_replicas_may_be_tensor_parallel(ray_cluster, tiny_model):
    """Two Ray replicas of two tensor-parallel ranks each (a placement group of two bundles per replica)
    answer as one single-rank engine does."""
    folder = tiny_model("qwen2")
    prompts = [_prompt(5), _prompt(6)]  # no shared prefix: one per replica
    expected = [o.outputs[0].text for o in LLM(str(folder), **OPTIONS).generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]
    with _Server(folder, "ray", tensor_parallel_size=2) as server:
        for prompt, text in zip(prompts, expected):
            answer = server.complete(prompt, 12, ignore_eos=True)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == text
        assert all(server.metric("levante_replica_prompt_tokens_total", replica=r) > 0 for r in "01")


# -- Ray Serve and KubeRay ----------------------------------------------------------------------------

def _serve_flags(config: dict) -> tuple[dict, list[str]]:
    """The one application of a Serve config, and its `levante serve` flags."""
    import shlex

    (application,) = config["applications"]
    return application, shlex.split(application["args"]["flags"])


def test_serve_config_and_rayservice_are_valid():
    """deploy/'s Serve config and KubeRay RayService: valid for Ray Serve's own schema, naming an importable
    application builder, with flags `levante serve` accepts, Ray's version as pinned, usage statistics off."""
    import importlib
    from pathlib import Path

    import yaml

    ray = pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    from levante.cli import build_parser

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    plain = yaml.safe_load((deploy / "serve_config.yaml").read_text())
    service = yaml.safe_load((deploy / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
    for config in (plain, yaml.safe_load(service["spec"]["serveConfigV2"])):
        ServeDeploySchema.model_validate(config)
        application, flags = _serve_flags(config)
        module, _, attribute = application["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attribute)
        assert callable(builder) and builder(application["args"]) is not None
        args = build_parser().parse_args(["serve", *flags])
        assert (args.data_parallel_size, args.distributed_executor_backend) == (2, "ray")
        assert application["runtime_env"]["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.slow
def test_ray_serve_app_serves_through_the_guards(ray_cluster, tiny_model):
    """`build_app` on Ray Serve (proxy on a loopback port): the levante app answers, behind its site gate and key."""
    from ray import serve

    from levante.serve.ray_serve import build_app
    from live_server import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        flags = f"-m {tiny_model('qwen2')} --dtype float32 --kv-cache-gb 0.02 --threads 1 --no-webui --api-key {KEY}"
        serve.run(build_app({"flags": flags}), name="levante", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=120,
                            json={"prompt": _prompt(3), "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.get(f"{base}/health", headers={"Host": "evil.example"}).status_code == 421
    finally:
        serve.shutdown()
