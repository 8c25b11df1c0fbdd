"""Nine real MCP servers at once, started from one config file, as a user with a real setup has them.

time, git, fetch, sqlite (PyPI; sqlite archived, in its own virtual environment with the 1.x MCP SDK),
filesystem, memory, everything, sequential-thinking (npm), and a second levante's `--mcp-port` server
over streamable HTTP. One tool of each is called and its result checked; then the selection of tools
over their 59, and (slow) the default model answering with all nine registered.
"""
import asyncio
import json
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import httpx
import openai
import pytest

from levante import LLM
from levante.mcp import McpConfig, McpToolManager
from levante.search import embed_with
from levante.serve.tool_selection import ToolSelector
from live_server import live_server
from mcp_servers import (assert_answers_from_the_tool, fetch_server, git_server, levante_mcp_server, loopback_site,
                         make_git_repo, npm_server, sqlite_server, time_server)

SERVERS = {"time", "git", "fetch", "sqlite", "filesystem", "memory", "everything", "thinking", "levante"}
ORDERS = 23
MODEL = "qwen2.5-coder:0.5b"
PAGE = ("<html><head><title>Levante</title></head><body><h1>Levante</h1>"
        "<p>The secret word is marmalade.</p></body></html>")


def make_shop(path):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total REAL)")
        db.executemany("INSERT INTO customers (name) VALUES (?)", [("Ana",), ("Bo",), ("Cy",)])
        db.executemany("INSERT INTO orders (customer_id, total) VALUES (?, ?)",
                       [(1 + i % 3, 10.0 + i) for i in range(ORDERS)])
    return path


@pytest.fixture(scope="module")
def nine(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("nine")
    files = folder / "files"
    files.mkdir()
    (files / "notes.txt").write_text("The launch code is 4321.\n")
    pages = {"/robots.txt": "User-agent: *\nAllow: /\n", "/": PAGE}
    second = LLM(str(tiny_model("qwen2")), dtype="float32", max_model_len=256, warmup=False)
    with loopback_site(pages) as (site, requested), levante_mcp_server(second) as (levante, url):
        servers = {
            "time": time_server(), "git": git_server(make_git_repo(folder / "repo")), "fetch": fetch_server(),
            "sqlite": sqlite_server(make_shop(folder / "shop.db")),
            "filesystem": {"command": npm_server("mcp-server-filesystem"), "args": [str(files)]},
            "memory": {"command": npm_server("mcp-server-memory"),
                       "env": {"MEMORY_FILE_PATH": str(folder / "memory.jsonl")}},
            "everything": {"command": npm_server("mcp-server-everything"), "args": ["stdio"]},
            "thinking": {"command": npm_server("mcp-server-sequential-thinking")},
            "levante": {"url": url},
        }
        config = folder / "mcp.json"
        config.write_text(json.dumps({"mcpServers": servers}))
        manager = McpToolManager(McpConfig.load(config), startup_timeout_secs=120)
        asyncio.run(manager.start())
        try:
            yield SimpleNamespace(manager=manager, site=site, requested=requested, files=files, repo=folder / "repo",
                                  levante=levante)
        finally:
            manager.close()


def test_nine_servers_start_together_and_each_answers(nine):
    manager = nine.manager
    assert manager.failures == {}
    assert {tool.server_id for tool in manager.tools} == SERVERS
    assert len(manager.tools) == len({tool.name for tool in manager.tools}) > 50

    async def call(name: str, arguments: dict) -> str:
        result = await manager.call_tool(name, arguments)
        assert not result.is_error, (name, result.content)
        return result.content

    async def main():
        now = json.loads(await call("time_get_current_time", {"timezone": "Asia/Tokyo"}))
        stamp = datetime.fromisoformat(now["datetime"])
        assert stamp.utcoffset() == timedelta(hours=9)
        assert abs((stamp - datetime.now(timezone.utc)).total_seconds()) < 120

        assert "first commit" in await call("git_git_log", {"repo_path": str(nine.repo)})

        page = await call("fetch_fetch", {"url": f"{nine.site}/"})
        assert "marmalade" in page and nine.requested == ["/robots.txt", "/"]  # loopback only, robots.txt first

        count = await call("sqlite_read_query", {"query": "SELECT COUNT(*) AS n FROM orders"})
        assert count == f"[{{'n': {ORDERS}}}]"

        notes = await call("filesystem_read_text_file", {"path": str(nine.files / "notes.txt")})
        assert notes == "The launch code is 4321.\n"

        entity = {"name": "Levante", "entityType": "project", "observations": ["serves nine MCP servers"]}
        await call("memory_create_entities", {"entities": [entity]})
        assert "serves nine MCP servers" in await call("memory_search_nodes", {"query": "Levante"})

        assert "42" in await call("everything_get-sum", {"a": 2, "b": 40})

        thought = json.loads(await call("thinking_sequentialthinking", {
            "thought": "Count the servers.", "thoughtNumber": 1, "totalThoughts": 1, "nextThoughtNeeded": False}))
        assert thought["thoughtNumber"] == 1 and thought["nextThoughtNeeded"] is False

        return await call("levante_chat", {"message": "Hello there", "max_tokens": 12, "temperature": 0})

    answer = asyncio.run(main())
    reference = httpx.post(f"{nine.levante}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0})
    assert answer and answer == reference.json()["choices"][0]["message"]["content"]


def test_a_question_about_files_ranks_the_filesystem_tools_first(nine, minilm):
    tools = nine.manager.offered_tools()
    selector = ToolSelector(tools, max_tools=16, max_tool_tokens=1 << 30, count_tokens=len,
                            embedder=lambda: embed_with(minilm))
    assert selector.selects  # 59 tools > 16

    def ranked(question: str) -> list[str]:
        return [tool.name for tool, _ in selector.ranked([{"role": "user", "content": question}])]

    def offered(question: str) -> list[str]:
        return [tool.name for tool in selector.select([{"role": "user", "content": question}])]

    files = ranked("List the files in my folder")
    assert files[0] == "filesystem_list_directory"
    assert all(name.startswith("filesystem_") for name in files[:6]), files
    assert "filesystem_list_directory" in offered("List the files in my folder")

    assert ranked("What time is it in Tokyo?")[:2] == ["time_get_current_time", "time_convert_time"]
    assert offered("What time is it in Tokyo?") == ["time_get_current_time", "time_convert_time"]  # a clear winner

    orders = ranked("How many orders are in the shop database?")
    assert all(name.startswith("sqlite_") for name in orders[:4]), orders
    assert "sqlite_read_query" in offered("How many orders are in the shop database?")

    named = offered("Run git_status, then tell me the time in Lima.")  # the git server's own name for the tool
    assert {"git_git_status", "time_get_current_time"} <= set(named) and len(named) <= 16

    always = ToolSelector(tools, 4, 1 << 30, len, embedder=None, always_offer=frozenset({"thinking"}))
    chosen = [t.name for t in always.select([{"role": "user", "content": "List the files in my folder"}])]
    assert chosen == [t.name for t in tools[:3]] + ["thinking_sequentialthinking"]  # no ranking model: in order


@pytest.fixture(scope="module")
def served(nine, default_llm):
    """The default model behind a server with all nine servers' tools (the packaged MiniLM ranks them)."""
    with live_server(default_llm, MODEL, mcp=nine.manager) as (base, state):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=900), base, state


@pytest.mark.slow
def test_tokyo_time_with_all_nine_servers(served, nine):
    client, base, state = served
    response = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=100,
                                              messages=[{"role": "user", "content": "What time is it in Tokyo?"}])
    choice = response.choices[0]
    offered = response.model_extra["mcp_tools_offered"]
    assert "time_get_current_time" in offered and len(offered) < len(nine.manager.tools)
    assert choice.finish_reason == "stop" and choice.message.content
    assert_answers_from_the_tool(choice.message.content, choice.message.model_extra["mcp_calls"])
    every_tool = state.router.default.llm.tokenizer.encode(json.dumps(nine.manager.openai_tools()))
    assert response.usage.prompt_tokens < len(every_tool)  # all rounds together, fewer than the 59 tools alone
    print(f"\nTokyo: {choice.message.content!r}; offered {len(offered)} of {len(nine.manager.tools)} tools; "
          f"prompt tokens {response.usage.prompt_tokens}")

    metrics = httpx.get(f"{base}/metrics").text
    assert f"levante_mcp_tools_registered {float(len(nine.manager.tools))}" in metrics
    assert float(re.search(r"^levante_mcp_tools_offered_count (\S+)$", metrics, re.M).group(1)) >= 1


@pytest.mark.slow
def test_orders_through_the_sqlite_server(served):
    client, _, _ = served
    response = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=100, messages=[
        {"role": "user", "content": "How many orders are in the shop database?"}])
    choice = response.choices[0]
    calls = choice.message.model_extra["mcp_calls"]
    counted = [c for c in calls if c["name"] == "sqlite_read_query" and not c["is_error"]]
    assert counted and str(ORDERS) in counted[-1]["content"], calls
    assert choice.finish_reason == "stop"
    assert str(ORDERS) in choice.message.content, choice.message.content
    print(f"\nOrders: {choice.message.content!r}; calls {[(c['name'], c['arguments']) for c in calls]}")
