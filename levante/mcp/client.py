"""Connections to the configured MCP servers, their tools under OpenAI-safe names, and calls to them.

All MCP traffic runs on one private event loop in a daemon thread ("levante-mcp"). The SDK's
transports are anyio task groups that must be entered and left by the same task, and a stdio
server is a child process: keeping them on a loop of their own lets any caller (the HTTP server's
loop, Textual's, a test's `asyncio.run`) await `start`, `call_tool` and `aclose` from wherever it
runs, and a server that hangs or dies cannot stall the caller's loop.

One task per server holds its `mcp.Client` open until `aclose`. A server that fails to start, or
dies later, is recorded in `failures` (server id -> reason, with the last lines it wrote to
stderr); the other servers keep working, and calls to the dead one return an error result.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import tempfile
import threading
import warnings
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata, util

from levante.mcp.config import McpConfig, McpServerConfig, ProcessSource, UrlSource, safe_name
from levante.net import FetchPolicy

logger = logging.getLogger("levante.mcp")

MAX_TOOL_NAME = 64
DEFAULT_STARTUP_TIMEOUT_SECS = 60.0
HEALTH_CHECK_SECS = 2.0


@dataclass(frozen=True)
class ToolCallResult:
    content: str
    is_error: bool = False


@dataclass(frozen=True)
class McpTool:
    name: str  # as offered to the model: "<prefix>_<tool>", made safe for OpenAI's schema
    server_id: str
    tool_name: str  # as the MCP server knows it
    description: str
    parameters: dict

    def to_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def tool_name(prefix: str, name: str) -> str:
    """`<prefix>_<name>` within ^[a-zA-Z0-9_-]{1,64}$; a longer one keeps its head and a hash of the whole."""
    full = safe_name(f"{prefix}_{name}" if prefix else name)
    if len(full) <= MAX_TOOL_NAME:
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    return f"{full[:MAX_TOOL_NAME - 9]}_{digest}"


def render_result(result) -> str:
    """A CallToolResult's content as the text a model reads."""
    parts = []
    for block in result.content or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind}: {block.mime_type}, {len(block.data) * 3 // 4} bytes]")
        elif kind == "resource":
            resource = block.resource
            parts.append(getattr(resource, "text", None) or f"[resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}" + (f": {block.description}]" if block.description else "]"))
        else:
            parts.append(json.dumps(block.model_dump(mode="json", exclude_none=True)))
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def describe_error(error: BaseException) -> str:
    """One line for an exception, looking inside the exception groups anyio raises."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Connection:
    """One server: its task holds the client open; `client` is None until ready and after it ends."""

    def __init__(self, server: McpServerConfig, policy: FetchPolicy):
        self.server, self.policy = server, policy
        self.client = None
        self.tools: list = []
        self.failure: str | None = None
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") \
            if isinstance(server.source, ProcessSource) else None

    async def run(self) -> None:
        from mcp import Client

        try:
            async with AsyncExitStack() as stack:
                client = await stack.enter_async_context(Client(self._transport()))
                self.tools = await self._list_tools(client)
                self.client = client
                self.ready.set()
                await self._watch(client)
                self.client = None
        except asyncio.CancelledError:
            self.failure = self.failure or "stopped"
            raise
        except BaseException as e:  # anything a transport or server can throw: record it, keep the others alive
            if self.stop.is_set() and self.client is not None:
                return  # an error while shutting down is no failure
            self.failure = self.failure or self._with_stderr(describe_error(e))
            was_ready = self.client is not None
            log = logger.warning if was_ready else logger.info  # a failed start is the caller's to report
            log("MCP server '%s' %s: %s", self.server.id, "died" if was_ready else "failed to start", self.failure)
        finally:
            self.client = None
            self.ready.set()
            if self.stderr is not None:
                self.stderr.close()

    async def _watch(self, client) -> None:
        """Wait for `stop`, pinging now and then: a server that went away is marked dead at once."""
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED

        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), HEALTH_CHECK_SECS)
                return
            except asyncio.TimeoutError:
                pass
            try:
                with warnings.catch_warnings():  # ping is deprecated as of protocol 2026-07-28, still answered
                    warnings.simplefilter("ignore")
                    await asyncio.wait_for(client.send_ping(), HEALTH_CHECK_SECS)
            except MCPError as e:
                if e.code == CONNECTION_CLOSED:
                    self.mark_dead("the server went away (connection closed)")
            except Exception:
                pass  # busy, or a server that does not answer pings: not dead

    def mark_dead(self, reason: str) -> None:
        if self.failure is None:
            self.failure = self._with_stderr(reason)
            logger.warning("MCP server '%s' died: %s", self.server.id, self.failure)
        self.client = None
        self.stop.set()

    @asynccontextmanager
    async def _transport(self):
        from levante.net.fetch import guarded_async_client

        source = self.server.source
        if isinstance(source, ProcessSource):
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client

            params = StdioServerParameters(command=source.command, args=list(source.args), env=source.env,
                                           cwd=source.cwd)
            async with stdio_client(params, errlog=self.stderr) as streams:
                yield streams
        elif source.transport == "http":
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            timeout = httpx2.Timeout(source.timeout_secs or 30.0, read=300.0)
            async with guarded_async_client(self.policy, source.headers, timeout) as http:
                async with streamable_http_client(source.url, http_client=http) as streams:
                    yield streams
        elif source.transport == "sse":
            from mcp.client.sse import sse_client

            async with sse_client(source.url, headers=source.headers, timeout=source.timeout_secs or 5.0,
                                  httpx_client_factory=functools.partial(guarded_async_client, self.policy)) \
                    as streams:
                yield streams
        else:
            if util.find_spec("mcp.client.websocket") is None:  # mcp 1.x had one; 2.x has none
                raise ConnectionError(f"WebSocket transport: the installed mcp SDK ({metadata.version('mcp')}) "
                                      "offers no WebSocket client; use the server's streamable HTTP endpoint")
            from mcp.client.websocket import websocket_client

            async with websocket_client(source.url) as streams:
                yield streams

    @staticmethod
    async def _list_tools(client) -> list:
        tools, cursor = [], None
        while True:
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                return tools

    def _with_stderr(self, reason: str) -> str:
        if self.stderr is None or self.stderr.closed:
            return reason
        self.stderr.seek(0)
        tail = [line.strip() for line in self.stderr.read().splitlines() if line.strip()][-3:]
        return f"{reason} (stderr: {' | '.join(tail)})" if tail else reason


class McpToolManager:
    """The configured MCP servers and their tools. Every coroutine may be awaited from any event loop."""

    def __init__(self, config: McpConfig, startup_timeout_secs: float = DEFAULT_STARTUP_TIMEOUT_SECS,
                 policy: FetchPolicy = FetchPolicy.local()):
        """`policy`: which addresses HTTP and SSE servers may be reached at (levante/net/policy.py;
        a server on a public address passes its own)."""
        self.config = config
        self.policy = policy
        self.startup_timeout_secs = startup_timeout_secs
        self.tools: list[McpTool] = []
        self._by_name: dict[str, McpTool] = {}
        self._connections: dict[str, _Connection] = {}
        self._start_failures: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._semaphore: asyncio.Semaphore | None = None

    @property
    def failures(self) -> dict[str, str]:
        """Server id -> why it is not serving: failed to start, or died since."""
        failed = dict(self._start_failures)
        for server_id, connection in self._connections.items():
            if connection.failure and connection.failure != "stopped":
                failed[server_id] = connection.failure
        return failed

    @property
    def started(self) -> bool:
        return self._loop is not None

    def offered_tools(self) -> list[McpTool]:
        """The tools a model may be offered; none when the config turns auto_register_tools off."""
        return list(self.tools) if self.config.auto_register_tools else []

    def openai_tools(self) -> list[dict]:
        """`offered_tools` as OpenAI function tools."""
        return [tool.to_openai() for tool in self.offered_tools()]

    @property
    def always_offered_servers(self) -> frozenset[str]:
        """Ids of the servers whose tools go with every request (`always_offer` in the config)."""
        return frozenset(server.id for server in self.config.servers if server.always_offer)

    def tool(self, name: str) -> McpTool | None:
        """The tool offered under `name` (its server and its own name there), or None."""
        return self._by_name.get(name)

    def server_of(self, name: str) -> str | None:
        tool = self._by_name.get(name)
        return tool.server_id if tool else None

    async def start(self) -> None:
        """Start every enabled server, in parallel; never raises for a server that fails (see `failures`)."""
        if self._loop is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="levante-mcp", daemon=True)
        self._thread.start()
        await self._on_io_loop(self._start())

    async def call_tool(self, name: str, arguments: dict) -> ToolCallResult:
        """Run one tool; errors (unknown tool, dead server, timeout, the tool's own) come back as is_error."""
        tool = self._by_name.get(name)
        if tool is None:
            return ToolCallResult(f"no MCP tool named '{name}'", is_error=True)
        if not isinstance(arguments, dict):
            return ToolCallResult(f"the arguments of '{name}' must be a JSON object", is_error=True)
        if self._loop is None or self._loop.is_closed():
            return ToolCallResult("the MCP tool manager is not running", is_error=True)
        return await self._on_io_loop(self._call(tool, arguments))

    async def aclose(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        try:
            await self._on_io_loop(self._stop())
        finally:
            self._shutdown_loop()
            await asyncio.to_thread(self._thread.join, 10)
            self._close_loop()

    def close(self) -> None:
        """`aclose` for code outside any event loop (a server shutting down)."""
        if self._loop is None or self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=15)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self._shutdown_loop()
        self._thread.join(10)
        self._close_loop()

    def _close_loop(self) -> None:
        if not self._thread.is_alive():
            self._loop.close()

    def _shutdown_loop(self) -> None:
        loop = self._loop
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)

    async def _on_io_loop(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # --- what runs on the MCP loop ---

    async def _start(self) -> None:
        self._semaphore = asyncio.Semaphore(self.config.max_concurrent_calls)
        for server in self.config.enabled_servers:
            connection = _Connection(server, self.policy)
            connection.task = asyncio.create_task(connection.run(), name=f"mcp-{server.id}")
            self._connections[server.id] = connection
        await asyncio.gather(*(self._await_ready(c) for c in self._connections.values()))
        self._register_tools()

    async def _await_ready(self, connection: _Connection) -> None:
        try:
            await asyncio.wait_for(connection.ready.wait(), self.startup_timeout_secs)
        except asyncio.TimeoutError:
            connection.task.cancel()
            self._start_failures[connection.server.id] = f"did not start within {self.startup_timeout_secs:g}s"

    def _register_tools(self) -> None:
        for server_id, connection in self._connections.items():
            if connection.client is None:
                continue
            for tool in connection.tools:
                name = tool_name(connection.server.prefix, tool.name)
                if name in self._by_name:
                    logger.warning("MCP server '%s': tool '%s' is hidden by another tool named '%s'",
                                   server_id, tool.name, name)
                    continue
                registered = McpTool(name, server_id, tool.name, tool.description or tool.title or "",
                                     tool.input_schema or {"type": "object", "properties": {}})
                self._by_name[name] = registered
                self.tools.append(registered)

    async def _call(self, tool: McpTool, arguments: dict) -> ToolCallResult:
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED

        connection = self._connections[tool.server_id]
        if connection.client is None:
            return ToolCallResult(f"MCP server '{tool.server_id}' is not running: "
                                  f"{self.failures.get(tool.server_id, 'stopped')}", is_error=True)
        timeout = connection.server.source.timeout_secs if isinstance(connection.server.source, UrlSource) \
            else None
        timeout = timeout or self.config.tool_timeout_secs
        async with self._semaphore:
            try:
                result = await asyncio.wait_for(connection.client.call_tool(tool.tool_name, arguments), timeout)
            except asyncio.TimeoutError:
                return ToolCallResult(f"MCP tool '{tool.name}' timed out after {timeout:g}s", is_error=True)
            except MCPError as e:  # the server died mid-call, or answered with a protocol error
                if e.code == CONNECTION_CLOSED:
                    connection.mark_dead("the server went away (connection closed)")
                    return ToolCallResult(f"MCP server '{tool.server_id}' died: {connection.failure}",
                                          is_error=True)
                return ToolCallResult(f"MCP tool '{tool.name}' failed: {describe_error(e)}", is_error=True)
            except Exception as e:  # a transport error, an answer that breaks the protocol
                return ToolCallResult(f"MCP tool '{tool.name}' failed: {describe_error(e)}", is_error=True)
        return ToolCallResult(render_result(result), bool(result.is_error))

    async def _stop(self) -> None:
        for connection in self._connections.values():
            connection.stop.set()
        tasks = [c.task for c in self._connections.values() if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
