"""McpToolManager against real MCP servers: list and call each, stdio and streamable HTTP, failures."""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from levante.mcp import McpConfig, McpToolManager, ToolCallResult
from live_server import free_port
from mcp_servers import git_server, make_git_repo, npm_server, time_server, wait_for_port

OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def manager_for(servers: dict, **top) -> McpToolManager:
    return McpToolManager(McpConfig.from_dict({"mcpServers": servers, **top}), startup_timeout_secs=60)


def by_server(manager: McpToolManager) -> dict[str, set[str]]:
    tools: dict[str, set[str]] = {}
    for tool in manager.tools:
        tools.setdefault(tool.server_id, set()).add(tool.tool_name)
    return tools


def test_python_servers_list_and_call(tmp_path):
    repo = make_git_repo(tmp_path / "repo")

    async def main():
        manager = manager_for({"time": time_server(), "git": git_server(repo)})
        await manager.start()
        try:
            assert manager.failures == {}
            tools = by_server(manager)
            assert {"get_current_time", "convert_time"} <= tools["time"]
            assert {"git_status", "git_log", "git_diff"} <= tools["git"]
            offered = manager.openai_tools()
            assert all(OPENAI_NAME.match(t["function"]["name"]) and t["type"] == "function" for t in offered)
            assert {"time_get_current_time", "git_git_log"} <= {t["function"]["name"] for t in offered}

            now = await manager.call_tool("time_get_current_time", {"timezone": "Asia/Tokyo"})
            assert not now.is_error
            stamp = datetime.fromisoformat(json.loads(now.content)["datetime"])
            assert stamp.utcoffset() == timedelta(hours=9)
            assert abs((stamp - datetime.now(timezone.utc)).total_seconds()) < 120
            bad = await manager.call_tool("time_get_current_time", {"timezone": "Mars/Olympus_Mons"})
            assert bad.is_error and "Mars/Olympus_Mons" in bad.content

            log = await manager.call_tool("git_git_log", {"repo_path": str(repo)})
            assert not log.is_error and "first commit" in log.content
        finally:
            await manager.aclose()

    asyncio.run(main())


def test_npm_servers_list_and_call(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    servers = {
        "fs": {"command": npm_server("mcp-server-filesystem"), "args": [str(files)]},
        "memory": {"command": npm_server("mcp-server-memory"), "env": {"MEMORY_FILE_PATH": str(tmp_path / "m.jsonl")}},
        "everything": {"command": npm_server("mcp-server-everything"), "args": ["stdio"]},
    }

    async def main():
        manager = manager_for(servers)
        await manager.start()
        try:
            assert manager.failures == {}
            tools = by_server(manager)
            assert {"read_text_file", "write_file", "list_directory"} <= tools["fs"]
            assert {"create_entities", "search_nodes", "read_graph"} <= tools["memory"]
            assert {"echo", "get-sum"} <= tools["everything"]
            assert all(OPENAI_NAME.match(t["function"]["name"]) for t in manager.openai_tools())

            wrote = await manager.call_tool("fs_write_file", {"path": str(files / "note.txt"), "content": "levante"})
            assert not wrote.is_error and (files / "note.txt").read_text() == "levante"
            read = await manager.call_tool("fs_read_text_file", {"path": str(files / "note.txt")})
            assert read == ToolCallResult("levante", False)
            outside = await manager.call_tool("fs_read_text_file", {"path": "/etc/hostname"})
            assert outside.is_error

            entity = {"name": "Levante", "entityType": "project", "observations": ["an LLM server"]}
            created = await manager.call_tool("memory_create_entities", {"entities": [entity]})
            assert not created.is_error
            found = await manager.call_tool("memory_search_nodes", {"query": "Levante"})
            assert "an LLM server" in found.content

            echo = await manager.call_tool("everything_echo", {"message": "hola"})
            assert echo == ToolCallResult("Echo: hola", False)
            total = await manager.call_tool("everything_get-sum", {"a": 2, "b": 40})
            assert "42" in total.content and not total.is_error
        finally:
            await manager.aclose()

    asyncio.run(main())


def test_streamable_http_transport():
    port = free_port()
    process = subprocess.Popen([npm_server("mcp-server-everything"), "streamableHttp"], env={**os.environ,
                               "PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)

        async def main():
            config = {"servers": [{"name": "everything", "tool_prefix": "ev",
                                   "source": {"type": "Http", "url": f"http://127.0.0.1:{port}/mcp"}}]}
            manager = McpToolManager(McpConfig.from_dict(config))
            await manager.start()
            try:
                assert manager.failures == {}
                assert "ev_echo" in {t["function"]["name"] for t in manager.openai_tools()}
                assert await manager.call_tool("ev_echo", {"message": "over http"}) == \
                    ToolCallResult("Echo: over http", False)
            finally:
                await manager.aclose()

        asyncio.run(main())
    finally:
        process.terminate()
        process.wait(10)


def test_failing_servers_are_reported_and_the_others_work(tmp_path):
    servers = {
        "time": time_server(),
        "missing": {"command": str(tmp_path / "no-such-server")},
        "quits": {"command": sys.executable, "args": ["-c", "import sys; sys.stderr.write('bad config\\n')"]},
        "nowhere": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
        "socket": {"type": "ws", "url": "ws://127.0.0.1:1/mcp"},
    }

    async def main():
        manager = manager_for(servers)
        await manager.start()
        try:
            failures = manager.failures
            assert set(failures) == {"missing", "quits", "nowhere", "socket"}
            assert "No such file" in failures["missing"]
            assert "bad config" in failures["quits"]  # what it wrote to stderr is in the report
            assert "WebSocket" in failures["socket"]
            assert {t.server_id for t in manager.tools} == {"time"}
            assert not (await manager.call_tool("time_get_current_time", {"timezone": "UTC"})).is_error
            unknown = await manager.call_tool("missing_anything", {})
            assert unknown.is_error and "no MCP tool" in unknown.content
        finally:
            await manager.aclose()

    asyncio.run(main())


def test_a_server_that_dies_mid_session(tmp_path):
    pid_file = tmp_path / "time.pid"
    servers = {"time": time_server(pid_file),
               "everything": {"command": npm_server("mcp-server-everything"), "args": ["stdio"]}}

    async def main():
        manager = manager_for(servers)
        await manager.start()
        try:
            assert not (await manager.call_tool("time_get_current_time", {"timezone": "UTC"})).is_error
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            dead = await manager.call_tool("time_get_current_time", {"timezone": "UTC"})
            assert dead.is_error and "'time'" in dead.content
            for _ in range(50):  # the call or the health check notices the death
                if "time" in manager.failures:
                    break
                await asyncio.sleep(0.1)
            assert "connection closed" in manager.failures["time"]
            assert await manager.call_tool("everything_echo", {"message": "still here"}) == \
                ToolCallResult("Echo: still here", False)
            again = await manager.call_tool("time_get_current_time", {"timezone": "UTC"})
            assert again.is_error and "not running" in again.content
        finally:
            await manager.aclose()

    asyncio.run(main())


def test_tool_timeout_and_concurrency_limit():
    servers = {"everything": {"command": npm_server("mcp-server-everything"), "args": ["stdio"]}}

    async def main():
        manager = manager_for(servers, tool_timeout_secs=1, max_concurrent_calls=1)
        await manager.start()
        try:
            started = time.monotonic()
            slow = await manager.call_tool("everything_trigger-long-running-operation", {"duration": 20, "steps": 2})
            assert slow.is_error and "timed out after 1s" in slow.content
            assert time.monotonic() - started < 10
            # One call at a time: two 0.6 s operations take at least 1.2 s.
            started = time.monotonic()
            results = await asyncio.gather(*[manager.call_tool("everything_trigger-long-running-operation",
                                                               {"duration": 0.6, "steps": 1}) for _ in range(2)])
            assert not any(r.is_error for r in results)
            assert time.monotonic() - started >= 1.2
            assert (await manager.call_tool("everything_echo", {"message": "ok"})).content == "Echo: ok"
        finally:
            await manager.aclose()

    asyncio.run(main())


def test_usable_from_any_event_loop():
    manager = manager_for({"time": time_server()})
    asyncio.run(manager.start())  # started on one loop ...
    results = []
    thread = threading.Thread(target=lambda: results.append(
        asyncio.run(manager.call_tool("time_get_current_time", {"timezone": "Europe/Madrid"}))))
    thread.start()  # ... called from another loop in another thread ...
    thread.join(60)
    results.append(asyncio.run(manager.call_tool("time_convert_time", {
        "source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"})))
    asyncio.run(manager.aclose())  # ... and closed from a third
    assert [r.is_error for r in results] == [False, False]
    assert "Europe/Madrid" in results[0].content and "21:00" in results[1].content
    closed = asyncio.run(manager.call_tool("time_get_current_time", {"timezone": "UTC"}))
    assert closed.is_error


def test_auto_register_off_offers_nothing_but_calls_work():
    async def main():
        manager = manager_for({"time": time_server()}, auto_register_tools=False)
        await manager.start()
        try:
            assert manager.openai_tools() == [] and manager.tools
            assert not (await manager.call_tool("time_get_current_time", {"timezone": "UTC"})).is_error
        finally:
            await manager.aclose()

    asyncio.run(main())
