"""The HTTP server against the official `openai` client, on a live loopback port."""
import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from levante import LLM
from levante.kernels import native
from live_server import live_server, metric

MSG = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256)
    with live_server(llm, "tiny") as (base, state):
        yield base, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    kernels = native.variant()  # the CPU kernels' variant: /health and /metrics report it
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok", "models": {"tiny": {"status": "loaded"}},
                                                       "cpu_kernels": kernels}
    assert metric(server[0], "levante_cpu_kernels_info", variant=kernels) == 1
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]


def test_n_seed_and_reproducibility(client):
    kwargs = dict(model="tiny", messages=MSG, max_tokens=10, temperature=1.0, seed=42)
    a = client.chat.completions.create(n=2, **kwargs)
    b = client.chat.completions.create(n=2, **kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top token


def test_completion_echo_logprobs_and_stop(client):
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.text.startswith("hello world")
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    plain = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    stop = plain[3:5]
    cut = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == plain[: plain.find(stop)] and cut.finish_reason == "stop"


def test_max_tokens_and_length(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs,status,needle", [
    (dict(messages=[]), 400, "messages"),
    (dict(messages=MSG, temperature="hot"), 400, "temperature"),
    (dict(messages=MSG, n=17), 400, "n"),
    (dict(messages=MSG, extra_body={"frobnicate": 1}), 400, "frobnicate"),
    (dict(messages=MSG, logit_bias={"999999": 1}), 400, "logit_bias"),
    (dict(messages=[{"role": "user", "content": "word " * 400}]), 400, "context"),
    (dict(messages=MSG, model="nope"), 404, "nope"),
])
def test_errors_in_openai_shape(client, kwargs, status, needle):
    kwargs = {"model": "tiny", **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.status_code == status
    assert needle in info.value.body["message"]


def test_malformed_json_and_unknown_route(server):
    base = server[0]
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{base}/v1/nothing").status_code == 404
    r = httpx.post(f"{base}/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400 and "embedding" in r.json()["error"]["message"]


def test_tokenize_detokenize_metrics(server):
    base = server[0]
    ids = httpx.post(f"{base}/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert httpx.post(f"{base}/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"
    chat = httpx.post(f"{base}/tokenize", json={"messages": MSG}).json()
    assert chat["count"] == len(chat["tokens"]) > len(ids)
    text = httpx.get(f"{base}/metrics").text
    for name in ["levante_num_requests_running", "levante_num_requests_waiting", "levante_kv_cache_usage_ratio",
                 "levante_prompt_tokens_total", "levante_generation_tokens_total",
                 "levante_time_to_first_token_seconds_bucket", "levante_inter_token_latency_seconds_bucket"]:
        assert name in text


def _metric(base: str, name: str, **labels) -> float:
    """The sample `name` of model "tiny"."""
    return metric(base, name, model_name="tiny", **labels)


def test_disconnect_aborts_and_frees_the_cache(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=8192, warmup=False)
    with live_server(llm, "tiny") as (base, _):
        body = {"model": "tiny", "messages": MSG, "max_tokens": 8000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            assert _metric(base, "levante_kv_cache_usage_ratio") > 0
            r.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 10
        while _metric(base, "levante_num_requests_running") or _metric(base, "levante_kv_cache_usage_ratio"):
            assert time.monotonic() < deadline, "the aborted request still holds the cache"
            time.sleep(0.05)
        assert _metric(base, "levante_requests_total", finish_reason="abort") == 1
        assert _metric(base, "levante_generation_tokens_total") < 8000


def test_a_client_gone_before_a_whole_answer_aborts_it(tiny_model):
    """Non-streamed requests too: a client that disconnects (a timeout, a closed tab) aborts the
    generation and frees its cache, rather than leaving it to run to max_tokens."""
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=8192, warmup=False)
    run_long = {"max_tokens": 8000, "ignore_eos": True, "temperature": 0}
    bodies = {"/v1/chat/completions": {"messages": MSG, **run_long}, "/v1/completions": {"prompt": "Once", **run_long},
              "/v1/responses": {"input": "Hello", "max_output_tokens": 8000, "temperature": 0}}
    with live_server(llm, "tiny") as (base, _):
        port = int(base.rsplit(":", 1)[1])
        for done, (path, body) in enumerate(bodies.items(), start=1):
            payload = json.dumps({"model": "tiny", **body}).encode()
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                deadline = time.monotonic() + 30
                while not _metric(base, "levante_kv_cache_usage_ratio"):  # it is generating
                    assert time.monotonic() < deadline, f"{path}: the request never started"
                    time.sleep(0.02)
            deadline = time.monotonic() + 10
            while _metric(base, "levante_num_requests_running") or _metric(base, "levante_kv_cache_usage_ratio"):
                assert time.monotonic() < deadline, f"{path}: the abandoned request still runs"
                time.sleep(0.05)
            assert _metric(base, "levante_requests_total", finish_reason="abort") == done, path
        assert httpx.get(f"{base}/health").status_code == 200


def test_32_concurrent_streams(server):
    base = server[0]
    prompt_tokens = httpx.post(f"{base}/tokenize", json={"messages": MSG}).json()["count"]

    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=16 + i % 5, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        return i, chunks[-1].usage

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    for i, usage in asyncio.run(run_all()):
        assert usage.completion_tokens == 16 + i % 5
        assert usage.prompt_tokens == prompt_tokens


def test_responses_api(client):
    r = client.responses.create(model="tiny", input="Hello", instructions="Be brief.", max_output_tokens=8,
                                temperature=0)
    assert r.output[0].type == "message" and r.output_text
    events = list(client.responses.create(model="tiny", input="Hello", instructions="Be brief.",
                                          max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text


def test_api_key(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", warmup=False)
    with live_server(llm, "tiny", api_key="sesame") as (base, _):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="sesame", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        assert httpx.get(f"{base}/health").status_code == 200  # health stays open for probes
