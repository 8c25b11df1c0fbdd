"""The MCP config file: both shapes parse to the same dataclasses; every bad field is named."""
import json
import re

import pytest

from levante.mcp import McpConfig, McpConfigError
from levante.mcp.client import MAX_TOOL_NAME, tool_name
from levante.mcp.config import ProcessSource, UrlSource

OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def test_mistralrs_shape():
    config = McpConfig.from_dict({
        "servers": [
            {"name": "Time Server", "source": {"type": "Process", "command": "mcp-server-time",
                                               "args": ["--local-timezone", "UTC"], "env": {"A": "1"},
                                               "work_dir": "/tmp"}},
            {"id": "hf", "name": "Hugging Face", "source": {"type": "Http", "url": "https://hf.co/mcp",
                                                            "timeout_secs": 12},
             "bearer_token": "tok", "tool_prefix": "huggingface", "enabled": False, "always_offer": True},
            {"name": "ws", "source": {"type": "WebSocket", "url": "wss://example.com/mcp"}},
        ],
        "auto_register_tools": False, "tool_timeout_secs": 5, "max_concurrent_calls": 2})
    time, hf, ws = config.servers
    assert time.id == "Time_Server" and time.prefix == "Time_Server"
    assert time.source == ProcessSource("mcp-server-time", ("--local-timezone", "UTC"), {"A": "1"}, "/tmp")
    assert hf.id == "hf" and hf.prefix == "huggingface" and not hf.enabled
    assert hf.always_offer and not time.always_offer
    assert hf.source == UrlSource("https://hf.co/mcp", "http", {"Authorization": "Bearer tok"}, 12.0)
    assert ws.source.transport == "websocket"
    assert config.enabled_servers == (time, ws)
    assert (config.auto_register_tools, config.tool_timeout_secs, config.max_concurrent_calls) == (False, 5.0, 2)


def test_mcp_servers_shape(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "time": {"command": "uvx", "args": ["mcp-server-time"], "always_offer": True},
        "web": {"url": "http://127.0.0.1:3001/mcp", "headers": {"X-Key": "k"}},
        "legacy": {"type": "sse", "url": "https://example.com/sse"},
        "off": {"command": "x", "disabled": True},
    }}))
    config = McpConfig.load(path)
    assert [s.id for s in config.servers] == ["time", "web", "legacy", "off"]
    assert [s.id for s in config.enabled_servers] == ["time", "web", "legacy"]
    assert config.servers[0].source == ProcessSource("uvx", ("mcp-server-time",))
    assert config.servers[1].source == UrlSource("http://127.0.0.1:3001/mcp", "http", {"X-Key": "k"})
    assert config.servers[2].source.transport == "sse"
    assert [s.always_offer for s in config.servers] == [True, False, False, False]
    assert (config.auto_register_tools, config.tool_timeout_secs, config.max_concurrent_calls) == (True, 30.0, 10)


@pytest.mark.parametrize("data, field", [
    ({"servers": [{"name": "a", "source": {"type": "Process", "command": "x"}},
                  {"name": "a", "source": {"type": "Process", "command": "y"}}]}, "servers[1].name"),
    ({"servers": [{"id": "s", "name": "a", "source": {"type": "Process", "command": "x"}},
                  {"id": "s", "name": "b", "source": {"type": "Process", "command": "y"}}]}, "servers[1].id"),
    ({"servers": [{"name": "a", "source": {"type": "Http", "url": "ftp://host/mcp"}}]}, "servers[0].source.url"),
    ({"servers": [{"name": "a", "source": {"type": "WebSocket", "url": "http://host/mcp"}}]},
     "servers[0].source.url"),
    ({"servers": [{"name": "a", "source": {"type": "Process", "command": ""}}]}, "servers[0].source.command"),
    ({"servers": [{"name": "a", "source": {"type": "Process", "command": "  "}}]}, "servers[0].source.command"),
    ({"servers": [{"name": "a", "source": {"type": "Carrier-Pigeon"}}]}, "servers[0].source.type"),
    ({"servers": [{"name": "a"}]}, "servers[0].source"),
    ({"servers": [{"source": {"type": "Process", "command": "x"}}]}, "servers[0].name"),
    ({"servers": [{"name": "a", "source": {"type": "Process", "command": "x", "args": "-v"}}]},
     "servers[0].source.args"),
    ({"servers": [{"name": "a", "source": {"type": "Process", "command": "x"}, "always_offer": 1}]},
     "servers[0].always_offer"),
    ({"mcpServers": {"a": {"command": "x", "always_offer": "yes"}}}, "mcpServers.a.always_offer"),
    ({"servers": [], "tool_timeout_secs": -1}, "tool_timeout_secs"),
    ({"servers": [], "max_concurrent_calls": 0}, "max_concurrent_calls"),
    ({"servers": [], "auto_register_tools": "yes"}, "auto_register_tools"),
    ({"servers": {}}, "servers"),
    ({"mcpServers": {"a": {"command": ""}}}, "mcpServers.a.command"),
    ({"mcpServers": {"a": {"url": "file:///etc/passwd"}}}, "mcpServers.a.url"),
    ({"mcpServers": {"a": {"type": "grpc", "url": "http://h"}}}, "mcpServers.a.type"),
    ({"mcpServers": {"a": {"transport": "pipe", "command": "x"}}}, "mcpServers.a.transport"),
    ({"mcpServers": {"a": {"args": ["x"]}}}, "mcpServers.a"),
    ({"mcpServers": {"a": {"command": "x", "env": {"K": 1}}}}, "mcpServers.a.env"),
    ({"mcpServers": {"a": {"command": "x", "url": "http://h"}}}, "mcpServers.a.url"),
    ({"mcpServers": []}, "mcpServers"),
    ({"servers": [], "mcpServers": {}}, "servers"),
    ({}, "servers"),
])
def test_errors_name_the_field(data, field):
    with pytest.raises(McpConfigError) as error:
        McpConfig.from_dict(data)
    assert str(error.value).startswith(f"{field}:"), str(error.value)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(McpConfigError, match="cannot read"):
        McpConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{servers: []}")
    with pytest.raises(McpConfigError, match=r"bad.json: not valid JSON \(line 1"):
        McpConfig.load(bad)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"servers": [{"id": "x", "name": "a", "source": {"type": "Process", "command": "c"}},
                                           {"id": "x", "name": "b", "source": {"type": "Process", "command": "c"}}]}))
    with pytest.raises(McpConfigError, match=r"dup.json: servers\[1\]\.id: duplicate server id 'x'"):
        McpConfig.load(dup)


@pytest.mark.parametrize("prefix, name", [("time", "get_current_time"), ("my server", "read.file"),
                                          ("p", "ünïcödé/tool"), ("x" * 40, "y" * 40), ("", "z")])
def test_tool_names_are_safe_for_openai(prefix, name):
    full = tool_name(prefix, name)
    assert OPENAI_NAME.match(full) and len(full) <= MAX_TOOL_NAME
    assert tool_name(prefix, name) == full
    if len(prefix) + len(name) < 60:
        assert full.startswith(prefix.replace(" ", "_"))
    assert tool_name("x" * 40, "y" * 40) != tool_name("x" * 40, "y" * 39 + "z")  # a hash keeps long names apart
