"""The server in front of many users: bounded inputs, keys, overload, slow clients, honest health.

Every refusal is OpenAI's error JSON naming the field; nothing that a client sends reaches the
engine unchecked, and no client can take the server (or the requests beside its own) down.
"""
import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from levante import LLM
from levante.serve.limits import RequestLimits
from live_server import live_server

MSG = [{"role": "user", "content": "Say something."}]
LIMITS = RequestLimits(max_body_bytes=64 << 10, max_json_depth=16, max_prompts=3, max_logit_bias=4, max_stop=2,
                       max_stop_length=8, max_messages=4, max_tools=2, max_images=1)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256, max_num_seqs=4, warmup=False)


@pytest.fixture(scope="module")
def server(llm):
    with live_server(llm, "tiny", limits=LIMITS) as (base, state):
        yield base, state


def chat(base, **fields):
    return httpx.post(f"{base}/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, **fields}, timeout=30)


def tool(name):
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


@pytest.mark.parametrize("fields, param", [
    ({"stop_token_ids": [999999], "min_tokens": 2}, "stop_token_ids"),  # once indexed the logits: a dead batch
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 1, "2": 1, "3": 1, "4": 1, "5": 1}}, "logit_bias"),
    ({"logit_bias": {"٣": 1}}, "logit_bias"),
    ({"top_k": -5}, "top_k"),
    ({"seed": 1 << 64}, "seed"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"stop": ["a", "b", "c"]}, "stop"),
    ({"stop": ["far too long a stop"]}, "stop"),
    ({"messages": MSG * 5}, "messages"),
    ({"tools": [tool("a"), tool("b"), tool("c")]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}] * 2}]},
     "messages"),
])
def test_bad_parameters_are_refused_naming_the_field(server, fields, param):
    r = chat(server[0], **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(param) or param in (error["param"] or ""), error


def test_numbers_that_are_not_numbers(server):
    body = json.dumps({"messages": MSG, "max_tokens": 4, "temperature": 1}).replace('"temperature": 1',
                                                                                   '"temperature": NaN')
    r = httpx.post(f"{server[0]}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    raw = '{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e309}'  # parsed as inf
    r = httpx.post(f"{server[0]}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "repetition_penalty" in r.json()["error"]["message"]


def test_lone_surrogates_and_deep_nesting(server):
    base = server[0]
    raw = '{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    r = httpx.post(f"{base}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
    paired = '{"messages": [{"role": "user", "content": "emoji \\ud83d\\ude00"}], "max_tokens": 2}'
    assert httpx.post(f"{base}/v1/chat/completions", content=paired,
                      headers={"content-type": "application/json"}).status_code == 200
    deep = {"a": 1}
    for _ in range(40):
        deep = {"a": deep}
    r = chat(base, chat_template_kwargs=deep)
    assert r.status_code == 400 and "nests deeper" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/tokenize", content="[" * 20000 + "]" * 20000, headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_bodies_past_the_limit_are_refused_while_read(server):
    base = server[0]
    big = {"messages": [{"role": "user", "content": "x" * (100 << 10)}]}
    r = httpx.post(f"{base}/v1/chat/completions", json=big)
    assert r.status_code == 413 and "larger" in r.json()["error"]["message"]

    def chunks():  # no content-length: the limit is counted as the body arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(200):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(f"{base}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_completion_prompts_are_checked(server):
    base = server[0]
    r = httpx.post(f"{base}/v1/completions", json={"prompt": ["a", "b", "c", "d"], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt")
    r = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 2, 100000], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt")
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "x " * 400, "max_tokens": 2})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_a_slow_grammar_is_refused(llm):
    # 0 s: refused however fast the compile (1e-6 s raced a tiny vocabulary's compile on another thread)
    with live_server(llm, "tiny", limits=RequestLimits(grammar_timeout=0)) as (base, _):
        r = chat(base, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"k": {"type": "string", "pattern": "^[a-z]{3,17}$"}}}}})
        assert r.status_code == 400 and "grammar-timeout" in r.json()["error"]["message"]
        assert chat(base).status_code == 200


def test_every_route_but_health_needs_the_key(llm):
    with live_server(llm, "tiny", api_key="sesame") as (base, _):
        for path in ("/metrics", "/v1/models", "/openapi.json", "/metrics/../v1/models", "/docsx"):
            assert httpx.get(f"{base}{path}").status_code == 401, path
        assert httpx.get(f"{base}/docs").status_code == 200  # a page without data: its schema needs the key
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sesam"}).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": MSG}, headers={"Host": "evil"})
        assert r.status_code == 421  # a name it does not answer to, key or not (test_server_sites.py)
    with live_server(llm, "tiny", api_key="sesame", open_metrics=True) as (base, _):
        assert httpx.get(f"{base}/metrics").status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 401


def test_the_mcp_port_needs_the_key(llm):
    from levante.mcp import McpConfig, McpToolManager
    from mcp_servers import levante_mcp_server

    with levante_mcp_server(llm, api_key="sesame") as (_, url):
        assert httpx.post(url, json={}).status_code == 401

        async def call(token):
            server = {"name": "levante", "source": {"type": "Http", "url": url}}
            if token:
                server["bearer_token"] = token
            manager = McpToolManager(McpConfig.from_dict({"servers": [server]}))
            await manager.start()
            try:
                if manager.failures:
                    return None
                return await manager.call_tool("levante_chat", {"message": "Hi", "max_tokens": 3, "temperature": 0})
            finally:
                await manager.aclose()

        assert asyncio.run(call(None)) is None
        result = asyncio.run(call("sesame"))
        assert result is not None and not result.is_error


def test_a_full_waiting_room_answers_429(llm):
    limits = RequestLimits(max_waiting_requests=0)  # 4 running sequences (max_num_seqs), none waiting
    with live_server(llm, "tiny", limits=limits) as (base, state):
        long = {"messages": MSG, "max_tokens": 200, "ignore_eos": True, "stream": True}
        streams = [httpx.stream("POST", f"{base}/v1/chat/completions", json=long, timeout=30) for _ in range(4)]
        responses = [s.__enter__() for s in streams]
        try:
            for r in responses:
                assert r.status_code == 200
            r = chat(base)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        deadline = time.monotonic() + 10
        while state.pipeline.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert chat(base).status_code == 200


def test_health_tells_a_stalled_and_a_dead_engine(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=128, warmup=False)
    model = llm.engine.model
    original = model.forward
    with live_server(llm, "tiny") as (base, state):
        state.router.default.loop.stall_seconds = 0.5

        def slow(*args, **kwargs):
            time.sleep(1.5)
            return original(*args, **kwargs)

        model.forward = slow
        threading.Thread(target=chat, args=(base,), daemon=True).start()
        time.sleep(1.0)
        assert httpx.get(f"{base}/health").status_code == 503  # a step running far too long
        del model.forward
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)

        def die(*args, **kwargs):
            raise SystemExit("the loop thread ends")  # not an Exception: nothing in the loop catches it

        llm.engine.add_request = die
        r = chat(base)
        assert r.status_code == 503 and "stopped" in r.json()["error"]["message"]
        assert httpx.get(f"{base}/health").status_code == 503
        started = time.monotonic()
        assert chat(base).status_code == 503 and time.monotonic() - started < 2  # fails fast


def test_slowloris_does_not_stop_real_clients(llm):
    limits = RequestLimits(header_timeout=1.5, body_timeout=1.5, max_connections=64)
    with live_server(llm, "tiny", limits=limits) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        slow = []
        for _ in range(300):  # half-open requests: headers that never end
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(s)
        body_slow = socket.create_connection(("127.0.0.1", port))
        body_slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          b"content-length: 1000\r\n\r\n{\"prompt\"")
        for _ in range(3):  # real clients get in at once, while the slow ones hold their sockets
            started = time.monotonic()
            assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 200
            assert time.monotonic() - started < 2
        time.sleep(2.5)
        closed = 0
        for s in slow + [body_slow]:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            s.close()
        assert closed == len(slow) + 1  # evicted to make room, or timed out
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3).choices[0].message
