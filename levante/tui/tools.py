"""MCP tools for the chat app: one task owns the `McpToolManager` from start to close.

The MCP SDK's clients live in anyio task groups, which must be entered and left in the same
task; `serve()` is that task (the app runs it as a worker), `close()` ends it.
"""
from __future__ import annotations

import asyncio


class McpToolHost:
    """A tool provider (`openai_tools()`, `call_tool()`, `failures`) over a started `McpToolManager`."""

    def __init__(self, manager):
        self.manager = manager
        self.started = False
        self.error: str | None = None
        self._stop: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self.on_ready = None  # called once the servers are up (or have failed)

    async def serve(self) -> None:
        self._stop, self._done = asyncio.Event(), asyncio.Event()
        try:
            try:
                await self.manager.start()
                self.started = True
            except Exception as e:  # no tools then; /tools says why
                self.error = f"{type(e).__name__}: {e}"
            if self.on_ready is not None:
                await self.on_ready()
            if self.started:
                await self._stop.wait()
        finally:
            self.started = False
            try:
                await self.manager.aclose()
            finally:
                self._done.set()

    async def close(self, timeout: float = 10.0) -> None:
        if self._stop is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    @property
    def failures(self) -> dict[str, str]:
        failures = dict(getattr(self.manager, "failures", {}) or {})
        if self.error:
            failures["(all)"] = self.error
        return failures

    def openai_tools(self) -> list[dict]:
        return self.manager.openai_tools() if self.started else []

    async def call_tool(self, name: str, arguments: dict):
        return await self.manager.call_tool(name, arguments)
