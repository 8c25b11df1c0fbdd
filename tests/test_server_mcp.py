"""The server-side MCP tool loop with the default model and the real time server, through the openai client."""
import asyncio
import json
import os
import signal

import openai
import pytest

from levante.mcp import McpConfig, McpToolManager
from live_server import live_server
from mcp_servers import assert_answers_from_the_tool, npm_server, time_server

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder:0.5b"
TOKYO = [{"role": "user", "content": "What time is it in Tokyo?"}]


@pytest.fixture
def serve(default_llm):
    """serve(servers) -> (openai client, manager): the default model behind a server with these MCP servers."""
    opened = []

    def start(servers: dict):
        manager = McpToolManager(McpConfig.from_dict({"mcpServers": servers}))
        asyncio.run(manager.start())
        context = live_server(default_llm, MODEL, mcp=manager)
        base, _ = context.__enter__()
        opened.append((context, manager))
        return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=600), manager

    yield start
    for context, manager in opened:
        context.__exit__(None, None, None)
        manager.close()


def test_tokyo_time_from_the_time_server(serve):
    client, _ = serve({"time": time_server()})
    response = client.chat.completions.create(model=MODEL, messages=TOKYO, temperature=0, max_tokens=100)
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    calls = choice.message.model_extra["mcp_calls"]
    assert_answers_from_the_tool(choice.message.content, calls)
    assert all(c["server"] == "time" and c["id"].startswith("call_") for c in calls)
    assert response.usage.prompt_tokens > 500  # every round's prompt is counted

    stream = client.chat.completions.create(model=MODEL, messages=TOKYO, temperature=0, max_tokens=100,
                                            stream=True, stream_options={"include_usage": True})
    content, streamed_calls, reasons, usage = "", [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            assert choice.delta.tool_calls is None
            content += choice.delta.content or ""
            streamed_calls += (choice.delta.model_extra or {}).get("mcp_calls") or []
            reasons.append(choice.finish_reason)
    assert reasons[-1] == "stop" and reasons.count("stop") == 1
    assert_answers_from_the_tool(content, streamed_calls)
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_request_tools_are_the_clients_to_run(serve):
    client, _ = serve({"time": time_server()})
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}}, "required": ["city"]}}}
    response = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=60, tools=[tool],
                                              messages=[{"role": "user", "content": "Weather in Paris?"}])
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    assert "mcp_calls" not in (message.model_extra or {})


def test_a_server_that_crashed_is_reported_and_the_request_answered(serve, tmp_path):
    pid_file = tmp_path / "time.pid"
    client, manager = serve({"time": time_server(pid_file),
                             "everything": {"command": npm_server("mcp-server-everything"), "args": ["stdio"]}})
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    response = client.chat.completions.create(model=MODEL, messages=TOKYO, temperature=0, max_tokens=100)
    message = response.choices[0].message
    calls = message.model_extra["mcp_calls"]
    failed = [c for c in calls if c["server"] == "time"]
    assert failed and all(c["is_error"] for c in failed), calls
    assert "time" in failed[0]["content"] and ("died" in failed[0]["content"] or "not running" in failed[0]["content"])
    assert response.choices[0].finish_reason in ("stop", "length") and message.content
    assert "time" in manager.failures and "everything" not in manager.failures
    assert (asyncio.run(manager.call_tool("everything_echo", {"message": "alive"}))).content == "Echo: alive"


def test_responses_api_runs_the_loop(serve):
    client, _ = serve({"time": time_server()})
    response = client.responses.create(model=MODEL, input="What time is it in Tokyo?", temperature=0,
                                       max_output_tokens=100)
    calls = [item for item in response.output if item.type == "mcp_call"]
    assert calls and calls[0].server_label == "time" and calls[0].name == "get_current_time" and not calls[0].error
    records = [{"name": "time_" + c.name, "arguments": c.arguments, "content": c.output, "is_error": False}
               for c in calls]
    assert response.status == "completed" and response.output[-1].type == "message"
    assert_answers_from_the_tool(response.output_text, records)

    stream = client.responses.create(model=MODEL, input="What time is it in Tokyo?", temperature=0,
                                     max_output_tokens=100, stream=True)
    events = list(stream)
    assert events[-1].type == "response.completed"
    assert [i.type for i in events[-1].response.output][-1] == "message"
    assert any(e.type == "response.output_item.done" and e.item.type == "mcp_call" for e in events)


def test_messages_api_runs_the_loop(serve):
    import anthropic
    import httpx

    client, _ = serve({"time": time_server()})
    base = str(client.base_url).removesuffix("/v1/")
    body = {"model": MODEL, "max_tokens": 100, "messages": TOKYO, "temperature": 0}
    message = httpx.post(f"{base}/v1/messages", json=body, timeout=600).json()
    kinds = [block["type"] for block in message["content"]]
    assert kinds[:2] == ["mcp_tool_use", "mcp_tool_result"] and kinds[-1] == "text"
    use, result = message["content"][:2]
    assert use["server_name"] == "time" and result["tool_use_id"] == use["id"] and not result["is_error"]
    records = [{"name": b["name"], "arguments": json.dumps(b["input"]), "content": r["content"][0]["text"],
                "is_error": r["is_error"]} for b, r in zip(message["content"][0:-1:2], message["content"][1:-1:2])]
    assert_answers_from_the_tool(message["content"][-1]["text"], records)
    assert message["stop_reason"] == "end_turn"
    sdk = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=600)
    with sdk.messages.stream(model=MODEL, max_tokens=100, messages=TOKYO, extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert final.content[-1].type == "text" and final.stop_reason == "end_turn"
