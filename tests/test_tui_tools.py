"""`levante chat` with real tools: the official MCP time server through `McpToolHost`, and (slow) the
default model deciding to call a tool itself."""
from __future__ import annotations

import asyncio
import datetime
import json
import sys

import openai
import pytest

from levante.tui.app import ChatApp
from levante.tui.session import ChatSession, Settings
from levante.conversations import ConversationStore
from levante.tui.widgets import ToolCallView
from scripted_openai import scripted_endpoint, text, tool_call
from test_tui import _answers, _notices, _type, _until


@pytest.fixture
def mcp_config(tmp_path):
    pytest.importorskip("mcp_server_time")
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "time": {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]},
        "broken": {"command": str(tmp_path / "no-such-server")}}}))
    return path


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "chats.sqlite3")
    yield s
    s.close()


def _host(path):
    from levante.tui.main import load_tools

    return load_tools(str(path))


def test_scripted_model_calls_the_real_mcp_time_server(mcp_config, store):
    """Scripted endpoint asks for `time_get_current_time`; the real MCP server answers; the app shows it."""
    async def run(base_url, endpoint):
        host = _host(mcp_config)
        endpoint.scripts = [[tool_call(0, "call_t", "time_get_current_time", '{"timezone": "Asia/Tokyo"}')],
                            [text("It is late in Tokyo.")]]
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
        app = ChatApp(ChatSession(client, "scripted", host), store, tools_host=host)
        async with app.run_test() as pilot:
            await _until(pilot, lambda: host.started and host.openai_tools(), 60, "the MCP servers")
            await _until(pilot, lambda: any(n.startswith("MCP: 2 tool(s) ready") for n in _notices(app)), 10,
                         "the ready notice")
            assert "failed: broken:" in [n for n in _notices(app) if n.startswith("MCP:")][0]
            await _type(pilot, "/tools")
            listing = _notices(app)[-1]
            assert "time_get_current_time" in listing and "time_convert_time" in listing
            assert "failed server broken:" in listing and "no-such-server" in listing
            await _type(pilot, "What time is it in Tokyo?")
            await _until(pilot, lambda: not app.generating and _answers(app), 60, "the answer")
            (view,) = app.query(ToolCallView)
            await pilot.press("ctrl+q")
            await _until(pilot, lambda: not host.started, 30, "the MCP servers to close")
            return view, endpoint.requests

    with scripted_endpoint() as (base_url, endpoint):
        view, requests = asyncio.run(run(base_url, endpoint))
    assert view.collapsed and not view.is_error
    result = json.loads(view.result)
    assert result["timezone"] == "Asia/Tokyo"
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((datetime.datetime.fromisoformat(result["datetime"]) - now).total_seconds()) < 120
    assert {t["function"]["name"] for t in requests[0]["tools"]} == {"time_get_current_time", "time_convert_time"}
    assert requests[1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_t", "content": view.result}


@pytest.mark.slow  # loads the default model and generates on CPU
def test_default_model_calls_the_mcp_tool_itself(mcp_config, store, default_llm):
    """The real road end to end: local levante server, default model, real MCP server, the app's pilot."""
    from levante.tui.local import LocalServer

    async def run(server):
        host = _host(mcp_config)
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300)
        session = ChatSession(client, "qwen2.5-coder:0.5b", host, Settings(temperature=0.0, max_tokens=60))
        session.max_tool_rounds = 1  # then tool_choice none: a 0.5B model would call it again and again
        app = ChatApp(session, store, tools_host=host)
        async with app.run_test() as pilot:
            await _until(pilot, lambda: host.started and host.openai_tools(), 60, "the MCP servers")
            await _type(pilot, "What is the current time in Tokyo (timezone Asia/Tokyo)? Use the tool.")
            await _until(pilot, lambda: not app.generating, 300, "the answer")
            views = list(app.query(ToolCallView))
            answers, notices = _answers(app), _notices(app)
            await app.action_quit()
            return views, answers, notices, session.messages

    with LocalServer(default_llm, "qwen2.5-coder:0.5b") as server:
        views, answers, notices, messages = asyncio.run(run(server))
    assert views, (answers, notices)
    assert views[0].tool_name == "time_get_current_time" and not views[0].is_error
    assert json.loads(views[0].result)["timezone"] == "Asia/Tokyo"
    # the model called the tool, read the result, and the turn ended with a text message (tool_choice none)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[-1]["content"] and "tool_calls" not in messages[-1]
    assert not any(n.startswith("error") for n in notices), notices
