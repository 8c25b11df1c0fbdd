"""The engine loop (idle means no CPU) and the minimal HTTP face over it."""
import json
import resource
import threading
import time

import pytest
from fastapi.testclient import TestClient

from levante import LLM, SamplingParams
from levante.engine.loop import EngineLoop
from levante.serve.app import ServerState, create_app


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), dtype="float32")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_idle_loop_uses_no_cpu(llm):
    loop = EngineLoop(llm.engine)
    try:
        done = threading.Event()
        loop.submit("a", [5, 6, 7], SamplingParams(max_tokens=4), lambda o: o.finished and done.set())
        assert done.wait(30)
        time.sleep(0.2)
        before = _cpu_seconds()
        time.sleep(1.0)
        assert _cpu_seconds() - before < 0.05
    finally:
        loop.stop()


def test_loop_reports_bad_requests_and_keeps_going(llm):
    loop = EngineLoop(llm.engine)
    try:
        errors, done = [], threading.Event()
        loop.submit("bad", [], SamplingParams(), errors.append)
        loop.submit("good", [5, 6], SamplingParams(max_tokens=3), lambda o: o.finished and done.set())
        assert done.wait(30)
        assert len(errors) == 1 and "empty" in str(errors[0])
    finally:
        loop.stop()


@pytest.fixture(scope="module")
def client(llm):
    state = ServerState("tiny")
    app = create_app(state)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        state.attach(llm)
        assert client.get("/health").status_code == 200
        yield client
    state.close()


def test_chat_completion(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 5
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_streamed_completion_joins_to_the_full_text(client):
    request = {"prompt": "hello", "max_tokens": 8, "temperature": 0}
    full = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == full


@pytest.mark.parametrize("body,status", [
    ({"messages": []}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404),
    ({"messages": [{"role": "user", "content": "x"}], "bogus_parameter": 1}, 400),
])
def test_bad_requests_get_openai_errors(client, body, status):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    assert "message" in r.json()["error"]
