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


TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer"}}}}}
# Issue 28: a call whose arguments are no JSON made `json.loads` raise inside the parser: a 500.
MALFORMED_CALL = '{"name": "get_time", "arguments": {"zone" 1}}'


def _forced(reply: str, **body) -> dict:
    """A chat request with a tool whose reply the grammar fixes to `reply` (what the model writes)."""
    return {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [TIME_TOOL], "max_tokens": 120,
            "temperature": 0, "grammar": {"type": "lark", "value": f"start: {json.dumps(reply)}"}, **body}


def test_malformed_tool_call_json_is_text_not_a_500(client):
    r = client.post("/v1/chat/completions", json=_forced(MALFORMED_CALL))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"] == MALFORMED_CALL and not message.get("tool_calls")
    with client.stream("POST", "/v1/chat/completions", json=_forced(MALFORMED_CALL, stream=True)) as streamed:
        assert streamed.status_code == 200
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)


def test_a_parser_that_raises_is_a_request_error_not_an_unhandled_one(client, monkeypatch):
    """Defence in depth: whatever a parser raises ends the request as the pipeline's errors do (the
    TestClient re-raises an exception the app leaves unhandled)."""
    from levante.serve.tool_parsers import StreamingToolParser

    def boom(*args, **kwargs):
        raise RuntimeError("a parser bug")

    monkeypatch.setattr(StreamingToolParser, "_advance", boom)
    r = client.post("/v1/chat/completions", json=_forced("It is noon."))
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError: a parser bug"
    streamed = client.post("/v1/chat/completions", json=_forced("It is noon.", stream=True))  # fails on its first chunk
    assert streamed.status_code == 500 and "a parser bug" in streamed.json()["error"]["message"]
    r = client.post("/v1/responses", json={"input": "What time is it?", "tools": [TIME_TOOL["function"] | {
        "type": "function"}], "max_output_tokens": 5})
    assert r.status_code == 500 and "a parser bug" in r.json()["error"]["message"]
