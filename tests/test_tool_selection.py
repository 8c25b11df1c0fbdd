"""Tool selection's rules, without a ranking model (the tools then keep their order): when it selects,
the count and token budgets, named tools, earlier calls and `always_offer`. Ranking by the packaged
MiniLM over the real servers' tools is tests/test_mcp_nine.py."""
import json

from levante.mcp import McpTool
from levante.serve.tool_selection import ToolSelector


def tool(server: str, name: str, description: str = "does things", size: int = 0) -> McpTool:
    parameters = {"type": "object", "properties": {"padding": {"type": "string", "description": "x" * size}}}
    return McpTool(f"{server}_{name}", server, name, description, parameters)


TOOLS = [tool("time", "get_current_time"), tool("time", "convert_time"), tool("fetch", "fetch"),
         tool("sqlite", "read_query"), tool("sqlite", "list_tables"), tool("memory", "search_nodes")]


def names(selector: ToolSelector, text: str = "hello", **message) -> list[str]:
    return [t.name for t in selector.select([{"role": "user", "content": text, **message}])]


def tokens(tools) -> int:
    return sum(len(json.dumps(t.to_openai())) for t in tools)


def test_every_tool_while_they_fit_the_budget():
    selector = ToolSelector(TOOLS, max_tools=6, max_tool_tokens=tokens(TOOLS), count_tokens=len)
    assert not selector.selects and names(selector) == [t.name for t in TOOLS]
    assert not ToolSelector(TOOLS, 0, tokens(TOOLS), len).selects  # 0: no cap by count


def test_the_count_and_the_token_budget():
    by_count = ToolSelector(TOOLS, max_tools=3, max_tool_tokens=1 << 30, count_tokens=len)
    assert by_count.selects and names(by_count) == [t.name for t in TOOLS[:3]]

    big = tool("git", "git_log", size=2000)
    tools = [TOOLS[0], big, TOOLS[1]]
    by_tokens = ToolSelector(tools, max_tools=10, max_tool_tokens=tokens([TOOLS[0], TOOLS[1]]), count_tokens=len)
    assert by_tokens.selects and names(by_tokens) == ["time_get_current_time", "time_convert_time"]  # big skipped

    first_alone = ToolSelector([big, TOOLS[0]], max_tools=10, max_tool_tokens=10, count_tokens=len)
    assert names(first_alone) == ["git_git_log"]  # the best tool is offered even when it alone exceeds the budget


def test_named_tools_and_earlier_calls_are_always_offered():
    selector = ToolSelector(TOOLS, max_tools=2, max_tool_tokens=1 << 30, count_tokens=len)
    # by the offered name, or the server's own name when it has a _ or -; a plain word ("fetch") names nothing
    assert names(selector, "Use memory_search_nodes and READ_QUERY, then fetch it") == \
        ["sqlite_read_query", "memory_search_nodes"]
    assert names(selector, "Use my_read_query_tool") == ["time_get_current_time", "time_convert_time"]
    earlier = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "sqlite_list_tables", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "orders"}, {"role": "user", "content": "and?"}]
    assert [t.name for t in selector.select(earlier)] == ["time_get_current_time", "sqlite_list_tables"]
    many = ToolSelector(TOOLS, max_tools=1, max_tool_tokens=1 << 30, count_tokens=len)
    assert len(names(many, "time_convert_time, sqlite_list_tables and fetch_fetch")) == 3  # beyond the count


def test_always_offered_servers():
    selector = ToolSelector(TOOLS, max_tools=3, max_tool_tokens=1 << 30, count_tokens=len,
                            always_offer=frozenset({"sqlite"}))
    assert names(selector) == ["time_get_current_time", "sqlite_read_query", "sqlite_list_tables"]  # as registered
