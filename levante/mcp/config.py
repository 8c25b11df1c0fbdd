"""The MCP client's config file, in either of its two common shapes, checked field by field.

mistral.rs's shape:
    {"servers": [{"name": "time", "source": {"type": "Process", "command": "mcp-server-time", "args": []},
                  "tool_prefix": "time", "enabled": true}],
     "auto_register_tools": true, "tool_timeout_secs": 30, "max_concurrent_calls": 10}
  source types: Process {command, args, env, work_dir}, Http {url, headers, timeout_secs},
  WebSocket {url, headers, timeout_secs}; a server entry may carry `id`, `bearer_token` and `always_offer`.
The common `mcpServers` shape (Claude Desktop, Cursor, VS Code):
    {"mcpServers": {"time": {"command": "mcp-server-time", "args": [], "env": {}},
                    "web": {"url": "https://host/mcp", "headers": {}, "type": "http"}}}
  `type` may be stdio, http (or streamable-http), sse, ws (websocket); the key is the server id.
Either shape's server entries may say `"always_offer": true`: its tools are offered to the model with
every request, even when the server picks the most relevant tools (serve/tool_selection.py).
Either shape may carry the top-level `tool_timeout_secs`, `max_concurrent_calls` and `auto_register_tools`.

Errors are `McpConfigError`s whose message names the offending field, e.g. `servers[1].source.url`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from levante.errors import LevanteError

DEFAULT_TOOL_TIMEOUT_SECS = 30.0
DEFAULT_MAX_CONCURRENT_CALLS = 10
_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")


class McpConfigError(LevanteError):
    """The MCP config file cannot be used; the message names the field."""


@dataclass(frozen=True)
class ProcessSource:
    """A server started as a subprocess, spoken to over its stdin/stdout."""
    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None
    transport: str = "stdio"


@dataclass(frozen=True)
class UrlSource:
    """A server reached over the network: `transport` is "http" (streamable HTTP), "sse" or "websocket"."""
    url: str
    transport: str = "http"
    headers: dict[str, str] = field(default_factory=dict)
    timeout_secs: float | None = None


@dataclass(frozen=True)
class McpServerConfig:
    id: str  # unique; names the server in reports and, unless tool_prefix says otherwise, prefixes its tools
    source: ProcessSource | UrlSource
    name: str = ""
    tool_prefix: str | None = None
    enabled: bool = True
    always_offer: bool = False  # its tools are offered with every request, never left out by tool selection

    @property
    def prefix(self) -> str:
        return safe_name(self.tool_prefix if self.tool_prefix is not None else self.id)


@dataclass(frozen=True)
class McpConfig:
    servers: tuple[McpServerConfig, ...]
    auto_register_tools: bool = True
    tool_timeout_secs: float | None = DEFAULT_TOOL_TIMEOUT_SECS
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS

    @classmethod
    def load(cls, path: str | Path) -> "McpConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise McpConfigError(f"MCP config {path}: cannot read it ({e.strerror or e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise McpConfigError(f"MCP config {path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                                 f"{e.msg})") from None
        try:
            return cls.from_dict(data)
        except McpConfigError as e:
            raise McpConfigError(f"MCP config {path}: {e}") from None

    @classmethod
    def from_dict(cls, data) -> "McpConfig":
        if not isinstance(data, dict):
            raise McpConfigError("the top level must be a JSON object with 'servers' or 'mcpServers'")
        if ("servers" in data) == ("mcpServers" in data):
            raise McpConfigError("servers: give exactly one of 'servers' (mistral.rs's shape) or 'mcpServers'")
        servers = _mistralrs_servers(data["servers"]) if "servers" in data else _common_servers(data["mcpServers"])
        seen: dict[str, str] = {}
        for where, server in servers:
            if server.id in seen:
                raise McpConfigError(f"{where}: duplicate server id '{server.id}' (also {seen[server.id]})")
            seen[server.id] = where
        timeout = data.get("tool_timeout_secs", DEFAULT_TOOL_TIMEOUT_SECS)
        if timeout is not None and (not _is_number(timeout) or timeout <= 0):
            raise McpConfigError("tool_timeout_secs: must be a positive number of seconds or null")
        concurrent = data.get("max_concurrent_calls", DEFAULT_MAX_CONCURRENT_CALLS)
        if concurrent is None:
            concurrent = DEFAULT_MAX_CONCURRENT_CALLS
        if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
            raise McpConfigError("max_concurrent_calls: must be an integer >= 1")
        return cls(tuple(server for _, server in servers),
                   auto_register_tools=_bool(data, "auto_register_tools", True, "auto_register_tools"),
                   tool_timeout_secs=float(timeout) if timeout is not None else None,
                   max_concurrent_calls=concurrent)

    @property
    def enabled_servers(self) -> tuple[McpServerConfig, ...]:
        return tuple(s for s in self.servers if s.enabled)


def safe_name(name: str) -> str:
    """`name` with every character outside [a-zA-Z0-9_-] replaced by '_' (OpenAI's rule for tool names)."""
    return _UNSAFE.sub("_", name)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bool(entry: dict, key: str, default: bool, where: str) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise McpConfigError(f"{where}: must be true or false")
    return value


def _string(entry: dict, key: str, where: str, required: bool = False) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise McpConfigError(f"{where}: {'required, ' if required and value is None else ''}"
                             "must be a non-empty string")
    return value


def _string_map(entry: dict, key: str, where: str) -> dict[str, str] | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise McpConfigError(f"{where}: must be an object of strings")
    return dict(value)


def _args(entry: dict, where: str) -> tuple[str, ...]:
    value = entry.get("args", [])
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise McpConfigError(f"{where}: must be a list of strings")
    return tuple(value)


def _url(entry: dict, where: str, transport: str) -> str:
    url = _string(entry, "url", where, required=True)
    schemes = ("ws", "wss") if transport == "websocket" else ("http", "https")
    parsed = urlparse(url)
    if parsed.scheme not in schemes or not parsed.netloc:
        raise McpConfigError(f"{where}: '{url}' is not a {' or '.join(schemes)} URL "
                             f"(a {transport} transport needs {schemes[0]}://host...)")
    return url


def _timeout(entry: dict, where: str) -> float | None:
    value = entry.get("timeout_secs")
    if value is not None and (not _is_number(value) or value <= 0):
        raise McpConfigError(f"{where}: must be a positive number of seconds")
    return float(value) if value is not None else None


def _process(entry: dict, where: str, cwd_key: str) -> ProcessSource:
    command = _string(entry, "command", f"{where}.command", required=True)
    return ProcessSource(command=command, args=_args(entry, f"{where}.args"),
                         env=_string_map(entry, "env", f"{where}.env"),
                         cwd=_string(entry, cwd_key, f"{where}.{cwd_key}"))


def _headers(entry: dict, where: str, bearer_token: str | None) -> dict[str, str]:
    headers = _string_map(entry, "headers", where) or {}
    if bearer_token:
        headers.setdefault("Authorization", f"Bearer {bearer_token}")
    return headers


_MISTRALRS_TYPES = {"Process": "stdio", "Http": "http", "WebSocket": "websocket"}


def _mistralrs_servers(servers) -> list[tuple[str, McpServerConfig]]:
    if not isinstance(servers, list):
        raise McpConfigError("servers: must be a list of server objects")
    out = []
    for i, entry in enumerate(servers):
        where = f"servers[{i}]"
        if not isinstance(entry, dict):
            raise McpConfigError(f"{where}: must be an object")
        name = _string(entry, "name", f"{where}.name", required=True)
        server_id = _string(entry, "id", f"{where}.id") or safe_name(name)
        source = entry.get("source")
        if not isinstance(source, dict):
            raise McpConfigError(f"{where}.source: required, an object with a 'type' (Process, Http or WebSocket)")
        kind = source.get("type")
        if kind not in _MISTRALRS_TYPES:
            raise McpConfigError(f"{where}.source.type: unknown transport {json.dumps(kind)} "
                                 "(expected Process, Http or WebSocket)")
        transport = _MISTRALRS_TYPES[kind]
        bearer = _string(entry, "bearer_token", f"{where}.bearer_token")
        if transport == "stdio":
            parsed = _process(source, f"{where}.source", "work_dir")
        else:
            parsed = UrlSource(url=_url(source, f"{where}.source.url", transport), transport=transport,
                               headers=_headers(source, f"{where}.source.headers", bearer),
                               timeout_secs=_timeout(source, f"{where}.source.timeout_secs"))
        prefix = _string(entry, "tool_prefix", f"{where}.tool_prefix")
        id_field = f"{where}.id" if "id" in entry else f"{where}.name"
        out.append((id_field, McpServerConfig(id=server_id, source=parsed, name=name, tool_prefix=prefix,
                                                   enabled=_bool(entry, "enabled", True, f"{where}.enabled"),
                                                   always_offer=_bool(entry, "always_offer", False,
                                                                      f"{where}.always_offer"))))
    return out


_COMMON_TYPES = {"stdio": "stdio", "http": "http", "streamable-http": "http", "streamable_http": "http",
                 "streamableHttp": "http", "sse": "sse", "ws": "websocket", "websocket": "websocket"}


def _common_servers(servers) -> list[tuple[str, McpServerConfig]]:
    if not isinstance(servers, dict):
        raise McpConfigError("mcpServers: must be an object mapping server ids to servers")
    out = []
    for server_id, entry in servers.items():
        where = f"mcpServers.{server_id}"
        if not server_id.strip():
            raise McpConfigError(f"{where}: the server id must not be empty")
        if not isinstance(entry, dict):
            raise McpConfigError(f"{where}: must be an object")
        kind_key = "type" if "type" in entry else "transport"
        kind = entry.get(kind_key)
        if kind is None:
            kind = "stdio" if "command" in entry else "http" if "url" in entry else None
            if kind is None:
                raise McpConfigError(f"{where}: needs a 'command' (stdio) or a 'url' (HTTP)")
        if kind not in _COMMON_TYPES:
            raise McpConfigError(f"{where}.{kind_key}: unknown transport {json.dumps(kind)} "
                                 "(expected stdio, http, sse or ws)")
        transport = _COMMON_TYPES[kind]
        if transport == "stdio":
            if "url" in entry:
                raise McpConfigError(f"{where}.url: a stdio server takes a 'command', not a 'url'")
            source = _process(entry, where, "cwd")
        else:
            if "command" in entry:
                raise McpConfigError(f"{where}.command: a {transport} server takes a 'url', not a 'command'")
            source = UrlSource(url=_url(entry, f"{where}.url", transport), transport=transport,
                               headers=_headers(entry, f"{where}.headers", None),
                               timeout_secs=_timeout(entry, f"{where}.timeout_secs"))
        enabled = not _bool(entry, "disabled", False, f"{where}.disabled")
        out.append((where, McpServerConfig(id=server_id, source=source, name=server_id,
                                           tool_prefix=_string(entry, "tool_prefix", f"{where}.tool_prefix"),
                                           enabled=enabled,
                                           always_offer=_bool(entry, "always_offer", False, f"{where}.always_offer"))))
    return out
